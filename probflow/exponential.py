"""Exponential integrators of Eq. 12 in λ = −log σ, data-prediction form (DPM-Solver++, UniPC families).

Variables (MATH.md §1–2): the state is x̄, the field gives ε, and the denoiser is D = x̄ − σ ε (x̂_0).
In x̄, Eq. 12 reads dx̄/dσ = (x̄ − D)/σ. With y = x̄/σ = x̄ e^{λ} this is dy/dλ = e^{λ} D, so over a step
from σ to σ_next (h = λ_next − λ = log(σ/σ_next)) the exact solution is

    x̄_next = (σ_next/σ) x̄ + σ_next ∫_λ^{λ_next} e^{λ'} D(λ') dλ'
           = e^{−h} x̄ + ∫_0^h e^{−(h−u)} D(λ + u) du.                                        (E1)

Only D is approximated. If D(λ + u) ≈ P(u) = Σ_m c_m u^m, then with I_m(h) = ∫_0^h e^{−(h−u)} u^m du,

    I_0 = 1 − e^{−h} = −expm1(−h),     I_m = h^m − m I_{m−1}   (integration by parts)       (E2)

and x̄_next = e^{−h} x̄ + Σ_m c_m I_m. When P interpolates D at nodes u_j, this is a weighted sum
x̄_next = e^{−h} x̄ + Σ_j w_j D_j with w = V^{−T} I (V_jm = u_j^m, the Vandermonde matrix): the
"exponential quadrature" weights, computed once per step on scalars. Order 1 (P = D_0) gives
x̄_next = x̄ − (σ − σ_next) ε: DDIM (MATH.md §3), so DDIM is the first member of this family.

Methods (all probflow step functions `step(field, x̄, σ, σ_next, state) -> (x̄_next, state)`):

- `dpmpp_2m`, `dpmpp_3m` (multistep): P interpolates the current D and the previous 1 or 2 (kept in the
  explicit `state`), integrated exactly by (E2). The first steps have no history and use the orders
  available (1, then 2). `dpmpp_2m` is DPM-Solver++(2M) with diffusers' solver_type="heun" (the exact
  integral of the linear interpolant). `dpmpp_3m` integrates the quadratic exactly; the published 3M
  update (DPM-Solver's reference code and diffusers) weights the quadratic term by φ₃ = expm1(−h)/h² + 1/h
  − 1/2 ≈ −h/6 where the exact integral gives −h/3, so it is not the same method (see benchmarks/solvers.md).
- `dpmpp_2s`, `dpmpp_3s` (singlestep): intermediate stages at λ + r h, r = 1/2 (2S) and r = 1/3, 2/3
  (3S, the DPM-Solver-3 abscissae whose final combination uses only the stage at 2/3).
- `unipc` (UniPC-2, bh2, Zhao et al. 2023): the multistep predictor UniP-2 plus the corrector UniC, which
  reuses the model call at the predicted point (the one the next step needs anyway) to raise the order
  by one at no extra NFE. The returned x̄ after the last step is the (uncorrected) prediction, as in UniPC.
  `unipc_3`: the same with the UniP-3 predictor.

The step into σ = 0 (λ = +∞). (E1) has the finite limit x̄(0) = D(x̄(0), 0): at σ = 0 the solution is its
own denoised value, and e^{−h} → 0. A polynomial in λ cannot be integrated to λ = ∞ (I_m(h) → ∞ for m ≥ 1),
so the last step must estimate D(0) another way. Along a solution of Eq. 12 for a smooth density, x̄ and D
are smooth functions of s = σ² (x̄ solves dx̄/ds = −½∇log p_s(x̄), a regular ODE at s = 0), so here the
multistep methods *extrapolate D to s = 0* with the Lagrange polynomial in σ² through the current D and
the same history they keep (no extra NFE):

    x̄(0) ≈ Σ_j ℓ_j(0) D_j,        ℓ_j Lagrange basis in s_j = σ_j².                             (E3)

A first-order last step (x̄(0) = D_n, what DPM-Solver++/UniPC do) leaves an error ≈ ∂D/∂s·σ_n², which does
not shrink with NFE on a grid with a fixed σ_min; (E3) with k nodes leaves O(σ_n² σ_{n−1}² …). The
singlestep methods spend their stages on the way down to 0 instead: stages at σ/2 (2S) and σ/2, σ/4 (3S),
reached by the (E1) updates of lower order, then (E3) through the stages.

Encoding (increasing grid) from σ = 0: (E1) is singular there (λ = +∞), but Eq. 12 in ε-form is regular, so
the first step away from 0 is Heun's method in σ (2 NFE, local error O(σ_1³)); history restarts after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from probflow.field import DDIMField
from probflow.solvers import Method, register

__all__ = [
    "ExpState",
    "exp_weights",
    "zero_weights",
    "multistep_step",
    "singlestep_step",
    "unipc_step",
    "METHOD_NAMES",
]


@dataclass
class ExpState:
    """Explicit multistep state: the last few (σ_j, D_j), most recent last, and for UniPC the x̄ the last
    predictor started from (corrected) with the order it used."""

    sigmas: tuple[float, ...] = ()
    denoised: tuple[Tensor, ...] = ()
    x_prev: Tensor | None = None
    order_prev: int = 0

    def push(self, sigma: float, d: Tensor, keep: int) -> ExpState:
        s = (*self.sigmas, sigma)[-keep:]
        ds = (*self.denoised, d)[-keep:]
        return ExpState(s, ds, self.x_prev, self.order_prev)


def _phi_integrals(h: float, n: int) -> list[float]:
    """I_m(h) = ∫_0^h e^{−(h−u)} u^m du for m < n, by (E2) (a series for small |h|, where (E2) cancels)."""
    if abs(h) < 0.05:  # I_m = Σ_k (−1)^k h^{m+1+k} m!/(m+1+k)!, converges fast for small h
        out = []
        for m in range(n):
            term, acc = h ** (m + 1) / (m + 1), 0.0
            for k in range(30):
                acc += term
                term *= -h / (m + 2 + k)
            out.append(acc)
        return out
    out = [-math.expm1(-h)]
    for m in range(1, n):
        out.append(h**m - m * out[-1])
    return out


def exp_weights(lam: float, lam_next: float, lams: list[float]) -> tuple[float, list[float]]:
    """(E1)–(E2): the weights of x̄_next = e^{−h} x̄ + Σ_j w_j D_j for D interpolated at λ_j (lams),
    integrated exactly from λ to λ_next. Returns (e^{−h}, w)."""
    h = lam_next - lam
    k = len(lams)
    integ = np.array(_phi_integrals(h, k))
    if k == 1:
        return math.exp(-h), [float(integ[0])]
    # scaled nodes u_j/h keep the Vandermonde system well conditioned; I_m scales as h^{m+1}
    u = np.array([(lj - lam) / h for lj in lams])
    v = np.vander(u, k, increasing=True)  # V_jm = (u_j/h)^m
    scaled = integ / h ** np.arange(k)
    w = np.linalg.solve(v.T, scaled)
    return math.exp(-h), [float(x) for x in w]


def zero_weights(sigmas: list[float]) -> list[float]:
    """(E3): Lagrange weights ℓ_j(0) in s = σ² through the nodes σ_j², so that D(0) ≈ Σ_j ℓ_j(0) D_j."""
    s = [x * x for x in sigmas]
    w = []
    for j, sj in enumerate(s):
        p = 1.0
        for i, si in enumerate(s):
            if i != j:
                p *= si / (si - sj)
        w.append(p)
    return w


def _combine(weights: list[float], tensors: list[Tensor]) -> Tensor:
    out = weights[0] * tensors[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        out = out + w * t
    return out


def _denoise(field: DDIMField, xbar: Tensor, sigma: Tensor) -> Tensor:
    """D = x̄ − σ ε(x̄/sqrt(1+σ²), σ) (one NFE)."""
    return xbar - sigma * field(sigma, xbar)


def _heun_from_zero(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """A Heun step of Eq. 12 in σ (ε-form), used for the step away from σ = 0 where λ = +∞."""
    e0 = field(sigma, xbar)
    dsig = sigma_next - sigma
    e1 = field(sigma_next, xbar + dsig * e0)
    return xbar + 0.5 * dsig * (e0 + e1)


def _lam(sigma: float) -> float:
    return -math.log(sigma)


# --------------------------------------------------------------------------------------------- multistep


def multistep_step(order: int):
    """The step of DPM-Solver++(kM) in exact-integral form: P interpolates D at the current and the
    `order − 1` previous grid points (as many as the state holds), integrated by (E1)–(E2); into σ = 0 the
    extrapolation (E3) through the same points."""
    name = f"dpmpp_{order}m"

    def step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state: ExpState | None):
        s, sn = float(sigma), float(sigma_next)
        if s == 0.0:  # encoding from σ = 0: λ = +∞
            return _heun_from_zero(field, xbar, sigma, sigma_next), ExpState()
        if not isinstance(state, (ExpState, type(None))):
            raise TypeError(f"{name}: state must be an ExpState or None, got {type(state).__name__}")
        state = state or ExpState()
        st = state.push(s, _denoise(field, xbar, sigma), order)
        if sn == 0.0:
            return _combine(zero_weights(list(st.sigmas)), list(st.denoised)), st
        decay, w = exp_weights(_lam(s), _lam(sn), [_lam(x) for x in st.sigmas][::-1])
        return decay * xbar + _combine(w, list(st.denoised)[::-1]), st

    return step


# -------------------------------------------------------------------------------------------- singlestep


def singlestep_step(order: int):
    """DPM-Solver++(2S) (stage at r = 1/2) or (3S) (stages at r = 1/3, 2/3) in exact-integral form;
    into σ = 0, stages at σ/2 (and σ/4) and the extrapolation (E3) through them. Stateless."""
    if order not in (2, 3):
        raise ValueError(f"order: singlestep methods of order 2 or 3, got {order}")
    name = f"dpmpp_{order}s"

    def step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state):
        s, sn = float(sigma), float(sigma_next)
        if s == 0.0:
            return _heun_from_zero(field, xbar, sigma, sigma_next), None
        lam = _lam(s)
        d0 = _denoise(field, xbar, sigma)
        if sn == 0.0:
            # stages on the way to 0 at λ + log 2 (and λ + log 4), then (E3) in σ² through all of them
            sig = [s, s / 2] + ([s / 4] if order == 3 else [])
            ds = [d0]
            for j in range(1, len(sig)):
                lams = [_lam(x) for x in sig[:j]]
                decay, w = exp_weights(lam, _lam(sig[j]), lams)
                xj = decay * xbar + _combine(w, ds)
                ds.append(_denoise(field, xj, sigma.new_tensor(sig[j])))
            return _combine(zero_weights(sig), ds), None
        h = _lam(sn) - lam
        rs = [0.5] if order == 2 else [1 / 3, 2 / 3]
        nodes, ds = [lam], [d0]
        for r in rs:
            ls = lam + r * h
            # stage j: exact integral of the interpolant through the stages so far (order 1, then 2)
            decay, w = exp_weights(lam, ls, nodes)
            xs = decay * xbar + _combine(w, ds)
            nodes.append(ls)
            ds.append(_denoise(field, xs, sigma.new_tensor(math.exp(-ls))))
        if order == 3:  # DPM-Solver-3: the final combination uses D0 and the stage at 2/3 only
            nodes, ds = [nodes[0], nodes[2]], [ds[0], ds[2]]
        decay, w = exp_weights(lam, lam + h, nodes)
        return decay * xbar + _combine(w, ds), None

    return step


# ------------------------------------------------------------------------------------------------- UniPC


def _unipc_coefficients(h: float, rks: list[float], order: int) -> tuple[float, float, list[float]]:
    """UniPC (bh2, data prediction) in x̄: x̄_next = e^{−h} x̄ + (1 − e^{−h}) D_0 + (1 − e^{−h}) Σ_k ρ_k Δ_k
    with Δ_k = (D_k − D_0)/r_k. ρ solves Σ_k ρ_k r_k^{m−1} = m! h φ_{m+1}(h)/B(h), m = 1 … order, B(h) =
    −expm1(−h) (with UniP-2's shortcut ρ = 1/2). Returns (e^{−h}, B, ρ) for the given r_k (last = 1 for
    the corrector)."""
    hh = -h
    phi1 = math.expm1(hh)
    b_h = phi1
    hphi = phi1 / hh - 1
    fact = 1
    rhs = []
    for i in range(1, order + 1):
        rhs.append(hphi * fact / b_h)
        fact *= i + 1
        hphi = hphi / hh - 1 / fact
    return math.exp(-h), -b_h, rhs


def unipc_step(order: int):
    """UniPC with the UniP-`order` predictor and UniC corrector (bh2), data prediction, multistep.

    At each grid point: evaluate D at the incoming (predicted) x̄; if the state holds the previous start
    point, correct x̄ with UniC from there using this D; then predict x̄_next with UniP from the corrected
    x̄ and the D history (D's stay those evaluated at predicted points, as in UniPC). Into σ = 0: the
    corrector, then (E3) through the history.
    """
    name = "unipc" if order == 2 else f"unipc_{order}"
    keep = order + 1

    def predict(xbar, lam, lam_next, lams, ds, p):
        h = lam_next - lam
        decay, b_h, rhs = _unipc_coefficients(h, [], p)
        x = decay * xbar + b_h * ds[-1]
        if p == 1:
            return x
        rks = [(lams[-1 - i] - lam) / h for i in range(1, p)]
        if p == 2:
            rho = [0.5]
        else:
            r = np.array([[rk ** (m - 1) for rk in rks] for m in range(1, p)])
            rho = list(np.linalg.solve(r, np.array(rhs[: p - 1])))
        corr = _combine([rho[i] / rks[i] for i in range(p - 1)], [ds[-2 - i] - ds[-1] for i in range(p - 1)])
        return x + b_h * corr

    def correct(x_prev, lam_prev, lam, lams_prev, ds_prev, d_new, p):
        h = lam - lam_prev
        decay, b_h, rhs = _unipc_coefficients(h, [], p)
        x = decay * x_prev + b_h * ds_prev[-1]
        if p == 1:
            rho = [0.5]
            rks = [1.0]
        else:
            rks = [(lams_prev[-1 - i] - lam_prev) / h for i in range(1, p)] + [1.0]
            r = np.array([[rk ** (m - 1) for rk in rks] for m in range(1, p + 1)])
            rho = list(np.linalg.solve(r, np.array(rhs)))
        diffs = [ds_prev[-2 - i] - ds_prev[-1] for i in range(p - 1)] + [d_new - ds_prev[-1]]
        return x + b_h * _combine([rho[i] / rks[i] for i in range(p)], diffs)

    def step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state: ExpState | None):
        s, sn = float(sigma), float(sigma_next)
        if s == 0.0:
            return _heun_from_zero(field, xbar, sigma, sigma_next), ExpState()
        if not isinstance(state, (ExpState, type(None))):
            raise TypeError(f"{name}: state must be an ExpState or None, got {type(state).__name__}")
        state = state or ExpState()
        d = _denoise(field, xbar, sigma)
        if state.x_prev is not None:
            lams_prev = [_lam(x) for x in state.sigmas]
            xbar = correct(state.x_prev, lams_prev[-1], _lam(s), lams_prev, list(state.denoised), d,
                           state.order_prev)
        st = state.push(s, d, keep)
        if sn == 0.0:
            n = min(order, len(st.sigmas))
            return _combine(zero_weights(list(st.sigmas[-n:])), list(st.denoised[-n:])), st
        p = min(order, len(st.sigmas))
        lams = [_lam(x) for x in st.sigmas]
        x_next = predict(xbar, lams[-1], _lam(sn), lams, list(st.denoised), p)
        return x_next, ExpState(st.sigmas, st.denoised, xbar, p)

    return step


_METHODS = [
    Method("dpmpp_2m", 2, 1, step=multistep_step(2),
           description="DPM-Solver++(2M), exponential integrator in λ, data prediction; last step (E3)"),
    Method("dpmpp_3m", 3, 1, step=multistep_step(3),
           description="exponential multistep of order 3 (exact quadratic integral); last step (E3)"),
    Method("dpmpp_2s", 2, 2, step=singlestep_step(2),
           description="DPM-Solver++(2S), singlestep, stage at r = 1/2; last step to 0 via σ/2 and (E3)"),
    Method("dpmpp_3s", 3, 3, step=singlestep_step(3),
           description="DPM-Solver++(3S), singlestep, stages r = 1/3, 2/3; last step via σ/2, σ/4 and (E3)"),
    Method("unipc", 3, 1, step=unipc_step(2),
           description="UniPC-2 (bh2): UniP-2 predictor + UniC corrector, multistep; last step (E3)"),
    Method("unipc_3", 4, 1, step=unipc_step(3),
           description="UniPC-3 (bh2): UniP-3 predictor + UniC corrector, multistep; last step (E3)"),
]

METHOD_NAMES = tuple(m.name for m in _METHODS)

for _m in _METHODS:
    register(_m)
