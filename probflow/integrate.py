"""The one integrate path: Eq. 12 from the first to the last σ of a grid, by any registered method.

Sampling, encoding, benchmarks and the reference all come through `integrate`; it works in x̄ (MATH.md
§1); `probflow.flows` converts to and from the model's variable x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field
from probflow.grids import check_grid
from probflow.solvers import Method, get_method

__all__ = ["Solution", "integrate", "check_state", "scale_in", "scale_out"]


@dataclass
class Solution:
    """Result of a solve.

    x: the state at the last σ of the grid. nfe: model evaluations this solve made (rejected adaptive
    steps included). sigmas: the grid, in the state's dtype. trajectory: the state at every grid point,
    shape (len(sigmas), *x.shape), when asked for. state: the solver's final state (for reversible and
    multistep methods; pass it back to continue or to invert exactly), None for torchdiffeq methods.
    method: the solver's name. info: statistics of solves that have them (`probflow.inversion.encode_exact`:
    per-step iterations and residuals), else None.
    """

    x: Tensor
    nfe: int
    sigmas: Tensor
    trajectory: Tensor | None = None
    state: Any = None
    method: str = ""
    info: dict | None = None


def check_state(x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch of shape (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def integrate(
    model: EpsModel | DDIMField,
    xbar: Tensor,
    sigmas: Tensor,
    method: str | Method = "euler",
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trajectory: bool = False,
    state: Any = None,
    options: dict | None = None,
) -> Solution:
    """Integrate dx̄/dσ = ε(x̄/sqrt(1+σ²), σ) (Eq. 12) along `sigmas`, in x̄, with `method`.

    method: a registered name (`probflow.solvers.method_names()`) or a `Method` object (e.g. a stochastic
    step built with its own noise source, which should not live in the global registry).
    sigmas: strictly monotone grid; decreasing generates, increasing encodes. Fixed-grid methods step
    exactly on it; adaptive ones report at its points. rtol/atol: adaptive methods only. state: a
    probflow method's state to start from (e.g. the final state of an encode, to decode exactly).
    options: passed to torchdiffeq's solver (e.g. `first_step`); for scipy_dop853, `group` (samples
    solved jointly, tolerances scaled so each sample keeps its bound).
    """
    field = as_field(model)
    m: Method = method if isinstance(method, Method) else get_method(method)
    xbar = check_state(xbar, "x")
    sigmas = check_grid(sigmas).to(dtype=xbar.dtype, device=xbar.device)
    if m.adaptive and not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol, atol: expected positive tolerances for {method}, got {rtol}, {atol}")
    if m.uniform_steps:
        d = sigmas.diff()
        if ((d - d.mean()).abs() > 1e-6 * d.abs().mean()).any():
            raise ValueError(f"sigmas: method {m.name!r} assumes equal steps in σ; got a non-uniform grid "
                             "(use e.g. torch.linspace, or a method without this restriction)")
    if state is not None and m.backend != "probflow":
        raise ValueError(f"state: {m.name} ({m.backend}) keeps no solver state; state applies to probflow's own "
                         "step methods")
    options = {**m.default_options, **(options or {})}
    nfe0 = field.nfe
    if m.backend == "torchdiffeq":
        import torchdiffeq

        with torch.no_grad():
            traj = torchdiffeq.odeint(field, xbar, sigmas, method=m.name, rtol=rtol, atol=atol, options=options)
        x_end, traj = traj[-1], (traj if trajectory else None)
    elif m.backend == "scipy":
        traj = _solve_scipy(field, xbar, sigmas, rtol, atol, **options)
        x_end, traj = traj[-1], (traj if trajectory else None)
    else:
        x_end, traj, state = _step_loop(m, field, xbar, sigmas, state, trajectory)
    if not torch.isfinite(x_end).all():
        raise FloatingPointError(f"integrate: the {m.name} solve produced NaN or Inf (model or step size unstable)")
    return Solution(x_end, field.nfe - nfe0, sigmas, traj, state, m.name)


def _step_loop(m: Method, field: DDIMField, x: Tensor, sigmas: Tensor, state: Any, keep: bool):
    """The loop of probflow's own methods: one `step` per grid interval."""
    traj = [x] if keep else None
    step = m.step
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            x, state = step(field, x, sigmas[i], sigmas[i + 1], state)
            if keep:
                traj.append(x)
    return x, (torch.stack(traj) if keep else None), state


def _solve_scipy(field: DDIMField, xbar: Tensor, sigmas: Tensor, rtol: float, atol: float,
                 group: int = 1) -> Tensor:
    """DOP853 (scipy.integrate.solve_ivp) in float64, `group` samples at a time (default one).

    scipy's error norm is an RMS over the whole state, so a jointly solved group of n numbers could average
    one hard sample's error away; with group > 1 the tolerances are divided by sqrt(n), which bounds every
    component's local error as a solve of that sample alone would.
    """
    from scipy.integrate import solve_ivp

    s = sigmas.detach().cpu().double().numpy()
    x64 = xbar.detach().cpu().double()
    shape = x64.shape[1:]
    out = torch.empty((len(s), *x64.shape), dtype=torch.float64)
    n = group * int(np.prod(shape))
    rtol, atol = rtol / math.sqrt(n), atol / math.sqrt(n)
    rtol = max(rtol, 100 * np.finfo(float).eps)  # DOP853's own floor; below it scipy would warn and clamp

    def f(sig: float, y: np.ndarray) -> np.ndarray:
        e = field(torch.tensor(sig, dtype=torch.float64), torch.from_numpy(y).view(-1, *shape))
        return e.detach().reshape(-1).double().numpy()

    with torch.no_grad():
        for b in range(0, x64.shape[0], group):
            xb = x64[b:b + group]
            sol = solve_ivp(f, (s[0], s[-1]), xb.reshape(-1).numpy(), method="DOP853", t_eval=s,
                            rtol=rtol, atol=atol)
            if not sol.success:
                raise FloatingPointError(f"scipy_dop853: samples {b}… failed: {sol.message}")
            out[:, b:b + group] = torch.from_numpy(sol.y.T.copy()).view(len(s), *xb.shape)
    return out.to(dtype=xbar.dtype, device=xbar.device)


def scale_in(x: Tensor, sigma: Tensor | float) -> Tensor:
    """x → x̄ = x·sqrt(1 + σ²) (MATH.md §1)."""
    return x * math.sqrt(1.0 + float(sigma) ** 2)


def scale_out(xbar: Tensor, sigma: Tensor | float) -> Tensor:
    """x̄ → x = x̄ / sqrt(1 + σ²)."""
    return xbar / math.sqrt(1.0 + float(sigma) ** 2)
