"""What every part of the exact inversion (`probflow.inversion`) shares: its error, the decoder step as the
decoder runs it, the teacher-forced residuals of a trajectory (docs/MATH.md §12, (X1)), and per-sample norms."""

from __future__ import annotations

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.solvers import Method

__all__ = ["HINT", "InversionError", "bmask", "halving", "maxabs", "model_eps", "residuals", "run_step", "ulp_tol"]

HINT = ("try more steps (a shorter last step), another grid (one that ends above σ = 0, e.g. quadratic_open), or a "
        "float64 state and network")


class InversionError(ValueError):
    """The implicit solve (X1) did not reach its tolerance: the latent would not be exact."""


def run_step(field: DDIMField, m: Method, y: Tensor, s: Tensor, s_next: Tensor, state=None):
    """(x̄_next, state): one decoder step σ → σ_next as the decoder runs it (its step function, or integrate)."""
    if m.backend == "probflow":
        with torch.no_grad():
            return m.step(field, y, s, s_next, state)
    return integrate(field, y, torch.stack([s, s_next]), m).x, None


def residuals(field: DDIMField, m: Method, xs: Tensor, target: Tensor, sigmas: Tensor) -> Tensor:
    """Teacher-forced residuals R_i = x̄_{i+1} − Φ_i(x̄_i; h_i), i = 0 … N−1, of the trajectory xs (N, B, *S) with
    x̄_N = target: each step runs on the iterate's own x̄_i, its history from the same pass (one call per step)."""
    n = xs.shape[0]
    out = torch.empty_like(xs)
    state = None
    for i in range(n):
        y, state = run_step(field, m, xs[i], sigmas[i], sigmas[i + 1], state)
        out[i] = (xs[i + 1] if i + 1 < n else target) - y
    return out


def maxabs(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).abs().amax(1).double().cpu()


def ulp_tol(x: Tensor, tol: float) -> Tensor:
    return tol * maxabs(x).clamp_min(1.0)  # per-sample bound tol·max(1, |x|_∞)


def halving(best: Tensor, ref: Tensor, since: Tensor) -> tuple[Tensor, Tensor]:
    """(ref, since) per sample, updated with the best residual `best`: the best residual at its last halving, and the
    iterations since (the solves' test for a residual that has stopped converging and fluctuates at round-off)."""
    half = best <= ref / 2
    return torch.where(half, best, ref), torch.where(half, torch.zeros_like(since), since + 1)


def bmask(mask: Tensor, like: Tensor) -> Tensor:  # (B,) → broadcastable over like
    return mask.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def model_eps(field: DDIMField, dtype: torch.dtype) -> float:
    """4·eps of the dtype the network computes in, when lower than the state's (else 0)."""
    md = field.model_dtype or getattr(field.model, "model_dtype", None)
    if md is None or not md.is_floating_point or torch.finfo(md).eps <= torch.finfo(dtype).eps:
        return 0.0
    return 4 * torch.finfo(md).eps
