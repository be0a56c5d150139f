"""σ grids: strictly decreasing float64 tensors from σ_max to (by default) 0 (docs/MATH.md §6).

Pure builders: tensors in, tensors out, nothing solved (grids adapted to a model by solving the ODE live in
`probflow.calibrate`). A grid is data and its order is the direction of integration: a decreasing grid
generates, the same grid flipped encodes. `steps` is always the number of steps, so a grid has `steps + 1` points.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from probflow.schedules import MAX_SIGMA, Schedule

__all__ = ["MAX_GRID_STEPS", "check_grid", "check_steps", "ddim", "karras", "log_uniform", "log_snr_tuned", "NAMED",
           "named", "t_power"]

MAX_GRID_STEPS = 1_000_000  # default bound on a grid's steps (8 MB); `max_steps=None` lifts it


def check_grid(sigmas: Tensor, name: str = "sigmas") -> Tensor:
    """Validate a σ grid: 1-D, at least 2 points, finite, non-negative, strictly monotone (either way).

    Returns it as a float64 tensor; raises ValueError naming `name` otherwise.
    """
    if not isinstance(sigmas, Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"{name}: expected a 1-D tensor or list of σ values, got {type(sigmas).__name__}") from None
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D grid of at least 2 σ values, got shape {tuple(sigmas.shape)}")
    if not sigmas.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {sigmas.dtype}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"{name}: contains NaN or Inf: {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"{name}: σ must be non-negative, got min {float(sigmas.min())}")
    if (sigmas > MAX_SIGMA).any():
        raise ValueError(f"{name}: σ = {float(sigmas.max()):g} is above {MAX_SIGMA:g}, where x̄ = x·sqrt(1 + σ²) "
                         "overflows float64")
    d = sigmas[1:] - sigmas[:-1]
    if not ((d < 0).all() or (d > 0).all()):
        raise ValueError(
            f"{name}: must be strictly monotone (decreasing to sample, increasing to encode); got {sigmas.tolist()}"
        )
    return sigmas


def with_final_zero(sig: Tensor, final_zero: bool) -> Tensor:
    """Append σ = 0 when `final_zero`, then check the grid."""
    if final_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    return check_grid(sig)


def check_steps(steps: object, max_steps: int | None = MAX_GRID_STEPS) -> int:
    """A step count: a positive integer (not a bool), at most `max_steps` (None: no bound), checked before a
    grid is allocated; ValueError/TypeError naming `steps` otherwise."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps: expected a positive integer, got {type(steps).__name__} {steps!r}")
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    if max_steps is not None and steps > max_steps:
        raise ValueError(f"steps: {steps} is above the limit of {max_steps} (max_steps=; --no-limits in the CLI)")
    return int(steps)


def _check_range(sigma_max: object, sigma_min: object) -> tuple[float, float]:
    ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (sigma_max, sigma_min))
    if not ok or not (0 < sigma_min < sigma_max <= MAX_SIGMA):
        raise ValueError(f"sigma_min, sigma_max: expected numbers with 0 < sigma_min < sigma_max <= {MAX_SIGMA:g}, "
                         f"got {sigma_min!r}, {sigma_max!r}")
    return float(sigma_max), float(sigma_min)


def ddim_timesteps(schedule: Schedule, steps: int, spacing: str = "uniform") -> Tensor:
    """DDIM's decreasing subsequence of integer timesteps, "trailing" so that the first is T−1.

    uniform:   t_k = round(k·T/steps) − 1,        k = steps … 1   (diffusers' "trailing" spacing)
    quadratic: t_k = round((T−1)·(k/steps)²),     k = steps … 1   (DDIM paper's quadratic, made strictly
               increasing in k where rounding would repeat a timestep)
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a probflow Schedule, got {type(schedule).__name__}")
    steps = check_steps(steps)
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
    return with_final_zero(schedule.sigmas[t], final_zero)


def karras(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0, final_zero: bool = True,
           max_steps: int | None = MAX_GRID_STEPS) -> Tensor:
    """Karras et al. (2022): σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then 0.

    With `final_zero`, N = `steps` points and a last step into 0; without, N = steps + 1. ρ in (0, 1000].
    """
    steps = check_steps(steps, max_steps)
    sigma_max, sigma_min = _check_range(sigma_max, sigma_min)
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 < rho <= 1000:
        raise ValueError(f"rho: expected a number in (0, 1000], got {rho!r}")
    n = steps if final_zero else steps + 1
    if n == 1:
        return with_final_zero(torch.tensor([float(sigma_max)], dtype=torch.float64), final_zero)
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    s = (a + i * (b - a)) ** rho
    s[0], s[-1] = sigma_max, sigma_min  # exactly the ends asked for ((σ^{1/ρ})^ρ rounds)
    return with_final_zero(s, final_zero)


def log_uniform(sigma_max: float, sigma_min: float, steps: int, final_zero: bool = True,
                max_steps: int | None = MAX_GRID_STEPS) -> Tensor:
    """σ uniform in log σ (= uniform in log-SNR λ = −log σ) from σ_max to σ_min, then 0."""
    steps = check_steps(steps, max_steps)
    sigma_max, sigma_min = _check_range(sigma_max, sigma_min)
    n = steps if final_zero else steps + 1
    if n == 1:
        return with_final_zero(torch.tensor([float(sigma_max)], dtype=torch.float64), final_zero)
    s = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
    s[0], s[-1] = sigma_max, sigma_min
    return with_final_zero(s, final_zero)


def log_snr_tuned(schedule: Schedule, steps: int, end: float = 3.0, final_zero: bool = True,
                  max_steps: int | None = MAX_GRID_STEPS) -> Tensor:
    """Log-SNR uniform (uniform in λ = −log σ) from the schedule's σ_max to σ_min = `end`·σ_0, then 0.

    Stopping above the table's σ_0 gives the exponential integrators' last step into 0 (probflow.exponential,
    (E3)) nodes that still carry information, and saves λ range for the interior; end = 3 (σ_min ≈ 0.03 on
    the DDPM linear table) was the best of 1, 3, 6 for UniPC at NFE 10–50 on the sharp D = 64 mixture of
    `probflow.bench` (NFE 10: RMSE 0.013 against 0.020 with end = 1).
    """
    if isinstance(end, bool) or not isinstance(end, numbers.Real) or not 1.0 <= end < schedule.sigma_max / \
            schedule.sigma_min:
        raise ValueError(f"end: expected a factor >= 1 on the schedule's σ_0 that stays below σ_max, got {end!r}")
    return log_uniform(schedule.sigma_max, end * schedule.sigma_min, steps, final_zero, max_steps)



# Grids by name, each `builder(schedule, steps)` from the schedule's σ_max to 0 (the CLI's `--grid`, the benchmark).
NAMED: dict[str, Callable[[Schedule, int], Tensor]] = {
    "uniform": lambda s, n: ddim(s, n, "uniform"),        # DDIM trailing, uniform in t
    "quadratic": lambda s, n: ddim(s, n, "quadratic"),    # DDIM trailing, quadratic in t
    # DDIM's quadratic-in-t timesteps for n + 1 points, ending at the smallest one's σ > 0 instead of stepping into
    # σ = 0 (inverting that last step is ill-conditioned on a learned denoiser; probflow.inversion)
    "quadratic_open": lambda s, n: ddim(s, n + 1, "quadratic", final_zero=False),
    "logsnr": lambda s, n: log_uniform(s.sigma_max, s.sigma_min, n, max_steps=None),  # uniform in log σ to σ_0
    "karras": lambda s, n: karras(s.sigma_max, s.sigma_min, n, 7.0, max_steps=None),  # Karras ρ = 7
    "sigma_uniform": lambda s, n: torch.linspace(s.sigma_max, 0.0, n + 1, dtype=torch.float64),  # equal steps in σ
    "log_snr_tuned": lambda s, n: log_snr_tuned(s, n, max_steps=None),    # log-SNR uniform from σ_max to 3σ_0
}


def named(name: str, schedule: Schedule, steps: int, max_steps: int | None = MAX_GRID_STEPS) -> Tensor:
    """The grid `name` (a key of `NAMED`) with `steps` steps on `schedule`, from σ_max to 0; `steps` above
    `max_steps` (None: no bound) is refused before the grid is allocated."""
    if not isinstance(name, str) or name not in NAMED:
        raise ValueError(f"grid: unknown grid {name!r}; expected one of {sorted(NAMED)}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a probflow Schedule, got {type(schedule).__name__}")
    check_steps(steps, max_steps)
    return check_grid(torch.as_tensor(NAMED[name](schedule, steps), dtype=torch.float64), f"grid {name!r}")


def t_power(schedule: Schedule, steps: int, power: float = 2.5, sigma_min: float = 0.03,
            final_zero: bool = True) -> Tensor:
    """σ at continuous timesteps t_j = t_e + (T−1−t_e)·(j/(N−1))^q, j = N−1 … 0, with t_e = t(σ_min) (the
    schedule's continuous t, docs/MATH.md §5), then σ = 0: a power-in-t grid from σ_max (t = T−1) that stops at
    σ_min and takes one last step into 0. Quadratic in t for q = 2 like DDIM's spacing (which is t_k = (T−1)(k/N)²,
    anchored at t = 0 rather than at t_e); a larger q puts more steps at small t. N = `steps` points before 0
    (one step: σ_max, then 0)."""
    check_steps(steps)
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
        raise ValueError(f"power: expected a positive finite number, got {power!r}")
    if not (isinstance(sigma_min, (int, float)) and schedule.sigma_min <= sigma_min < schedule.sigma_max):
        raise ValueError(f"sigma_min: expected a σ in [σ_0, σ_max) = [{schedule.sigma_min:.4g}, "
                         f"{schedule.sigma_max:.4g}), got {sigma_min!r}")
    if steps == 1:
        return with_final_zero(torch.tensor([schedule.sigma_max], dtype=torch.float64), final_zero)
    t_end = float(schedule.t(torch.tensor(float(sigma_min), dtype=torch.float64)))
    j = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    t = t_end + (schedule.T - 1 - t_end) * (j / (steps - 1)) ** power
    return with_final_zero(schedule.sigma(t), final_zero)
