"""Per-model solver coefficients: UniPC's per-interval factors fitted on a model's own noise (opt-in).

UniPC (`probflow.exponential`, docs/MATH.md §9) advances each grid interval k by

    predictor   x̄_{k+1} = e^{−h} x̄_k + (1 − e^{−h}) D_k + (1 + a_k) Σ_j c_j (D_j − D_k)
    corrector   the same step redone with the D at the predicted point as a node, its higher-order part × (1 + b_k)

where the c_j integrate the polynomial through the D's exactly (a = b = 0: the published method, order p).
On one model and one grid the leading local errors are systematic, not random: a per-interval factor on the
higher-order parts fitted against accurate solutions of a few samples of the model's own noise cancels part of
them (the idea of "bespoke" solvers, Shaul et al. 2023: solver coefficients learnt per model). The fit is judged
only on noise it did not see (`probflow.fit.fit_recipe` keeps it where a validation batch confirms it).

`fit_scales` minimises log of the trimmed mean squared error of x̄(0) against the references by Adam, through
`integrate(..., differentiable=True)`: it needs the model's backward pass (any `nn.Module` has one) and costs
`iters` solves of the batch, i.e. iters × NFE model calls and as many backward passes.
The fitted pairs (a_k, b_k) ride in the method's start state: `integrate(model, x, grid, method,
state=scales_state(scales))`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probflow.exponential import ExpState
from probflow.field import DDIMField, as_field
from probflow.integrate import integrate

__all__ = ["SCALED_METHODS", "scales_state", "fit_scales"]

SCALED_METHODS = ("unipc", "unipc_3", "unipc_4")


def scales_state(scales, grid: Tensor | None = None) -> ExpState:
    """The start state carrying per-interval pairs (a_k, b_k), one per interval of `grid` when given."""
    pairs = tuple(tuple(p) for p in scales)
    if any(len(p) != 2 for p in pairs):
        raise ValueError("scales: expected one (a, b) pair per grid interval")
    if grid is not None and len(pairs) != len(grid) - 1:
        raise ValueError(f"scales: expected {len(grid) - 1} (a, b) pairs (one per interval of the grid), got "
                         f"{len(pairs)}")
    return ExpState(scales=pairs)


def _trimmed_mse(x: Tensor, ref: Tensor, drop_worst: int) -> Tensor:
    e = (x - ref).pow(2).flatten(1).mean(1)
    return e.sort().values[: len(e) - drop_worst].mean()


def fit_scales(model, xbar: Tensor, reference: Tensor, grid: Tensor, method: str = "unipc_3", *, iters: int = 200,
               lr: float = 0.005, drop_worst: int = 1) -> tuple[tuple[tuple[float, float], ...], float, float]:
    """Fit UniPC's per-interval factors on the batch `xbar` (x̄ at σ_max) against its x̄(0) `reference`.

    Adam (learning rate `lr`, `iters` solves) on log of the mean squared error leaving out the `drop_worst`
    samples with the largest error (one sample sent into another mode would otherwise steer the fit), from
    a = b = 0. Returns (the best pairs met, the batch's RMSE at a = b = 0, at the best pairs); the RMSE never
    rises, since a = b = 0 is the first point tried.
    """
    if method not in SCALED_METHODS:
        raise ValueError(f"method: expected one of {', '.join(SCALED_METHODS)} (UniPC), got {method!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: expected a positive integer, got {iters!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    if reference.shape != xbar.shape:
        raise ValueError("reference: expected x̄(0) of the batch, shaped like it")
    if isinstance(drop_worst, bool) or not isinstance(drop_worst, int) or not 0 <= drop_worst < len(xbar):
        raise ValueError(f"drop_worst: expected an integer in [0, {len(xbar)}), got {drop_worst!r}")
    field: DDIMField = as_field(model)
    n = len(grid) - 1
    params = torch.zeros(n, 2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([params], lr=lr)
    best, first = (math.inf, torch.zeros(n, 2, dtype=torch.float64)), math.nan
    for _ in range(iters):
        opt.zero_grad()
        pairs = tuple((params[k, 0], params[k, 1]) for k in range(n))
        with torch.enable_grad():
            x = integrate(field, xbar, grid, method, state=ExpState(scales=pairs), differentiable=True).x
            loss = _trimmed_mse(x, reference, drop_worst)
        value = float(loss.detach())
        if math.isnan(first):
            first = value
        if not math.isfinite(value):
            break
        if value < best[0]:
            best = (value, params.detach().clone())
        loss.log().backward()
        opt.step()
    fitted = tuple((float(a), float(b)) for a, b in best[1])
    return fitted, math.sqrt(first), math.sqrt(best[0]) if math.isfinite(best[0]) else math.sqrt(first)
