"""Exponential integrators of Eq. 12 in λ = −log σ, data-prediction form (DPM-Solver++, UniPC families).

Variables (docs/MATH.md §1–2): the state is x̄, the field gives ε, and the denoiser is D = x̄ − σ ε (x̂_0).
In x̄, Eq. 12 reads dx̄/dσ = (x̄ − D)/σ. With y = x̄/σ = x̄ e^{λ} this is dy/dλ = e^{λ} D, so over a step
from σ to σ_next (h = λ_next − λ = log(σ/σ_next)) the exact solution is

    x̄_next = (σ_next/σ) x̄ + σ_next ∫_λ^{λ_next} e^{λ'} D(λ') dλ'
           = e^{−h} x̄ + ∫_0^h e^{−(h−u)} D(λ + u) du.                                        (E1)

Only D is approximated. If D(λ + u) ≈ P(u) = Σ_m c_m u^m, then with I_m(h) = ∫_0^h e^{−(h−u)} u^m du,

    I_0 = 1 − e^{−h} = −expm1(−h),     I_m = h^m − m I_{m−1}   (integration by parts)       (E2)

and x̄_next = e^{−h} x̄ + Σ_m c_m I_m. When P interpolates D at nodes u_j, this is a weighted sum
x̄_next = e^{−h} x̄ + Σ_j w_j D_j with w = V^{−T} I (V_jm = u_j^m, the Vandermonde matrix): the
"exponential quadrature" weights, computed once per step on scalars. Order 1 (P = D_0) gives
x̄_next = x̄ − (σ − σ_next) ε: DDIM (docs/MATH.md §3), so DDIM is the first member of this family.

Methods (all probflow step functions `step(field, x̄, σ, σ_next, state) -> (x̄_next, state)`):

- `dpmpp_2m`, `dpmpp_3m` (multistep): P interpolates the current D and the previous 1 or 2 (kept in the
  explicit `state`), integrated exactly by (E2). The first steps have no history and use the orders
  available (1, then 2); a first-order first step would cap the global order at 2, so `dpmpp_3m` takes its
  first step as one 2S step (N steps cost N + 1 NFE). `dpmpp_2m` is DPM-Solver++(2M) with diffusers'
  solver_type="heun" (the exact integral of the linear interpolant). `dpmpp_3m` integrates the quadratic
  exactly; the published 3M update (DPM-Solver's reference code, diffusers) weights its second divided
  difference D2 = h²·[D0, D1, D2] by −φ₃ = 1/2 − (h − 1 + e^{−h})/h² (≈ h/6), where the exact integral of
  the quadratic gives 1 − 2(h − 1 + e^{−h})/h² (≈ h/3); so it is not claimed to agree with diffusers' 3M.
- `dpmpp_2s`, `dpmpp_3s` (singlestep): intermediate stages at λ + r h, r = 1/2 (2S) and r = 1/3, 2/3
  (3S, the DPM-Solver-3 abscissae whose final combination uses only the stage at 2/3).
- `unipc` (UniPC-2, bh2, Zhao et al. 2023): the multistep predictor UniP-2 plus the corrector UniC, which
  reuses the model call at the predicted point (the one the next step needs anyway) to raise the order
  by one at no extra NFE (order 3). The returned x̄ after the last step is the (uncorrected) prediction, as
  in UniPC. `unipc_3`: the same with the UniP-3 predictor (order 4 in the interior; its first-order cold start
  limits the measured global order to 3). `unipc_4`: the UniP-4 predictor (order 5 in the interior; its start-up
  steps of orders 2–4 add an O(h³) term whose constant, set by D's curvature in λ near σ_max, stayed below the
  order-5 error on the order test's grids: measured 5.5 there, tests/test_orders.py).

The step into σ = 0 (λ = +∞). (E1) has the finite limit x̄(0) = D(x̄(0), 0): at σ = 0 the solution is its
own denoised value, and e^{−h} → 0. A polynomial in λ cannot be integrated to λ = ∞ (I_m(h) → ∞ for m ≥ 1),
so the last step must estimate D(0) another way. Along a solution of Eq. 12 for a smooth density, x̄ and D
are smooth functions of s = σ² (x̄ solves dx̄/ds = −½∇log p_s(x̄), a regular ODE at s = 0), so here the
multistep methods *extrapolate D to s = 0* with the Lagrange polynomial in σ² through the current D and
the same history they keep (no extra NFE; UniPC likewise, after its corrector):

    x̄(0) ≈ Σ_j ℓ_j(0) D_j,        ℓ_j Lagrange basis in s_j = σ_j².                             (E3)

A first-order last step (x̄(0) = D_n, what DPM-Solver++/UniPC do) leaves an error ≈ ∂D/∂s·σ_n², which does
not shrink with NFE on a grid with a fixed σ_min; (E3) with k nodes leaves O(σ_n² σ_{n−1}² …) (measured:
error ∝ σ_n^4 for k = 2 on a fine grid, tests/test_exponential.py). The singlestep methods have no history;
stages below σ reached by (E1) carry an O(σ²) error that (E3) cannot remove, so their last step is a
Runge–Kutta step *in σ* on the ε-form, which is regular at σ = 0: explicit midpoint (2S) or Heun's
third-order method (3S), with the same stage count and no model call at σ = 0.

Encoding (increasing grid) from σ = 0: (E1) is singular there (λ = +∞), but Eq. 12 in ε-form is regular, so
the first step away from 0 is Heun's method in σ (2 NFE, local error O(σ_1³)); history restarts after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from probflow.field import DDIMField
from probflow.method import Method

__all__ = [
    "ExpState",
    "exp_weights",
    "zero_weights",
    "multistep_step",
    "singlestep_step",
    "unipc_step",
    "DECLARED",
    "METHOD_NAMES",
]


@dataclass
class ExpState:
    """Explicit multistep state: the last few (σ_j, D_j), most recent last, and for UniPC the x̄ the last
    predictor started from (corrected) with the order it used.

    `scales` (UniPC only; None: the published method): per grid interval k a pair (a_k, b_k) that multiplies
    the higher-order part of that interval's predictor by 1 + a_k and of its corrector by 1 + b_k (per-model
    solver coefficients fitted by `probflow.coefficients`; floats, or 0-d tensors while they are fitted).
    `index`: the intervals stepped so far."""

    sigmas: tuple[float, ...] = ()
    denoised: tuple[Tensor, ...] = ()
    x_prev: Tensor | None = None
    order_prev: int = 0
    scales: tuple | None = None
    index: int = 0

    def push(self, sigma: float, d: Tensor, keep: int) -> ExpState:
        s = (*self.sigmas, sigma)[-keep:]
        ds = (*self.denoised, d)[-keep:]
        return ExpState(s, ds, self.x_prev, self.order_prev, self.scales, self.index)

    def scale(self, k: int, which: int):
        """1 + a_k (which = 0) or 1 + b_k (which = 1); 1.0 without scales."""
        if self.scales is None:
            return 1.0
        if k >= len(self.scales):
            raise ValueError(f"state.scales: expected one (a, b) pair per grid interval, got {len(self.scales)} "
                             f"for a grid of at least {k + 1} intervals")
        return 1 + self.scales[k][which]


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
    """Σ_j w_j t_j: one new tensor, then fused in-place multiply–adds (the per-step overhead of a solver)."""
    out = tensors[0] * weights[0]
    for w, t in zip(weights[1:], tensors[1:], strict=True):
        if isinstance(w, Tensor):  # a coefficient being fitted (autograd): out of place
            out = out + t * w
        else:
            out.add_(t, alpha=w)
    return out


def _denoise(field: DDIMField, xbar: Tensor, sigma: Tensor) -> Tensor:
    """D = x̄ − σ ε(x̄/sqrt(1+σ²), σ) (one NFE)."""
    return xbar.sub(field(sigma, xbar), alpha=float(sigma))


def _heun_from_zero(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """A Heun step of Eq. 12 in σ (ε-form), used for the step away from σ = 0 where λ = +∞."""
    e0 = field(sigma, xbar)
    dsig = sigma_next - sigma
    e1 = field(sigma_next, xbar + dsig * e0)
    return xbar + 0.5 * dsig * (e0 + e1)


def _rk_to_zero(field: DDIMField, xbar: Tensor, sigma: Tensor, d0: Tensor, order: int) -> Tensor:
    """The singlestep methods' step σ → 0 in σ, where Eq. 12 (ε-form) is regular: explicit midpoint (order 2)
    or Heun's third-order method (nodes σ, 2σ/3, σ/3); neither evaluates the model at σ = 0."""
    dsig = -sigma
    k1 = (xbar - d0) / sigma  # ε at (x̄, σ), already evaluated as D
    if order == 2:
        return xbar + dsig * field(sigma / 2, xbar + 0.5 * dsig * k1)
    k2 = field(sigma * (2 / 3), xbar + dsig / 3 * k1)
    k3 = field(sigma / 3, xbar + dsig * (2 / 3) * k2)
    return xbar + dsig * (0.25 * k1 + 0.75 * k3)


def _lam(sigma: float) -> float:
    return -math.log(sigma)


# --------------------------------------------------------------------------------------------- multistep


def _two_stage(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, d0: Tensor) -> Tensor:
    """One DPM-Solver++(2S) step (stage at λ + h/2, exact linear integral), given D at the start."""
    lam, lam_next = _lam(float(sigma)), _lam(float(sigma_next))
    lm = 0.5 * (lam + lam_next)
    decay, w = exp_weights(lam, lm, [lam])
    dm = _denoise(field, _combine([decay, w[0]], [xbar, d0]), sigma.new_tensor(math.exp(-lm)))
    decay, w = exp_weights(lam, lam_next, [lam, lm])
    return _combine([decay, *w], [xbar, d0, dm])


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
        if state is not None and state.scales is not None:
            raise ValueError(f"state.scales: {name} takes no fitted coefficients (UniPC's methods do)")
        state = state or ExpState()
        st = state.push(s, _denoise(field, xbar, sigma), order)
        if order >= 3 and len(st.sigmas) == 1 and sn > 0.0:  # cold start: one 2S step keeps the order
            return _two_stage(field, xbar, sigma, sigma_next, st.denoised[0]), st
        if sn == 0.0:
            return _combine(zero_weights(list(st.sigmas)), list(st.denoised)), st
        decay, w = exp_weights(_lam(s), _lam(sn), [_lam(x) for x in st.sigmas][::-1])
        return _combine([decay, *w], [xbar, *st.denoised[::-1]]), st

    return step


# -------------------------------------------------------------------------------------------- singlestep


def singlestep_step(order: int):
    """DPM-Solver++(2S) (stage at r = 1/2) or (3S) (stages at r = 1/3, 2/3) in exact-integral form;
    into σ = 0, a Runge–Kutta step in σ with as many stages (`_rk_to_zero`). Stateless."""
    if order not in (2, 3):
        raise ValueError(f"order: singlestep methods of order 2 or 3, got {order}")

    def step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state):
        s, sn = float(sigma), float(sigma_next)
        if s == 0.0:
            return _heun_from_zero(field, xbar, sigma, sigma_next), None
        lam = _lam(s)
        d0 = _denoise(field, xbar, sigma)
        if sn == 0.0:  # λ_next = +∞: an RK step in σ (ε-form, regular at 0) with the same number of stages
            return _rk_to_zero(field, xbar, sigma, d0, order), None
        h = _lam(sn) - lam
        rs = [0.5] if order == 2 else [1 / 3, 2 / 3]
        nodes, ds = [lam], [d0]
        for r in rs:
            ls = lam + r * h
            # stage j: exact integral of the interpolant through the stages so far (order 1, then 2)
            decay, w = exp_weights(lam, ls, nodes)
            xs = _combine([decay, *w], [xbar, *ds])
            nodes.append(ls)
            ds.append(_denoise(field, xs, sigma.new_tensor(math.exp(-ls))))
        if order == 3:  # DPM-Solver-3: the final combination uses D0 and the stage at 2/3 only
            nodes, ds = [nodes[0], nodes[2]], [ds[0], ds[2]]
        decay, w = exp_weights(lam, lam + h, nodes)
        return _combine([decay, *w], [xbar, *ds]), None

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

    def predict(xbar, lam, lam_next, lams, ds, p, k=1.0):
        """UniP-p from x̄ at λ (D history `ds` at `lams`, current last) to λ_next; k scales the higher-order
        part (`ExpState.scales`)."""
        h = lam_next - lam
        decay, b_h, rhs = _unipc_coefficients(h, [], p)
        if p == 1:
            return _combine([decay, b_h], [xbar, ds[-1]])
        rks = [(lams[-1 - i] - lam) / h for i in range(1, p)]
        if p == 2:
            rho = [0.5]
        else:
            r = np.array([[rk ** (m - 1) for rk in rks] for m in range(1, p)])
            rho = [float(v) for v in np.linalg.solve(r, np.array(rhs[: p - 1]))]
        c = [k * b_h * rho[i] / rks[i] for i in range(p - 1)]  # on (D_{-1-i} − D_0)
        return _combine([decay, b_h - sum(c), *c], [xbar, ds[-1], *[ds[-2 - i] for i in range(p - 1)]])

    def correct(x_prev, lam_prev, lam, lams_prev, ds_prev, d_new, p, k=1.0):
        """UniC-p: redo the step λ_prev → λ from x_prev with the new D (at the predicted point) as a node; k
        scales the higher-order part."""
        h = lam - lam_prev
        decay, b_h, rhs = _unipc_coefficients(h, [], p)
        if p == 1:
            rho, rks = [0.5], [1.0]
        else:
            rks = [(lams_prev[-1 - i] - lam_prev) / h for i in range(1, p)] + [1.0]
            r = np.array([[rk ** (m - 1) for rk in rks] for m in range(1, p + 1)])
            rho = [float(v) for v in np.linalg.solve(r, np.array(rhs))]
        c = [k * b_h * rho[i] / rks[i] for i in range(p)]  # on (D_k − D_0), the last k being the new D
        nodes = [ds_prev[-2 - i] for i in range(p - 1)] + [d_new]
        return _combine([decay, b_h - sum(c), *c], [x_prev, ds_prev[-1], *nodes])

    def step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state: ExpState | None):
        s, sn = float(sigma), float(sigma_next)
        if s == 0.0:
            return _heun_from_zero(field, xbar, sigma, sigma_next), ExpState()
        if not isinstance(state, (ExpState, type(None))):
            raise TypeError(f"{name}: state must be an ExpState or None, got {type(state).__name__}")
        state = state or ExpState()
        i = state.index
        d = _denoise(field, xbar, sigma)
        if state.x_prev is not None:
            lams_prev = [_lam(x) for x in state.sigmas]
            xbar = correct(state.x_prev, lams_prev[-1], _lam(s), lams_prev, list(state.denoised), d,
                           state.order_prev, state.scale(i - 1, 1))
        st = state.push(s, d, keep)
        if sn == 0.0:
            n = min(order, len(st.sigmas))
            return _combine(zero_weights(list(st.sigmas[-n:])), list(st.denoised[-n:])), st
        p = min(order, len(st.sigmas))
        lams = [_lam(x) for x in st.sigmas]
        x_next = predict(xbar, lams[-1], _lam(sn), lams, list(st.denoised), p, state.scale(i, 0))
        return x_next, ExpState(st.sigmas, st.denoised, xbar, p, state.scales, i + 1)

    return step


# Declared here, registered by `probflow.solvers` (the one place that builds the registry).
DECLARED = (
    Method("dpmpp_2m", 2, 1, step=multistep_step(2), multistep=True,
           description="DPM-Solver++(2M), exponential integrator in λ, data prediction; last step (E3)"),
    Method("dpmpp_3m", 3, 1, step=multistep_step(3), extra_calls=1, multistep=True,
           description="exponential multistep of order 3 (exact quadratic integral), 2S first step; last (E3)"),
    Method("dpmpp_2s", 2, 2, step=singlestep_step(2),
           description="DPM-Solver++(2S), singlestep, stage at r = 1/2; last step to 0: midpoint in σ"),
    Method("dpmpp_3s", 3, 3, step=singlestep_step(3),
           description="DPM-Solver++(3S), singlestep, stages r = 1/3, 2/3; last step to 0: Heun-3 in σ"),
    Method("unipc", 3, 1, step=unipc_step(2), multistep=True,
           description="UniPC-2 (bh2): UniP-2 predictor + UniC corrector, multistep; last step (E3)"),
    Method("unipc_3", 3, 1, step=unipc_step(3), multistep=True,
           description="UniPC-3 (bh2): UniP-3 predictor + UniC corrector (order 4 inside, 3 from its cold start)"),
    Method("unipc_4", 5, 1, step=unipc_step(4), multistep=True,
           description="UniPC-4 (bh2): UniP-4 predictor + UniC corrector (order 5 inside; lower-order start-up)"),
)

METHOD_NAMES = tuple(m.name for m in DECLARED)
