"""The Gaussian surrogate that preconditions the exact inversion's solves (docs/MATH.md §12).

For data N(0, s²I) the denoiser is D = s²/(s²+σ²)·x̄, linear, and every decoder step is a linear map in x̄; its
coefficients (one scalar per step, or per pair of steps for multistep history) are computed by running the
method's own step function on that scalar model, with s² the mean square of each sample's x_0. This is the exact
Jacobian of (X1) when ∂D/∂x̄ = s²/(s²+σ²)·I; the iterations correct what the network's D does beyond it."""

from __future__ import annotations

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.inversion.common import residuals, run_step
from probflow.solvers import Method

__all__ = ["gauss_field", "scales", "surrogate_inverse", "surrogate_slopes"]


def gauss_field(s2: Tensor) -> DDIMField:
    """ε of N(0, s2·I), per batch element (s2 of shape (B, 1)): D = s2/(s2+σ²)·x̄, ε = (x̄ − D)/σ."""
    def eps(x: Tensor, sigma: Tensor) -> Tensor:
        return x * torch.sqrt(1 + sigma**2) * sigma / (s2 + sigma**2)
    return DDIMField(eps)


def scales(x0: Tensor) -> Tensor:
    """s² per sample: the mean square of x_0 (at least 1e-4)."""
    return x0.detach().double().reshape(x0.shape[0], -1).pow(2).mean(1).clamp_min(1e-4).cpu()


def surrogate_slopes(m: Method, sigmas: Tensor, s2: Tensor) -> Tensor:
    """a[i, b] = ∂Φ_i/∂y of the surrogate for sample b (single-step methods: Φ_i is linear, a = Φ_i(1))."""
    sig = sigmas.double().cpu()
    f = gauss_field(s2[:, None])
    one = torch.ones(len(s2), 1, dtype=torch.float64)
    return torch.stack([run_step(f, m, one, sig[i], sig[i + 1])[0][:, 0] for i in range(len(sig) - 1)])


def surrogate_inverse(m: Method, sigmas: Tensor, s2: Tensor) -> Tensor:
    """A⁻¹ per sample (B, N, N): A = ∂R/∂X of the teacher-forced residuals R_i = x̄_{i+1} − Φ_i(x̄_i; h_i) for the
    surrogate (linear), column k from the unit trajectory e_k (all columns and samples in one batched pass)."""
    n, b = len(sigmas) - 1, len(s2)
    sig = sigmas.double().cpu()
    eye = torch.eye(n, dtype=torch.float64)
    xs = eye.repeat(b, 1).reshape(b * n, n)  # row (sample, k): the unit trajectory e_k
    r = residuals(gauss_field(s2.repeat_interleave(n)[:, None]), m, xs.T[..., None], torch.zeros(b * n, 1,
                   dtype=torch.float64), sig)  # (N, B·N, 1): R_i of column k
    a = r[..., 0].T.reshape(b, n, n).transpose(1, 2)  # a[b, i, k] = ∂R_i/∂X_k
    return torch.linalg.inv(a)
