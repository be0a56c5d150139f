"""Sample, decode, encode and interpolate: Eq. 12 integrated along a grid, in the model's variable x.

Every function here converts x → x̄ = x·sqrt(1+σ²) at the first σ of the grid, calls the one
`integrate`, and converts back at the last σ (docs/MATH.md §1–2). `sigmas` is always the *sampling* grid
(decreasing); encode runs the same grid flipped ("inverse = forward with the ends swapped"), so
decode(encode(x, g), g) is a round trip on one grid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field, check_dtype, check_sample_shape
from probflow.grids import check_grid
from probflow.integrate import Solution, SolveOptions, check_state, integrate, scale_in, scale_out
from probflow.precision import Precision
from probflow.solvers import Method

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; annotations are not evaluated at run time
    from typing import Unpack

__all__ = ["sample", "decode", "encode", "interpolate", "slerp", "lerp", "noise", "sampling_grid"]


def sampling_grid(sigmas: Tensor) -> Tensor:
    """`sigmas` checked as a sampling grid (`grids.check_grid`, and decreasing: σ_max … 0); encoders flip it."""
    sigmas = check_grid(sigmas)
    if sigmas[0] < sigmas[-1]:
        raise ValueError("sigmas: expected the decreasing sampling grid (σ_max … 0); encode flips it itself")
    return sigmas


def _flow(model: EpsModel | DDIMField, x: Tensor, sigmas: Tensor, method: str | Method,
          precision: Precision | str | None, solve: SolveOptions, name: str = "x") -> Solution:
    x = check_state(x, "x")
    check_sample_shape(model, x, name)
    if precision is not None:  # the model in its dtype, the state in its own (probflow.precision)
        p = Precision.parse(precision).check_device(x.device)
        model, x = p.field(model), p.state_tensor(x)
    model = as_field(model)
    sol = integrate(model, scale_in(x, sigmas[0]), sigmas, method, **solve)
    sol.x = scale_out(sol.x, sigmas[-1])
    if sol.trajectory is not None:
        scale = torch.rsqrt(1 + sol.sigmas**2).reshape(-1, *([1] * x.ndim))
        sol.trajectory = sol.trajectory * scale
    return sol


def sample(model: EpsModel | DDIMField, noise: Tensor, sigmas: Tensor, method: str | Method = "euler", *,
           precision: Precision | str | None = None, **solve: Unpack[SolveOptions]) -> Solution:
    """x_T → x_0: integrate Eq. 12 down the decreasing grid `sigmas` (σ_max … 0) from `noise` = x_T.

    `noise` is in the model's variable x (a standard normal draw for σ_max large), shape (B, *S).
    Returns a Solution whose `x` (and `trajectory`, if asked) are in x; `method="euler"` is DDIM.
    `precision` (e.g. "model=bfloat16,state=float32", `probflow.precision`) sets the model's and the
    state's dtypes; default: the noise's dtype for the state, the model's own dtype for the model.
    `solve`: `integrate`'s keywords, passed through (`control` or rtol/atol/max_steps, trajectory, state,
    options, variable, progress; `probflow.integrate.SolveOptions`).
    """
    return _flow(model, noise, sampling_grid(sigmas), method, precision, solve, "noise")


def decode(model: EpsModel | DDIMField, latents: Tensor, sigmas: Tensor, method: str | Method = "euler", *,
           precision: Precision | str | None = None, **solve: Unpack[SolveOptions]) -> Solution:
    """Latents x_T → images x_0: `sample` from given latents (pass an encode's `state` to invert a
    reversible method exactly)."""
    return _flow(model, latents, sampling_grid(sigmas), method, precision, solve, "latents")


def encode(model: EpsModel | DDIMField, x0: Tensor, sigmas: Tensor, method: str | Method = "euler", *,
           precision: Precision | str | None = None, **solve: Unpack[SolveOptions]) -> Solution:
    """x_0 → x_T: integrate Eq. 12 *up* the flipped sampling grid; the latent is x_T = x̄(σ_max)/sqrt(1+σ_max²).

    With `method="euler"` this is DDIM inversion with ε evaluated at the start of each upward step
    (docs/MATH.md §3). The Solution's `state` lets a reversible method decode exactly. `solve`: as in `sample`.
    """
    return _flow(model, x0, sampling_grid(sigmas).flip(0), method, precision, solve, "x0")


def lerp(z0: Tensor, z1: Tensor, w: Tensor) -> Tensor:
    """(1−w) z0 + w z1 for each weight in the 1-D tensor `w`: shape (len(w), *z0.shape); exact at w ∈ {0, 1}."""
    z0, z1, w = _mix_args(z0, z1, w)
    out = (1 - w) * z0 + w * z1
    return torch.where(w == 0, z0, torch.where(w == 1, z1, out))


def slerp(z0: Tensor, z1: Tensor, w: Tensor) -> Tensor:
    """Spherical interpolation per sample (over all but the batch dimension):

        sin((1−w)θ)/sin θ · z0 + sin(wθ)/sin θ · z1,     cos θ = ⟨z0, z1⟩/(|z0||z1|)

    Keeps the norm of Gaussian latents (for which |z0| ≈ |z1|), unlike lerp, which shrinks it towards the
    middle. Falls back to lerp where z0 ∥ z1. Shape (len(w), *z0.shape); exact at w ∈ {0, 1}.
    """
    z0, z1, w = _mix_args(z0, z1, w)
    dims = tuple(range(2, z0.ndim))
    norm = torch.linalg.vector_norm
    cos = (z0 * z1).sum(dims, keepdim=True) / (norm(z0, dim=dims, keepdim=True) * norm(z1, dim=dims, keepdim=True))
    theta = torch.arccos(cos.clamp(-1, 1))
    s = torch.sin(theta)
    safe = s.abs() > 1e-12
    s = torch.where(safe, s, torch.ones_like(s))
    a = torch.where(safe, torch.sin((1 - w) * theta) / s, 1 - w)
    b = torch.where(safe, torch.sin(w * theta) / s, w)
    out = a * z0 + b * z1
    return torch.where(w == 0, z0, torch.where(w == 1, z1, out))


def _mix_args(z0: Tensor, z1: Tensor, w: Tensor):
    check_state(z0, "z0")
    check_state(z1, "z1")
    if z0.shape != z1.shape:
        raise ValueError(f"z0, z1: latents to interpolate must have the same shape, got {tuple(z0.shape)} and "
                         f"{tuple(z1.shape)}")
    w = torch.as_tensor(w, dtype=z0.dtype, device=z0.device)
    if w.ndim != 1 or not torch.isfinite(w).all():
        raise ValueError(f"weights: expected a finite 1-D tensor of mixing weights, got {w}")
    return z0.unsqueeze(0), z1.unsqueeze(0), w.reshape(-1, *([1] * z0.ndim))


def interpolate(
    model: EpsModel | DDIMField,
    z0: Tensor,
    z1: Tensor,
    sigmas: Tensor,
    method: str | Method = "euler",
    *,
    frames: int = 8,
    kind: str = "slerp",
    weights: Tensor | None = None,
    **solve: Unpack[SolveOptions],
) -> Solution:
    """Mix two batches of latents (B, *S) at `frames` weights from 0 to 1 (or the given `weights`) by slerp or
    lerp, and decode every frame down `sigmas` with `method`. Returns a Solution with x of shape
    (frames, B, *S) (and trajectory (len(sigmas), frames, B, *S) if asked).

    state: the solver state of the stacked latents [z0; z1] as `encode(model, torch.cat([x0, x1]), …)`
    returned it (a reversible method's partner); the end frames (weights 0 and 1, required first and last)
    are then decoded with it — exactly x0 and x1 for a reversible method — and the inner frames, new latents
    with no state of their own, by an ordinary solve. The other keywords of `solve` are `decode`'s.
    """
    if weights is None:
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames: expected an integer >= 2, got {frames!r}")
        weights = torch.linspace(0, 1, frames, dtype=torch.float64)
    mix = {"slerp": slerp, "lerp": lerp}
    if kind not in mix:
        raise ValueError(f"kind: expected 'slerp' or 'lerp', got {kind!r}")
    z = mix[kind](z0, z1, weights)
    n, b = z.shape[0], z0.shape[0]
    state = solve.pop("state", None)
    trajectory = bool(solve.get("trajectory", False))
    kw = solve
    if state is None:
        sol = decode(model, z.reshape(-1, *z0.shape[1:]), sigmas, method, **kw)
    else:
        if n < 2 or float(weights[0]) != 0.0 or float(weights[-1]) != 1.0:
            raise ValueError("weights: with a state, the first weight must be 0 and the last 1 (the end frames "
                             "are the encoded latents)")
        ends = decode(model, torch.cat([z0, z1]), sigmas, method, state=state, **kw)
        parts = [ends]
        if n > 2:
            parts.append(decode(model, z[1:-1].reshape(-1, *z0.shape[1:]), sigmas, method, **kw))
        order = [ends.x[:b]] + ([parts[1].x] if n > 2 else []) + [ends.x[b:]]
        traj = None
        if trajectory:
            t = [ends.trajectory[:, :b]] + ([parts[1].trajectory] if n > 2 else []) + [ends.trajectory[:, b:]]
            traj = torch.cat(t, dim=1)
        sol = Solution(torch.cat(order), sum(p.nfe for p in parts), ends.sigmas, traj, None, ends.method)
    sol.x = sol.x.reshape(z.shape)
    if sol.trajectory is not None:
        sol.trajectory = sol.trajectory.reshape(len(sol.sigmas), *z.shape)
    return sol


MAX_NOISE_ELEMENTS = 1 << 28  # default bound on noise()'s n × prod(shape): 2 GiB in float64


def _count(v: object, name: str, lo: int, hi: int | None = None) -> int:
    """An integer (not a bool) in [lo, hi]; TypeError/ValueError naming `name` otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi if hi is not None else '∞'}), got {v}"
                         .replace(f", {hi})", f", {hi}]"))
    return int(v)


def noise(n: int, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64,
          device: torch.device | str = "cpu", start: int = 0,
          max_elements: int | None = MAX_NOISE_ELEMENTS) -> Tensor:
    """n standard-normal latents of shape `shape`, sample i drawn from its own stream seeded by (seed, i),
    so a sample's noise does not depend on the batch size or its position in a batch. `start` gives samples
    start … start+n−1 of the same sequence (a chunk of a larger run: `noise(n)[a:b] == noise(b-a, start=a)`).
    seed and start+n are below 2^63; n × prod(shape) is at most `max_elements` (None: no bound), checked
    before anything is allocated; dtype is a floating-point dtype."""
    n = _count(n, "n", 1)
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape: expected a tuple of positive integers, got {type(shape).__name__}")
    shape = tuple(_count(s, f"shape[{i}]", 1) for i, s in enumerate(shape))
    seed = _count(seed, "seed", 0, 2**63 - 1)
    start = _count(start, "start", 0, 2**63 - 1 - n)
    dtype = check_dtype(dtype, "dtype")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # an unavailable device (cuda without CUDA) fails here, before any work
    except (RuntimeError, TypeError, AssertionError) as e:
        raise ValueError(f"device: {device!r} is not a usable torch device ({str(e).splitlines()[0]})") from None
    size = n * math.prod(shape)
    if max_elements is not None and size > max_elements:
        raise ValueError(f"n, shape: {n} × {shape} = {size} numbers ({8 * size / 2**30:.3g} GiB in float64) is above "
                         f"the limit of {max_elements} (max_elements=)")
    out = torch.empty((n, *shape), dtype=torch.float64)
    for i in range(n):
        s = int(np.random.SeedSequence([seed, start + i]).generate_state(1, np.uint64)[0] >> 1)
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
    return out.to(dtype=dtype, device=device)
