"""σ grids of the benchmark by name: `GRIDS` maps a name to a builder `f(schedule, steps) -> σ grid` (σ_max … 0,
steps + 1 points, decreasing). Pure builders over `probflow.grids` (layer 1); the model-adapted "calibrated" grid
needs the workload's model and is made per workload by the runner (`CALIBRATED`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from probflow import grids as _grids
from probflow.schedules import Schedule

__all__ = ["GRIDS", "GridBuilder", "CALIBRATED", "DEFAULT_GRIDS", "UNIFORM_STEP_GRID", "register_grid", "grid_sigmas",
           "grid_name"]

GridBuilder = Callable[[Schedule, int], Tensor]

# The benchmark's own copy of the named grids (`probflow.grids.NAMED`), so that `register_grid` can add to it.
GRIDS: dict[str, GridBuilder] = dict(_grids.NAMED)
# "calibrated" is not a builder of (schedule, steps) alone: it needs the workload's model (`runner.run_workload`).
CALIBRATED = "calibrated"
DEFAULT_GRIDS = ("uniform", "quadratic", "logsnr", "karras", "log_snr_tuned", CALIBRATED)
# Methods whose coefficients assume equal steps in σ (`Method.uniform_steps`: torchdiffeq's Adams methods) are wrong
# on every other grid (integrate refuses them), so the benchmark runs them on this grid instead.
UNIFORM_STEP_GRID = "sigma_uniform"


def register_grid(name: str, builder: GridBuilder, *, replace: bool = False) -> None:
    """Add a grid `builder(schedule, steps) -> σ grid` (decreasing, σ_max … 0, steps + 1 points) by name."""
    if name in GRIDS and not replace:
        raise ValueError(f"grid: {name!r} is already registered")
    GRIDS[name] = builder


def grid_sigmas(grid: str | GridBuilder, schedule: Schedule, steps: int) -> Tensor:
    """The σ grid of `steps` steps: a name in `GRIDS`, the name of a function f(schedule, steps) in
    `probflow.grids`, or a builder; checked to run from σ_max to 0 (`probflow.grids.check_grid`)."""
    if callable(grid):
        builder = grid
    elif grid in GRIDS:
        builder = GRIDS[grid]
    elif isinstance(grid, str) and callable(getattr(_grids, grid, None)) and not grid.startswith("_"):
        builder = getattr(_grids, grid)
    else:
        raise ValueError(f"grid: unknown grid {grid!r}; expected one of {sorted(GRIDS)} or a function in "
                         "probflow.grids")
    sig = _grids.check_grid(torch.as_tensor(builder(schedule, steps), dtype=torch.float64), f"grid {grid!r}")
    if abs(float(sig[0]) - schedule.sigma_max) > 1e-9 * schedule.sigma_max or float(sig[-1]) != 0.0:
        raise ValueError(f"grid: {grid!r} must run from σ_max = {schedule.sigma_max} to 0, got {sig[0]} … {sig[-1]}")
    return sig


def grid_name(grid: str | GridBuilder) -> str:
    return grid if isinstance(grid, str) else getattr(grid, "__name__", "custom")
