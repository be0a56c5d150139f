"""The sweep solve of (X1) for multistep decoders (docs/MATH.md §12, (X4)–(X5); the method in `probflow.inversion`'s
docstring): backward sweeps of single-step solves, the history's part of each step frozen as an offset, the offsets
accelerated by Anderson."""

from __future__ import annotations

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.integrate import integrate, scale_in, scale_out
from probflow.inversion.common import maxabs, model_eps, run_step, ulp_tol
from probflow.inversion.steps import _solve_step
from probflow.inversion.surrogate import gauss_field, surrogate_slopes
from probflow.inversion.trajectory import rel_res
from probflow.newton import Anderson

__all__ = ["solve_sweep"]


class _Cached(DDIMField):
    """The field, remembering its last evaluation at each σ: a call at the same σ on the same bytes returns the
    stored ε without calling the model (the model is deterministic; `nfe` counts the model's calls only)."""

    def __init__(self, inner: DDIMField) -> None:  # noqa: D107 (no DDIMField.__init__: nfe is the inner field's)
        self.inner, self.model, self.model_dtype = inner, inner.model, inner.model_dtype
        self.store: dict[float, tuple[Tensor, Tensor]] = {}

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.inner.nfe

    def __call__(self, sigma, xbar: Tensor) -> Tensor:
        key = float(sigma)
        hit = self.store.get(key)
        if hit is not None and hit[0].shape == xbar.shape and torch.equal(hit[0], xbar):
            return hit[1].clone()
        eps = self.inner(sigma, xbar)
        self.store[key] = (xbar.clone(), eps)
        return eps.clone()


def _probe(m, state, s: Tensor, s_next: Tensor, s_prev: Tensor) -> tuple[float, float]:
    """(q, b) of a step with history `state`, probed on scalars (the step is linear in y, D(y), the history's D
    values and its previous point): b = ∂Φ/∂D(y) with the history frozen; q = κ·σ_prev/σ, κ = ∂Φ/∂x̄_prev for a
    state that carries the previous corrected point (UniPC; else 0), divided by the exponential predictor's decay
    σ/σ_prev that maps that point to this step's input (X5)."""
    one = torch.ones(1, 1, dtype=torch.float64)
    s, s_next = s.double().cpu(), s_next.double().cpu()
    zero_d = tuple(0 * one for _ in state.denoised)
    prev = getattr(state, "x_prev", None)
    unit_d = DDIMField(lambda x, t: (x * torch.sqrt(1 + t * t) - 1) / t)  # D ≡ 1
    b = run_step(unit_d, m, 0 * one, s, s_next, type(state)(state.sigmas, zero_d, None if prev is None else 0 * one,
                                                             state.order_prev))[0]
    if prev is None:
        return 0.0, float(b)
    kappa = run_step(gauss_field(0 * one), m, 0 * one, s, s_next,
                     type(state)(state.sigmas, zero_d, one, state.order_prev))[0]
    return float(kappa) * float(s_prev) / float(s), float(b)


class _Linear:
    """Ψ(y) = a·y + β·D(y, σ) = (a + β)·y − β·σ·ε(y, σ) as a step for `_solve_step` (one call)."""

    backend, name = "probflow", "sweep"

    def __init__(self, a: float, beta: float) -> None:
        self.a, self.beta = a, beta

    def step(self, field, y, s, s_next, state):
        return (self.a + self.beta) * y - (self.beta * float(s)) * field(s, y), None


def _pass(field, m, xs: Tensor, sigmas: Tensor):
    """The teacher-forced pass of the decoder's steps over the trajectory xs (N, B, *S) (through the cache: free
    where the sweep already evaluated each x̄_i). Returns (Φ_i(x̄_i; h_i), ε_i = ε(x̄_i, σ_i), q_i)."""
    n = xs.shape[0]
    phi, eps, q, bf = torch.empty_like(xs), torch.empty_like(xs), [0.0] * n, [0.0] * n
    state = None
    for i in range(n):
        if i > 0:
            q[i], bf[i] = _probe(m, state, sigmas[i], sigmas[i + 1], sigmas[i - 1])
        phi[i], state = run_step(field, m, xs[i], sigmas[i], sigmas[i + 1], state)
        eps[i] = field(sigmas[i], xs[i])
    return phi, eps, q, bf


def _rel_steps(r: Tensor, nxt: Tensor) -> Tensor:
    """max over samples of |R_i|_∞ / max(1, |x̄_{i+1}|_∞), per step (N,)."""
    n, b = r.shape[:2]
    ra, na = r.reshape(n, b, -1).abs().amax(2), nxt.reshape(n, b, -1).abs().amax(2).clamp_min(1.0)
    return (ra / na).amax(1).double().cpu()


def _maps(sigmas: Tensor, bf: list[float], theta: float) -> list[_Linear]:
    """Ψ_i for i ≥ 1: a = σ_{i+1}/σ_i, β = I_0 + θ·(b_i − I_0), I_0 = 1 − σ_{i+1}/σ_i (θ = 0: the first-order
    step; θ = 1: the step's own weight on D(y))."""
    sg = sigmas.double().cpu().tolist()
    return [_Linear(sg[i + 1] / sg[i], (1 - sg[i + 1] / sg[i]) * (1 - theta) + theta * bf[i])
            for i in range(len(sg) - 1)]


def _psi(maps, xs: Tensor, eps: Tensor, sigmas: Tensor) -> Tensor:
    """Ψ_i(x̄_i) for every i, from the stored ε_i (no call)."""
    return torch.stack([(mp.a + mp.beta) * xs[i] - (mp.beta * float(sigmas[i])) * eps[i] for i, mp in
                        enumerate(maps)])


def _offsets(phi: Tensor, psi: Tensor, r: Tensor, q: list[float]) -> Tensor:
    """(X5): c_i = Φ_i − Ψ_i(x̄_i) + q_i·R_{i−1}, c_0 = 0 (step 0 has no history: it is solved as it is)."""
    c = phi - psi
    c[0] = 0
    for i in range(1, len(q)):
        if q[i]:
            c[i] += q[i] * r[i - 1]
    return c


def _sweep(field, m, maps, xs, psi0, phi0, c, x_end, sigmas, slopes, tol, max_iter, memory, feps):
    """One backward sweep (X4): x̄_i from Ψ_i(x̄_i) = x̄_{i+1} − c_i, i = N−1 … 0 (step 0: the method's own first
    step), each from the Newton guess of the surrogate slope at the previous x̄_i (no call where that point already
    solves it). Returns the new trajectory."""
    n = xs.shape[0]
    new, tgt = torch.empty_like(xs), x_end
    pre0 = (lambda v: scale_in(scale_out(v, sigmas[0]), sigmas[0]))
    for i in range(n - 1, -1, -1):
        target, tol_i = tgt - c[i], float(tol[i])
        r0 = target - (phi0 if i == 0 else psi0[i])
        if bool((maxabs(r0) <= ulp_tol(target, tol_i)).all()):
            new[i] = xs[i]
        else:
            guess = xs[i] + r0 / slopes[i].to(xs).reshape(-1, *([1] * (xs.ndim - 2)))
            y = _solve_step(field, m if i == 0 else maps[i], target, guess, sigmas[i], sigmas[i + 1], slopes[i], tol_i,
                            max_iter, memory, floor_eps=feps, pre=pre0 if i == 0 else None)[0]
            new[i] = pre0(y) if i == 0 else y
        tgt = new[i]
    return new


def _slopes(m, maps, sigmas: Tensor, s2: Tensor) -> Tensor:
    """The surrogate's slope of each step's map per sample (N, B): a + β·s²/(s² + σ_i²); step 0 the method's."""
    sg = sigmas.double().cpu()
    out = torch.stack([mp.a + mp.beta * s2 / (s2 + sg[i] ** 2) for i, mp in enumerate(maps)])
    out[0] = surrogate_slopes(m, sigmas[:2], s2)[0]
    return out


def solve_sweep(field, m, x_end, sigmas, s2, tol, max_iter, memory, patience=2, eta=0.1, theta=0.0):
    """(X1) by sweeps (module docstring). Returns (X (N, B, *S), sweeps, best relative residual per sample, its
    failure bound, history) as `solve_trajectory`; the caller falls back to it where the sweeps do not converge."""
    n, b = len(sigmas) - 1, x_end.shape[0]
    slopes = None
    cf = _Cached(field)
    scale = torch.rsqrt(1 + sigmas.double() ** 2)[:n].to(x_end.device).reshape(n, 1, *([1] * (x_end.ndim - 1)))
    xs = integrate(cf, x_end, sigmas.flip(0), m, trajectory=True).trajectory.flip(0)[:n].contiguous()
    xs[0] = scale_in(scale_out(xs[0], sigmas[0]), sigmas[0])  # x̄_0 as the decoder sees it through x_T
    bound = torch.full((b,), tol, dtype=torch.float64)
    feps = model_eps(field, x_end.dtype)
    fail = 256 * bound + 64 * n * feps
    acc, c = Anderson(memory), None
    best_r = torch.full((b,), float("inf"), dtype=torch.float64)
    best = xs.clone()
    stall = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    history, sweeps = [], 0
    while True:
        phi, eps, q, bf = _pass(cf, m, xs, sigmas)
        if slopes is None:
            maps = _maps(sigmas, bf, theta)
            slopes = _slopes(m, maps, sigmas, s2)
        nxt = torch.cat([xs[1:], x_end[None]])
        r = nxt - phi
        rel = rel_res(r, nxt)
        better = (rel < best_r) & ~done
        best_r = torch.where(better, rel, best_r)
        best[:, better.to(xs.device)] = xs[:, better.to(xs.device)]
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        done = done | (best_r <= bound) | ((stall >= patience) & (best_r <= fail))
        history.append(float(rel[~done].max()) if bool((~done).any()) else float(best_r.max()))
        if bool(done.all()) or sweeps >= max_iter:
            break
        psi = _psi(maps, xs, eps, sigmas)
        c_new = _offsets(phi, psi, r, q)
        if c is None or bool((rel[~done] > 1e3 * best_r[~done]).any()):
            acc, c = Anderson(memory), c_new
        else:
            g = ((c_new - c) * scale).transpose(0, 1)
            c = acc.next((c * scale).transpose(0, 1), g).transpose(0, 1) / scale
        tol_k = (eta * _rel_steps(r, nxt)).clamp_min(tol)
        xs = _sweep(cf, m, maps, xs, psi, phi[0], c, x_end, sigmas, slopes, tol_k, max_iter, memory, feps)
        sweeps += 1
    return best, sweeps, best_r, fail, history
