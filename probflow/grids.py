"""σ grids: strictly decreasing float64 tensors from σ_max to (by default) 0 (MATH.md §6).

A grid is data and its order is the direction of integration: a decreasing grid generates, the same grid
flipped encodes. `steps` is always the number of steps, so a grid has `steps + 1` points.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probflow.schedules import Schedule

__all__ = ["check_grid", "ddim", "karras", "log_uniform"]


def check_grid(sigmas: Tensor, name: str = "sigmas") -> Tensor:
    """Validate a σ grid: 1-D, at least 2 points, finite, non-negative, strictly monotone (either way).

    Returns it as a float64 tensor; raises ValueError naming `name` otherwise.
    """
    if not isinstance(sigmas, Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D grid of at least 2 σ values, got shape {tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {sigmas.dtype}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"{name}: contains NaN or Inf: {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"{name}: σ must be non-negative, got min {float(sigmas.min())}")
    d = sigmas[1:] - sigmas[:-1]
    if not ((d < 0).all() or (d > 0).all()):
        raise ValueError(
            f"{name}: must be strictly monotone (decreasing to sample, increasing to encode); got {sigmas.tolist()}"
        )
    return sigmas


def _finish(sig: Tensor, final_zero: bool) -> Tensor:
    if final_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    return check_grid(sig)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")


def ddim_timesteps(schedule: Schedule, steps: int, spacing: str = "uniform") -> Tensor:
    """DDIM's decreasing subsequence of integer timesteps, "trailing" so that the first is T−1.

    uniform:   t_k = round(k·T/steps) − 1,        k = steps … 1   (diffusers' "trailing" spacing)
    quadratic: t_k = round((T−1)·(k/steps)²),     k = steps … 1   (DDIM paper's quadratic, made strictly
               increasing in k where rounding would repeat a timestep)
    """
    _check_steps(steps)
    T = schedule.T  # noqa: N806
    if steps > T:
        raise ValueError(f"steps: at most T = {T} for a DDIM grid, got {steps}")
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    if spacing == "uniform":
        t = torch.round(k * T / steps).long() - 1
    elif spacing == "quadratic":
        t = torch.round((T - 1) * (k / steps) ** 2).long()
        for i in range(1, steps):  # keep the subsequence strictly increasing where rounding collides
            t[i] = max(int(t[i]), int(t[i - 1]) + 1)
        if int(t[-1]) != T - 1:
            raise ValueError(f"steps: {steps} is too many for a quadratic grid on T = {T}")
    else:
        raise ValueError(f"spacing: expected 'uniform' or 'quadratic', got {spacing!r}")
    return t.flip(0)


def ddim(schedule: Schedule, steps: int, spacing: str = "uniform", final_zero: bool = True) -> Tensor:
    """σ at DDIM's trailing timesteps (`ddim_timesteps`), then σ = 0 (ᾱ = 1, `set_alpha_to_one`)."""
    t = ddim_timesteps(schedule, steps, spacing)
    return _finish(schedule.sigmas[t], final_zero)


def karras(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0, final_zero: bool = True) -> Tensor:
    """Karras et al. (2022): σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then 0.

    With `final_zero`, N = `steps` points and a last step into 0; without, N = steps + 1.
    """
    _check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    n = steps if final_zero else steps + 1
    if n == 1:
        return _finish(torch.tensor([float(sigma_max)], dtype=torch.float64), final_zero)
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _finish((a + i * (b - a)) ** rho, final_zero)


def log_uniform(sigma_max: float, sigma_min: float, steps: int, final_zero: bool = True) -> Tensor:
    """σ uniform in log σ (= uniform in log-SNR λ = −log σ) from σ_max to σ_min, then 0."""
    _check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    n = steps if final_zero else steps + 1
    if n == 1:
        return _finish(torch.tensor([float(sigma_max)], dtype=torch.float64), final_zero)
    s = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
    s[0], s[-1] = sigma_max, sigma_min
    return _finish(s, final_zero)
