"""Noise schedules as float64 tables of ᾱ_t and σ_t (docs/MATH.md §1, §5).

σ = sqrt((1 − ᾱ)/ᾱ) is the noise-to-signal ratio; ᾱ = 1/(1 + σ²). A discrete-time (DDPM) model is
trained on a table ᾱ_t, t = 0 … T−1; solvers ask for ε at arbitrary σ, so `Schedule.t` maps σ to a
continuous t by interpolating t against log σ_t (monotone, exact at the table's own σ_t, clamped to
[0, T−1]). Integer timesteps live only here and in the discrete-time adapter.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "alpha_bar_to_sigma",
    "sigma_to_alpha_bar",
    "from_betas",
    "linear",
    "scaled_linear",
    "cosine",
    "by_name",
    "check_T",
    "MAX_SIGMA",
]


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """σ = sqrt((1 − ᾱ)/ᾱ) (docs/MATH.md §1)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return torch.sqrt((1.0 - alpha_bar) / alpha_bar)


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """ᾱ = 1/(1 + σ²) (docs/MATH.md §1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma**2)


MAX_SIGMA = 1e100  # σ above this makes sqrt(1 + σ²)·x overflow float64 in practice (σ² alone overflows at 1.3e154)


MAX_T = 10**7  # a table longer than this (80 MB per float64 copy) is no trained model's; from_betas has no bound


def check_T(T: object, name: str = "T") -> int:  # noqa: N802
    """A table length: an integer in [2, MAX_T] (ValueError naming `name` otherwise)."""
    if isinstance(T, bool) or not isinstance(T, numbers.Integral) or not 2 <= T <= MAX_T:
        raise ValueError(f"{name}: expected an integer number of timesteps in [2, {MAX_T:.0e}], got {T!r}")
    return int(T)


def _check_beta(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < 1:
        raise ValueError(f"{name}: expected a number in (0, 1), got {v!r}")
    return float(v)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A DDPM table: `alpha_bar[t]` for t = 0 … T−1 (float64, strictly decreasing)."""

    name: str
    alpha_bar: Tensor

    def __post_init__(self) -> None:
        ab = torch.as_tensor(self.alpha_bar, dtype=torch.float64).detach().cpu()
        if ab.ndim != 1 or ab.numel() < 2:
            raise ValueError(f"alpha_bar: expected a 1-D table of at least 2 entries, got shape {tuple(ab.shape)}")
        if not torch.isfinite(ab).all() or (ab <= 0).any() or (ab >= 1).any():
            raise ValueError("alpha_bar: every entry must lie strictly between 0 and 1")
        if not (ab[1:] < ab[:-1]).all():
            raise ValueError("alpha_bar: the table must be strictly decreasing in t")
        if float(alpha_bar_to_sigma(ab[-1])) > MAX_SIGMA:
            raise ValueError(f"alpha_bar: the last entry {float(ab[-1]):.3g} gives σ_max above {MAX_SIGMA:g}, where "
                             "x̄ = x·sqrt(1 + σ²) overflows float64")
        object.__setattr__(self, "alpha_bar", ab)
        object.__setattr__(self, "_log_sigmas", torch.log(alpha_bar_to_sigma(ab)))

    @property
    def T(self) -> int:  # noqa: N802 - T is the standard symbol
        return self.alpha_bar.numel()

    @property
    def sigmas(self) -> Tensor:
        """σ_t for t = 0 … T−1, float64, strictly increasing."""
        return alpha_bar_to_sigma(self.alpha_bar)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t(self, sigma: Tensor | float) -> Tensor:
        """Continuous timestep t(σ) in float64 (docs/MATH.md §5).

        Piecewise-linear in log σ between table points, so t(σ_k) = k exactly; σ below σ_0 (σ = 0
        included) maps to 0 and σ above σ_{T−1} to T−1.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_s = self._log_sigmas
        ls = torch.log(sigma.clamp(min=float(self.sigmas[0]), max=float(self.sigmas[-1])))
        k = torch.searchsorted(log_s, ls, right=True).clamp(1, self.T - 1) - 1
        lo, hi = log_s[k], log_s[k + 1]
        w = ((ls - lo) / (hi - lo)).clamp(0.0, 1.0)
        return k.to(torch.float64) + w

    def sigma(self, t: Tensor | float) -> Tensor:
        """σ at a (possibly fractional) timestep: the inverse of `t`, linear in log σ between points."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.isfinite(t).all() or (t < 0).any() or (t > self.T - 1).any():
            raise ValueError(f"t: expected values in [0, {self.T - 1}], got {t}")
        k = t.floor().long().clamp(max=self.T - 2)
        w = t - k
        log_s = self._log_sigmas
        return torch.exp(log_s[k] + w * (log_s[k + 1] - log_s[k]))


def from_betas(betas: Tensor, name: str = "custom") -> Schedule:
    """ᾱ_t = Π_{s≤t} (1 − β_s); every β_t a finite number in (0, 1) (ValueError naming `name` otherwise)."""
    try:
        betas = torch.as_tensor(betas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: expected a 1-D list of numbers (β_t), got {type(betas).__name__}") from None
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D table of at least 2 β_t, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
        raise ValueError(f"{name}: every β_t must be a finite number in (0, 1)")
    return Schedule(name, torch.cumprod(1.0 - betas, dim=0))


def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:  # noqa: N803
    """DDPM's linear β schedule (Ho et al. 2020): β linear from 1e-4 to 0.02 over T = 1000 steps."""
    T, beta_start, beta_end = check_T(T), _check_beta(beta_start, "beta_start"), _check_beta(beta_end, "beta_end")  # noqa: N806
    return from_betas(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), "linear")


def scaled_linear(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Schedule:  # noqa: N803
    """Latent-diffusion's "scaled_linear": sqrt(β) linear, then squared."""
    T, beta_start, beta_end = check_T(T), _check_beta(beta_start, "beta_start"), _check_beta(beta_end, "beta_end")  # noqa: N806
    b = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    return from_betas(b, "scaled_linear")


def cosine(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:  # noqa: N803
    """Nichol & Dhariwal's cosine schedule, ᾱ(t) ∝ cos²((t/T + s)/(1 + s)·π/2), with β capped at 0.999.

    Built from betas the way diffusers' `squaredcos_cap_v2` is, so that checkpoints trained with it map
    onto the same table.
    """

    check_T(T)
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < 1e6:
        raise ValueError(f"s: expected a finite offset >= 0, got {s!r}")
    _check_beta(max_beta, "max_beta")

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return from_betas(torch.tensor(betas, dtype=torch.float64), "cosine")


_BY_NAME = {"linear": linear, "scaled_linear": scaled_linear, "cosine": cosine, "squaredcos_cap_v2": cosine}


def by_name(name: str, T: int = 1000) -> Schedule:  # noqa: N803
    """A schedule by name: linear, scaled_linear, cosine (alias squaredcos_cap_v2)."""
    if name not in _BY_NAME:
        raise ValueError(f"schedule: unknown name {name!r}; expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[name](T)
