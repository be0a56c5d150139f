"""Algebraically reversible solvers of Eq. 12: decode(encode(x)) returns x to rounding, at any step count.

An ordinary one-step method cannot be inverted exactly: undoing x̄_{n+1} = x̄_n + h·Φ(x̄_n) needs Φ at the
unknown x̄_n. A reversible method carries a *pair* of states, each step updating one from the other, so
that every update can be subtracted again. Two are registered here (σ is the time; h = σ_{n+1} − σ_n, of
either sign; f(σ, x̄) = ε(x̄/sqrt(1+σ²), σ) is Eq. 12):

reversible_heun (Kidger et al. 2021), state (x̄, x̂, f̂ = f(σ, x̂)), one model call per step, order 2:

    x̂_{n+1} = 2 x̄_n − x̂_n + h f̂_n,      f̂_{n+1} = f(σ_{n+1}, x̂_{n+1}),      x̄_{n+1} = x̄_n + h/2 (f̂_n + f̂_{n+1})

  The same formula with h → −h undoes a step (the method is symmetric), so the flipped grid decodes
  exactly with no bookkeeping. Its price is weak stability: the map has determinant −1, so its parasitic
  mode (x̄ − x̂ oscillating) grows by |z| + sqrt(z² + 1) per step, z = h ∂f/∂x̄, whenever the step is
  contracting or expanding — decaying in one direction and growing in the other.

reversible_rk (McCallum & Foster 2024), state (x̄, ẑ), coupling λ ∈ (0, 1], base one-step increment
Ψ_h(σ, x̄) (Heun's 2-stage trapezoid here, order 2; 4 model calls per step):

    x̄_{n+1} = λ x̄_n + (1 − λ) ẑ_n + Ψ_h(σ_n, ẑ_n),       ẑ_{n+1} = ẑ_n − Ψ_{−h}(σ_{n+1}, x̄_{n+1})

  inverted by ẑ_n = ẑ_{n+1} + Ψ_{−h}(σ_{n+1}, x̄_{n+1}), x̄_n = (x̄_{n+1} − (1 − λ) ẑ_n − Ψ_h(σ_n, ẑ_n))/λ.
  λ < 1 damps the parasitic mode x̄ − ẑ by λ per step in the direction of integration (so the method is
  stable in both directions for small enough steps), at the cost of 1/λ per step in the inverse.
  The inverse formula differs from the forward one, so the state records the grid it was made on and a
  solve in the opposite direction retraces it (an error if the grid differs).

What the latent is: the pair. `Solution.x` is x̄_N (reported in x as usual) — an order-2 approximation of
the exact ODE latent; `Solution.state` holds the partner (x̂_N, f̂_N), resp. ẑ_N, in x̄ units. Decoding
exactly needs both (`probflow.decode(model, enc.x, grid, method, state=enc.state)`); decoding x̄_N alone
(state None, the partner initialised to x̄) is an ordinary order-2 solve of the ODE from that latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.solvers import Method, register

__all__ = ["HeunState", "RKState", "reversible_heun_step", "reversible_rk_step", "make_reversible_rk"]


@dataclass
class HeunState:
    """reversible_heun's partner state at the current σ, in x̄ units: x̂ and f̂ = f(σ, x̂)."""

    xhat: Tensor
    fhat: Tensor


def reversible_heun_step(field: DDIMField, x: Tensor, sigma: Tensor, sigma_next: Tensor,
                         state: HeunState | None) -> tuple[Tensor, HeunState]:
    """One reversible Heun step of Eq. 12 in x̄, from σ to σ_next (either direction); see the module doc."""
    if state is None:
        state = HeunState(x, field(sigma, x))
    _check_partner(state.xhat, x, "reversible_heun")
    h = sigma_next - sigma
    xhat = 2 * x - state.xhat + h * state.fhat
    fhat = field(sigma_next, xhat)
    return x + 0.5 * h * (state.fhat + fhat), HeunState(xhat, fhat)


@dataclass
class RKState:
    """reversible_rk's partner ẑ (x̄ units) and the σ values of the steps taken so far, with their
    direction, so that a solve in the other direction can retrace them with the inverse formula."""

    z: Tensor
    sigmas: list[float] = dc_field(default_factory=list)
    direction: int = 0


def _heun_increment(field: DDIMField, sigma: Tensor, x: Tensor, h: Tensor) -> Tensor:
    """Ψ_h(σ, x̄) = h/2 (f(σ, x̄) + f(σ + h, x̄ + h f(σ, x̄))): Heun's trapezoid increment."""
    k1 = field(sigma, x)
    k2 = field(sigma + h, x + h * k1)
    return 0.5 * h * (k1 + k2)


def make_reversible_rk(coupling: float = 0.999):
    """The reversible_rk step function (McCallum & Foster 2024) with coupling λ = `coupling` ∈ (0, 1]."""
    lam = float(coupling)
    if not 0 < lam <= 1:
        raise ValueError(f"coupling: expected λ in (0, 1], got {coupling!r}")

    def step(field: DDIMField, x: Tensor, sigma: Tensor, sigma_next: Tensor,
             state: RKState | None) -> tuple[Tensor, RKState]:
        d = 1 if sigma_next > sigma else -1
        if state is None:
            state = RKState(x, [float(sigma)], d)
        _check_partner(state.z, x, "reversible_rk")
        s, s_next = float(sigma), float(sigma_next)
        if not state.sigmas or state.sigmas[-1] != s:
            raise ValueError(f"state: reversible_rk state is at σ = {state.sigmas[-1:]}, not at the grid's σ = {s}")
        if d == state.direction or len(state.sigmas) == 1:  # forward: one more step along the solve
            h = sigma_next - sigma
            x_next = lam * x + (1 - lam) * state.z + _heun_increment(field, sigma, state.z, h)
            z_next = state.z - _heun_increment(field, sigma_next, x_next, -h)
            return x_next, RKState(z_next, state.sigmas + [s_next], d)
        # inverse: undo the last step σ_prev → σ of the earlier solve
        s_prev = state.sigmas[-2]
        if s_prev != s_next:
            raise ValueError(f"sigmas: to invert a reversible_rk solve exactly, retrace its grid; expected the "
                             f"next σ to be {s_prev}, got {s_next}")
        h = sigma - sigma_next  # the original step
        z_prev = state.z + _heun_increment(field, sigma, x, -h)
        x_prev = (x - (1 - lam) * z_prev - _heun_increment(field, sigma_next, z_prev, h)) / lam
        return x_prev, RKState(z_prev, state.sigmas[:-1], state.direction)

    return step


def _check_partner(partner: Tensor, x: Tensor, name: str) -> None:
    if partner.shape != x.shape:
        raise ValueError(f"state: {name} partner state has shape {tuple(partner.shape)}, the latent "
                         f"{tuple(x.shape)}; pass the state made with these latents")


reversible_rk_step = make_reversible_rk(0.999)

register(Method("reversible_heun", order=2, stages=1, step=reversible_heun_step, reversible=True,
                description="reversible Heun (Kidger et al. 2021): pair state, 1 NFE/step, symmetric, exact "
                            "round trip on the flipped grid"))
register(Method("reversible_rk", order=2, stages=4, step=reversible_rk_step, reversible=True,
                description="McCallum–Foster reversible RK on Heun's increment, λ = 0.999: pair state, 4 NFE/step"))
