"""An algebraically reversible solver of Eq. 12: decode(encode(x)) returns x exactly, at any step count.

reversible_heun (Kidger et al. 2021, "Efficient and accurate gradients for neural SDEs") carries a *pair*
of states at each σ, x̄ and its partner x̂, with f̂ = f(σ, x̂), f(σ, x̄) = ε(x̄/sqrt(1+σ²), σ) the field of
Eq. 12 (docs/MATH.md §2). A step from σ to σ' = σ + h (h of either sign) costs one model call:

    x̂' = 2 x̄ − x̂ + h f̂,        f̂' = f(σ', x̂'),        x̄' = x̄ + h/2 (f̂ + f̂')

It is symmetric: the same step with h → −h maps (x̄', x̂', f̂') back to (x̄, x̂, f̂), so decoding on the flipped
grid from the encode's final pair retraces it with no bookkeeping. x̄ is a second-order approximation of the
ODE solution; x̂ is an auxiliary (leapfrog-like) point.

Exact arithmetic. In floating point the subtraction that undoes a step is not exact, and the method's parasitic mode
(x̄ − x̂ oscillating; its step map has determinant −1, so one eigenvalue grows by |z| + sqrt(1 + z²), z = h ∂f/∂x̄ ≈
h/σ, while the other shrinks) amplifies the rounding errors (in float32 the floating-point round trip is far from
exact; a McCallum–Foster reversible Runge–Kutta did no better; the measurements: benchmarks/DESIGN.md). So the pair
is held in 64-bit fixed point, x̄ = X·q with X an int64 tensor and q = 2**-42 (|x̄| < 2**18, enough for σ_max·|x| on
the cosine table's σ_max ≈ 2e4), and every increment h/2·f is rounded to a multiple of q *before* it is added.
Rounding is odd (round(−a) = −round(a)) and σ − σ' is exactly −(σ' − σ), so the reverse step subtracts bit for bit
what the forward step added: the round trip returns the input rounded to q (|error| ≤ q/2 ≈ 1.1e-13, MSE ≈ q²/12 ≈
4e-27) whatever the dtype (float64 or float32; the model runs in its own dtype and sees x̄ = X·q cast to it) and the
step count. It relies on the model being deterministic: the same inputs (batch, σ, dtype, threads) give the same ε.

What the latent is: the pair. `Solution.x` is x̄_N/sqrt(1+σ_max²), the usual latent in x, and
`Solution.state` (a `HeunState`) holds X_N, X̂_N and f̂_N; decoding exactly needs the state
(`probflow.decode(model, enc.x, grid, "reversible_heun", state=enc.state)`). x̄_N is an order-2 solution of
the ODE from x_0, so its distance from the exact ODE latent falls like h² (measured in
benchmarks/INVERSION.md); decoding x̄_N without the state (partner initialised to x̄_N) is an ordinary
order-2 solve from that latent, not an exact inverse.

Stability limits. Exactness needs the pair; stability needs the parasitic mode d = x̄ − x̂ to stay small. Its step
map grows it by about |z| + sqrt(1 + z²) per step, z = h·∂f/∂x̄ ≈ h/σ on Eq. 12 (docs/MATH.md §2), so on DDIM's
trailing grids (|h|/σ from 0.4 to 1 per step) it grows by 1.5–2.4× per step unless the field damps it. Started
without the state (x̂ = x̄) it is excited by the first step and, on the shipped digits network, diverges at 10–50
trailing steps, while on sharp Gaussian mixtures it stays bounded (benchmarks/DESIGN.md). `parasitic(state)`
measures it; a solve whose final |x̄ − x̂|_∞ exceeds max(1, |x̄|_∞) warns (RuntimeWarning) that it is unstable and
its result not a solution of Eq. 12 — the CLI refuses such a result. With the state, decoding retraces the encode
exactly, but the retrace amplifies any difference in ε (another thread count, BLAS or device) like the parasitic
mode: a relative 1e−7 change of ε moves x_0 visibly on digits (tests/test_reversible.py), so a latent's exactness
holds only on the environment it was made on (the latent file records it). The state also records the σ path it was
made on (`HeunState.path`); retracing it on another grid raises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.method import Method

__all__ = ["HeunState", "QUANTUM", "reversible_heun_step", "to_fixed", "from_fixed", "parasitic"]

QUANTUM_BITS = 42
QUANTUM = 2.0**-QUANTUM_BITS  # q: the fixed-point resolution of the pair (x̄ units)
_LIMIT = 2.0**60  # |X| and each increment stay below this, so 2X + 2·increment fits in int64


def to_fixed(a: Tensor) -> Tensor:
    """round(a/q) as int64 (round half to even: odd, so to_fixed(−a) = −to_fixed(a)); refuses overflow."""
    s = a.detach() / QUANTUM  # exact: q is a power of two
    if not torch.isfinite(s).all() or s.abs().max() >= _LIMIT:
        raise FloatingPointError(f"reversible_heun: |x̄| or a step's increment exceeds the fixed-point range "
                                 f"±2**{60 - QUANTUM_BITS} (or is NaN/Inf); the model or step size is unstable")
    return torch.round(s).to(torch.int64)


def from_fixed(x: Tensor, dtype: torch.dtype) -> Tensor:
    """X·q in `dtype`."""
    return x.to(torch.float64 if dtype == torch.float64 else dtype) * QUANTUM


@dataclass
class HeunState:
    """reversible_heun's pair at σ: x̄ = xbar·q and x̂ = xhat·q (int64, fixed point, x̄ units) and
    f̂ = f(σ, x̂) in the state's dtype."""

    xbar: Tensor
    xhat: Tensor
    fhat: Tensor
    sigma: float
    path: tuple[float, ...] = field(default=())  # the σ's of the solve that led here, `sigma` last

    def tensors(self) -> dict[str, Tensor]:
        """The state as named tensors (for a latent file); `from_tensors` inverts it exactly."""
        return {"xbar": self.xbar, "xhat": self.xhat, "fhat": self.fhat,
                "sigma": torch.tensor(self.sigma, dtype=torch.float64),
                # one row per sample, so the state slices and concatenates along the batch like the pair
                "path": torch.tensor(self.path or (self.sigma,), dtype=torch.float64).expand(self.xbar.shape[0], -1)}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> HeunState:
        missing = {"xbar", "xhat", "fhat", "sigma"} - set(t)
        if missing:
            raise ValueError(f"state: reversible_heun state lacks {sorted(missing)}")
        if t["xbar"].dtype != torch.int64 or t["xhat"].dtype != torch.int64:
            raise ValueError("state: reversible_heun's xbar/xhat must be int64 fixed-point tensors")
        if not (t["xbar"].shape == t["xhat"].shape == t["fhat"].shape):
            raise ValueError(f"state: xbar, xhat, fhat shapes differ: {tuple(t['xbar'].shape)}, "
                             f"{tuple(t['xhat'].shape)}, {tuple(t['fhat'].shape)}")
        path = ()
        if "path" in t:
            rows = t["path"].reshape(-1, t["path"].shape[-1]) if t["path"].ndim else t["path"].reshape(1, 1)
            if not (rows == rows[:1]).all():
                raise ValueError("state: the recorded σ paths of the samples differ (altered?)")
            path = tuple(float(v) for v in rows[0])
        if path and path[-1] != float(t["sigma"]):
            raise ValueError("state: the recorded σ path does not end at the state's σ (altered?)")
        return cls(t["xbar"], t["xhat"], t["fhat"], float(t["sigma"]), path)


def _check(state: HeunState, x: Tensor, sigma: float) -> None:
    """The pair must belong to this x̄ at this σ (up to the rounding of x ↔ x̄ conversions)."""
    if not isinstance(state, HeunState):
        raise ValueError(f"state: reversible_heun needs the HeunState of an earlier reversible_heun solve, got "
                         f"{type(state).__name__}")
    if state.xbar.shape != x.shape:
        raise ValueError(f"state: the partner state has shape {tuple(state.xbar.shape)}, the latents "
                         f"{tuple(x.shape)}; pass the state made with these latents")
    if not math.isclose(state.sigma, sigma, rel_tol=1e-12, abs_tol=1e-300):
        raise ValueError(f"state: the partner state is at σ = {state.sigma!r}, the grid starts at σ = {sigma!r}; "
                         "decode on the grid the latents were encoded with")
    xs = from_fixed(state.xbar, torch.float64).to(x.device)
    tol = 64 * torch.finfo(x.dtype).eps * (1 + xs.abs()) + 2 * QUANTUM
    if ((x.double() - xs).abs() > tol).any():
        raise ValueError("state: the partner state does not belong to these latents (x̄ differs from the state's "
                         "x̄ beyond rounding); pass the state made with them, or none for an ordinary solve")


def parasitic(state: HeunState) -> float:
    """|x̄ − x̂|_∞ of the pair (x̄ units): the parasitic mode, small (O(h²)) on a stable solve."""
    return float(from_fixed(state.xbar - state.xhat, torch.float64).abs().max())


def _next_path(state: HeunState, sigma: float, sigma_next: float) -> tuple[float, ...]:
    """The σ path after a step: a step that turns back must retrace the path's previous σ exactly."""
    path = state.path or (sigma,)
    if len(path) >= 2 and (sigma_next - sigma) * (path[-1] - path[-2]) < 0:
        if not math.isclose(sigma_next, path[-2], rel_tol=1e-12, abs_tol=1e-300):
            raise ValueError(f"state: the state was made on a grid whose previous σ is {path[-2]!r}, this grid steps "
                             f"to {sigma_next!r}; decode on the grid the state was made on (flipped), or without "
                             "the state")
        return path[:-1]
    return (*path, sigma_next)


def reversible_heun_step(field: DDIMField, x: Tensor, sigma: Tensor, sigma_next: Tensor,
                         state: HeunState | None) -> tuple[Tensor, HeunState]:
    """One reversible Heun step of Eq. 12 in x̄, σ → σ_next (either direction), in exact fixed point.

    state None starts a pair at x̄ = x̂ = round(x/q)·q (one extra model call for f̂)."""
    dtype = x.dtype
    if state is None:
        xbar = to_fixed(x)
        xf = from_fixed(xbar, dtype).to(x.device)
        state = HeunState(xbar, xbar.clone(), field(sigma, xf), float(sigma), (float(sigma),))
    else:
        _check(state, x, float(sigma))
    path = _next_path(state, float(sigma), float(sigma_next))
    h2 = (sigma_next - sigma) / 2  # exact halving; σ − σ' = −(σ' − σ) exactly, so the reverse step is exact
    half = to_fixed(h2 * state.fhat.to(dtype))  # round(h/2·f̂ / q)
    xhat = 2 * state.xbar - state.xhat + 2 * half
    fhat = field(sigma_next, from_fixed(xhat, dtype).to(x.device))
    xbar = state.xbar + half + to_fixed(h2 * fhat)
    if max(xbar.abs().max(), xhat.abs().max()) >= _LIMIT:
        raise FloatingPointError(f"reversible_heun: |x̄| exceeds the fixed-point range ±2**{60 - QUANTUM_BITS}; "
                                 "the model or step size is unstable")
    new = HeunState(xbar, xhat, fhat, float(sigma_next), path)
    if float(sigma_next) == 0.0 or len(path) == 1:  # the end of a solve (decoding to 0, or retraced to its start)
        d, size = parasitic(new), float(from_fixed(xbar, torch.float64).abs().max())
        if d > max(1.0, size):
            warnings.warn(f"reversible_heun: unstable on this model and grid: the parasitic mode |x̄ − x̂| reached "
                          f"{d:.3g} (|x̄| ≤ {size:.3g}) at σ = {float(sigma_next):.4g}; the result is not a solution of "
                          "Eq. 12 (decode with the encode's state, or use another method)", RuntimeWarning,
                          stacklevel=2)
    return from_fixed(xbar, dtype).to(x.device), new


# Declared here, registered by `probflow.solvers` (the one place that builds the registry).
DECLARED = (Method("reversible_heun", order=2, stages=1, step=reversible_heun_step, reversible=True, extra_calls=1,
                description="reversible Heun (Kidger et al. 2021) in exact fixed point: pair state, 1 NFE/step, "
                            "decode(encode(x)) = x to 1e-13 on the flipped grid, any dtype and step count"),)
