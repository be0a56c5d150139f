"""The trajectory solve of (X1) for multistep decoders: all N steps as one unknown (docs/MATH.md §12; the method in
`probflow.inversion`'s docstring)."""

from __future__ import annotations

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.inversion.common import HINT, InversionError, bmask, halving, model_eps, residuals
from probflow.inversion.surrogate import surrogate_inverse
from probflow.newton import Anderson

__all__ = ["solve_trajectory", "trajectory_error"]


def solve_trajectory(field, m, x_end, sigmas, s2, tol, max_iter, memory, patience=2):
    """(X1) on the whole trajectory: Anderson on X ← X − A⁻¹R(X) (module docstring). Returns (X (N, B, *S),
    passes, best relative residual per sample, its bound, history)."""
    n, b = len(sigmas) - 1, x_end.shape[0]
    ainv = surrogate_inverse(m, sigmas, s2).to(x_end.device)  # (B, N, N)
    scale = torch.rsqrt(1 + sigmas.double() ** 2)[:n].to(x_end.device).reshape(n, 1, *([1] * (x_end.ndim - 1)))
    reuse = _Reuse(field)  # the first pass runs on the warm start's own points: their calls are reused
    # warm start: the explicit encode (its trajectory not kept beyond the copy)
    xs = integrate(reuse, x_end, sigmas.flip(0), m, trajectory=True).trajectory.flip(0)[:n].contiguous()
    bound = torch.full((b,), tol, dtype=torch.float64)
    fail = 256 * bound + 64 * n * model_eps(field, x_end.dtype)
    # a residual within 4 ulps of the largest term of its step's evaluation (x̄_i, x̄_{i+1}) is that evaluation's
    # round-off: accepted at once instead of after `patience` passes that cannot improve it; within 8 ulps (a
    # multistep step also adds its history's terms) once it has not halved in `patience` passes: fluctuating there
    ulp4 = 4 * torch.finfo(x_end.dtype).eps
    acc = Anderson(memory)
    best_r = torch.full((b,), float("inf"), dtype=torch.float64)
    best_f = best_r.clone()
    best = xs.clone()
    stall = torch.zeros(b, dtype=torch.long)
    halved, since = best_r.clone(), torch.zeros(b, dtype=torch.long)  # best residual at its last halving, passes since
    done = torch.zeros(b, dtype=torch.bool)  # at the tolerance: frozen at its best iterate
    accepted = done.clone()  # at round-off or stalled below the failure bound
    history, passes = [], 0
    while True:
        r = residuals(field if reuse is None else reuse, m, xs, x_end, sigmas)
        reuse = None  # freed: later iterates are new points
        passes += 1
        rel, ratio = residual_norms(r, xs, x_end, ulp4)
        better = (rel < best_r) & ~done  # an accepted sample goes on while others run: its best can only fall
        best_r = torch.where(better, rel, best_r)
        best_f = torch.where(better, ratio, best_f)
        best[:, better.to(xs.device)] = xs[:, better.to(xs.device)]
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        halved, since = halving(best_r, halved, since)
        at_roundoff = (best_f <= 1) | ((best_f <= 2) & (since >= patience))
        # at the tolerance, or accepted and wandering off (its best kept): frozen from here on
        done = done | (best_r <= bound) | (accepted & (rel > 1e3 * best_r))
        accepted = accepted | ((at_roundoff | (stall >= patience)) & (best_r <= fail))
        open_ = ~(done | accepted)
        history.append(float(rel[open_].max()) if bool(open_.any()) else float(best_r.max()))
        if bool((~open_).all()) or passes > max_iter:
            break
        if bool((rel[open_] > 1e3 * best_r[open_]).any()):  # diverging: restart from the best iterate
            acc, xs = Anderson(memory), best.clone()
            continue
        delta = -torch.einsum("bij,jb...->ib...", ainv, r.double()).to(xs.dtype)  # Newton with the surrogate
        u = (xs * scale).transpose(0, 1)  # (B, N, *S): per-sample vectors for Anderson, on the data's scale
        nxt = acc.next(u, (delta * scale).transpose(0, 1)).transpose(0, 1) / scale
        xs = torch.where(bmask(done, xs[0])[None], best, nxt.to(xs.dtype))
    return best, passes, best_r, fail, history


class _Reuse(DDIMField):
    """The field, remembering its last evaluation at each σ: a call at the same σ on the same bytes returns that ε
    without calling the model (deterministic by assumption, as everywhere in the solve: the verification decodes
    from x_T alone). `nfe` is the model's own count. Memory: one state and one ε per grid point, what the
    trajectory solve's Anderson history (not yet filled during the first pass) is budgeted for."""

    def __init__(self, inner: DDIMField) -> None:  # no DDIMField.__init__: the inner field counts the calls
        self.inner, self.model, self.model_dtype = inner, inner.model, inner.model_dtype
        self.seen: dict[float, tuple[Tensor, Tensor]] = {}

    @property
    def nfe(self) -> int:  # type: ignore[override]
        return self.inner.nfe

    def __call__(self, sigma, xbar: Tensor) -> Tensor:
        hit = self.seen.get(float(sigma))
        if hit is not None and hit[0].shape == xbar.shape and torch.equal(hit[0], xbar):
            return hit[1].clone()
        eps = self.inner(sigma, xbar)
        self.seen[float(sigma)] = (xbar.clone(), eps)
        return eps.clone()


def residual_norms(r: Tensor, xs: Tensor, x_end: Tensor, ulps: float) -> tuple[Tensor, Tensor]:
    """Per sample, float64 on the CPU (r, xs: (N, B, *S); x_end: (B, *S)): the relative residual
    max_i |R_i|_∞ / max(1, |x̄_{i+1}|_∞), and the round-off ratio max_i |R_i|_∞ / (ulps·max(1, |x̄_i|_∞, |x̄_{i+1}|_∞)),
    ≤ 1 where every step's residual is within `ulps` of the largest state its evaluation adds (the round-off of R_i
    itself; a large-σ step's x̄_i is 1.5–2.6× its x̄_{i+1} on 20 steps). Norms per step, no copy of the trajectory."""
    n, b = r.shape[:2]
    inf = float("inf")
    ra = torch.linalg.vector_norm(r.reshape(n, b, -1), inf, dim=2).double().cpu()
    a = torch.cat([torch.linalg.vector_norm(xs.reshape(n, b, -1), inf, dim=2),
                   torch.linalg.vector_norm(x_end.reshape(1, b, -1), inf, dim=2)]).double().cpu().clamp_min(1.0)
    return (ra / a[1:]).amax(0), (ra / (ulps * torch.maximum(a[:-1], a[1:]))).amax(0)


def trajectory_error(m, sigmas, r, b, passes, history) -> InversionError:
    j = int(torch.argmax(r / b))
    fell = _still_falling(history, float(b[j]))
    still = (f"; it was still converging (its best residual fell {fell:.1f}× over the last 10 passes; such rates "
             f"slow down: more passes, encode_exact's max_iter, may reach the tolerance)") if fell is not None else ""
    return InversionError(
        f"encode_exact: the {m.name} trajectory solve (σ = {float(sigmas[0]):.6g} → {float(sigmas[-1]):.6g}, "
        f"{len(sigmas) - 1} steps) did not converge in {passes} passes: residual {float(r[j]):.3e} > tolerance "
        f"{float(b[j]):.3e} (sample {j}, relative to max(1, |x̄|)){still}; the latent would not be exact; {HINT}")


def _still_falling(history: list[float], bound: float, window: int = 10) -> float | None:
    """How far the best residual fell over the last `window` passes (the best of each window: the history's
    residual fluctuates), where it fell by at least half and is still above `bound`; else None. Measured on the
    digits network, the rate slows as the solve goes on: no estimate of the passes still needed is given."""
    if len(history) < 2 * window:
        return None
    old, new = min(history[-2 * window:-window]), min(history[-window:])
    return old / new if 0 < new <= old / 2 and new > bound else None
