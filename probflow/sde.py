"""Stochastic samplers run through the one integrate path: DDIM with η (Eq. 11) and the reverse-SDE family.

Both are probflow step functions `step(field, x̄, σ, σ_next, state) -> (x̄_next, state)` on a *decreasing*
σ grid, in x̄ (docs/MATH.md §1, §4). Their noise source is the explicit `state`: a `SampleNoise` holding one
generator per sample, seeded by (seed, sample index), so a sample's path does not depend on the batch size
or on its position in the batch. Every step draws exactly one z ~ N(0, I) per sample (also where the noise
coefficient is 0), so step k uses the same z for every η or γ: the knobs are coupled, and turning them to 0
recovers Euler on Eq. 12 (DDIM): the same path to rounding (≈1e-15), with no randomness left (the noise
term is an exact 0, so the spread over draws is exactly 0).

The factories return a `Method` object for `probflow.integrate` / `probflow.sample`:

    sol = probflow.sample(model, x_T, sigmas, method=stochastic_ddim(eta=1.0, seed=0))

They are not put in the global registry: a method that carries a seed and a knob is a value, not a name, and
the registry lists solvers of Eq. 12, which the benchmark and the order tests measure against the ODE's
exact solution (a stochastic path converges to a different, random one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.solvers import Method

__all__ = ["SampleNoise", "ddim_eta_scales", "stochastic_ddim", "reverse_sde", "ddim_eta_step", "reverse_sde_step"]

# A third entropy word keeps these streams apart from `probflow.noise`'s (seed, i) streams, so that using the
# same seed for x_T and for the path noise does not reuse x_T as the first z.
_STREAM = 0x5DE


class SampleNoise:
    """Per-sample Gaussian streams: row j of every `draw` comes from a generator seeded by (seed, indices[j]).

    indices: the samples' ids (an int n means 0 … n−1). Drawing for a batch of 3 with indices [3, 4, 5]
    gives the rows 3 … 5 of a batch of 6 with indices 0 … 5. A stream is read in blocks of
    `block(numel)` draws (one `randn` call per sample per block, a number that depends only on the size of
    one draw), float64 on the CPU, then cast. `draws` counts the draws so far (one per step).
    """

    def __init__(self, seed: int, indices: int | Sequence[int]) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        if isinstance(indices, (int, np.integer)):
            if indices < 1:
                raise ValueError(f"indices: expected a positive number of samples, got {indices}")
            indices = range(int(indices))
        idx = [int(i) for i in indices]
        if not idx or min(idx) < 0:
            raise ValueError(f"indices: expected non-negative sample ids, got {list(indices)!r}")
        self.seed, self.indices, self.draws = int(seed), idx, 0
        self._gens = []
        for i in idx:
            s = int(np.random.SeedSequence([self.seed, i, _STREAM]).generate_state(1, np.uint64)[0] >> 1)
            self._gens.append(torch.Generator().manual_seed(s))
        self._shape: tuple[int, ...] | None = None
        self._buf: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.indices)

    @staticmethod
    def block(numel: int) -> int:
        """Draws per block for draws of `numel` numbers: 64, fewer for large draws (≤ 2¹⁶ numbers a block)."""
        return max(1, min(64, 65536 // max(1, numel)))

    def draw(self, shape: Sequence[int], dtype: torch.dtype = torch.float64,
             device: torch.device | str = "cpu") -> Tensor:
        """z of shape (n, *shape), z ~ N(0, I), row j the next draw of sample indices[j]'s own stream."""
        shape = tuple(int(d) for d in shape)
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise ValueError(f"shape: this noise source draws {self._shape}, asked for {shape}")
        b = self.block(math.prod(shape))
        k = self.draws % b
        if k == 0:
            self._buf = torch.stack([torch.randn((b, *shape), generator=g, dtype=torch.float64) for g in self._gens])
        self.draws += 1
        return self._buf[:, k].to(dtype=dtype, device=device)


def _noise(state: SampleNoise | None, seed: int, indices: Sequence[int] | None, xbar: Tensor) -> SampleNoise:
    if state is None:
        state = SampleNoise(seed, xbar.shape[0] if indices is None else indices)
    if not isinstance(state, SampleNoise):
        raise TypeError(f"state: expected a SampleNoise (or None), got {type(state).__name__}")
    if state.n != xbar.shape[0]:
        raise ValueError(f"state: the noise source has {state.n} samples but the batch has {xbar.shape[0]}")
    return state


def _check_down(sigma: Tensor, sigma_next: Tensor) -> None:
    if not sigma_next < sigma:
        raise ValueError("sigmas: a stochastic sampler needs a decreasing grid (σ_max … 0); "
                         f"got a step from {float(sigma)} to {float(sigma_next)}")


def _check_knob(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
    return value


def ddim_eta_scales(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Eq. 11's two coefficients in x̄ for a step σ = σ_t → σ_next = σ_s < σ (docs/MATH.md §4).

    With ᾱ = 1/(1 + σ²), σ_{s,t}(η)/sqrt(ᾱ_s) = η σ_s sqrt(1 − σ_s²/σ_t²) =: c and
    sqrt(1 − ᾱ_s − σ_{s,t}²)/sqrt(ᾱ_s) = σ_s sqrt(1 − η²(1 − σ_s²/σ_t²)) =: d, so that Eq. 11 divided by
    sqrt(ᾱ_s) reads x̄_s = x̂_0 + d ε̂ + c z. Returns (c, d); c = 0 at η = 0 or σ_s = 0.
    """
    r2 = (sigma_next / sigma) ** 2
    return eta * sigma_next * torch.sqrt(1 - r2), sigma_next * torch.sqrt(1 - eta * eta * (1 - r2))


def ddim_eta_step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state: SampleNoise | None,
                  *, eta: float, seed: int = 0, indices: Sequence[int] | None = None):
    """One step of stochastic DDIM (Eq. 11 with σ_{s,t}(η), docs/MATH.md §4) in x̄, σ decreasing:

        x̂_0 = x̄_t − σ_t ε̂,     x̄_s = x̂_0 + σ_s sqrt(1 − η²(1 − σ_s²/σ_t²)) ε̂ + η σ_s sqrt(1 − σ_s²/σ_t²) z

    η = 0 is the Euler step x̄_t + (σ_s − σ_t) ε̂; η = 1 on consecutive timesteps is DDPM's ancestral step.
    """
    _check_down(sigma, sigma_next)
    state = _noise(state, seed, indices, xbar)
    eps = field(sigma, xbar)
    z = state.draw(xbar.shape[1:], xbar.dtype, xbar.device)
    c, d = ddim_eta_scales(sigma, sigma_next, eta)
    x0 = xbar - sigma * eps
    return x0 + d * eps + c * z, state


def reverse_sde_step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state: SampleNoise | None,
                     *, gamma: float, seed: int = 0, indices: Sequence[int] | None = None):
    """One Euler–Maruyama step of the reverse-time family (docs/MATH.md §4) in x̄, σ decreasing (h = σ_s − σ_t < 0):

        dx̄ = (1 + γ²) ε(x̄/sqrt(1+σ²), σ) dσ + γ sqrt(2σ) dw̄   →   x̄_s = x̄_t + (1 + γ²) ε̂ h + γ sqrt(2σ_t |h|) z

    γ = 1 is the reverse SDE, γ = 0 the Euler step of Eq. 12. Strong order 1/2, weak order 1.
    """
    _check_down(sigma, sigma_next)
    state = _noise(state, seed, indices, xbar)
    eps = field(sigma, xbar)
    z = state.draw(xbar.shape[1:], xbar.dtype, xbar.device)
    h = sigma_next - sigma
    return xbar + (1 + gamma * gamma) * eps * h + gamma * torch.sqrt(-2 * sigma * h) * z, state


def stochastic_ddim(eta: float, seed: int = 0, indices: Sequence[int] | None = None) -> Method:
    """Stochastic DDIM (Eq. 11, η ∈ [0, 1]) as a `Method` for `integrate` / `sample` on a decreasing σ grid.

    Noise: sample j uses the stream (seed, indices[j]) (default indices 0 … B−1); pass a `SampleNoise` as
    `state` instead to continue a solve. Any subsequence of timesteps works: each step converts σ → ᾱ itself.
    """
    eta = _check_knob(eta, "eta")
    return Method(f"ddim_eta={eta:g}", order=1, stages=1, stochastic=True, directions=frozenset({"down"}),
                  augmented=False,
                  step=partial(ddim_eta_step, eta=eta, seed=seed, indices=indices),
                  description="stochastic DDIM, Eq. 11 with σ_{s,t}(η) (docs/MATH.md §4); η = 0 is euler")


def reverse_sde(gamma: float, seed: int = 0, indices: Sequence[int] | None = None) -> Method:
    """The reverse-SDE family dx̄ = (1+γ²) ε dσ + γ sqrt(2σ) dw̄ (γ ∈ [0, 1]) by Euler–Maruyama, as a `Method`.

    γ = 1 is the reverse SDE, γ = 0 is Eq. 12 by Euler. Noise as in `stochastic_ddim`. The drift and the
    diffusion are frozen at the step's start, so the last step into σ = 0 still adds noise of size
    γ sqrt(2 σ_{N−1}²): use a grid whose last nonzero σ is small.
    """
    gamma = _check_knob(gamma, "gamma")
    return Method(f"reverse_sde_gamma={gamma:g}", order=1, stages=1, stochastic=True,
                  directions=frozenset({"down"}), augmented=False,
                  step=partial(reverse_sde_step, gamma=gamma, seed=seed, indices=indices),
                  description="reverse-time SDE family in σ (docs/MATH.md §4) by Euler–Maruyama; weak order 1")
