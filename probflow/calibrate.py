"""σ grids adapted to a model by solving Eq. 12: equal local error (`equalised`), grids optimised on a
calibration batch (`calibrated`, `calibrated_builder`), a per-model choice of method + calibrated grid made
on a held-back validation batch (`calibrated_select`); the per-model fitted recipe is `probflow.fit`.

These sit above `integrate` (they solve the ODE to measure a grid); the pure builders they start from
(`probflow.grids`) do not. A calibrated grid is fitted to one model and step count: its gain must be
measured on noise it was not fitted on (`probflow.bench` does), never on the calibration batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from probflow.field import as_field
from probflow.flows import noise
from probflow.grids import check_grid, check_steps, log_uniform, with_final_zero
from probflow.integrate import integrate
from probflow.schedules import Schedule
from probflow.solvers import get_method

__all__ = ["equalised", "calibrated", "calibrated_select", "Selection", "SELECT_METHODS", "calibrated_builder"]


def equalised(
    model,
    x: Tensor,
    sigma_max: float,
    sigma_min: float,
    steps: int,
    *,
    order: int = 3,
    pilot_steps: int = 64,
    pilot_method: str = "dpmpp_3m",
    floor: float = 0.05,
    final_zero: bool = True,
) -> Tensor:
    """A grid from the problem itself: equal local error per step of an order-`order` exponential
    integrator in λ = −log σ, with the error density measured on a cheap pilot run.

    The local error of a step of length h of an order-p method in λ (probflow.exponential, (E1)) is
    ≈ C |D^{(p)}(λ)| h^{p+1}, D = x̄ − σε the denoiser along the solution. The pilot integrates Eq. 12 down
    (σ_max → σ_min, x̄) from the pilot batch `x` (in the model's variable, as `probflow.sample` takes it)
    with `pilot_method` on `pilot_steps` log-uniform steps, evaluates D at every pilot point (NFE ≈
    2·pilot_steps on the pilot batch), and estimates e(λ) = RMS over the batch of the p-th finite
    difference of D in λ. Steps then follow the density ρ(λ) ∝ (e(λ) + floor·max e)^{1/(p+1)} (equal
    local error), i.e. σ_i = exp(−Λ^{-1}(i/(N−1))) with Λ the normalised cumulative of ρ, from σ_max to
    σ_min, then 0 (N = `steps` points with `final_zero`, else steps + 1). `floor` keeps steps where the
    pilot sees no error from growing without bound.
    """

    check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order: expected a positive integer, got {order!r}")
    if not isinstance(pilot_steps, int) or pilot_steps < order + 2:
        raise ValueError(f"pilot_steps: expected an integer >= order + 2 = {order + 2}, got {pilot_steps!r}")
    if not floor > 0:
        raise ValueError(f"floor: expected a positive relative floor, got {floor!r}")
    n = steps if final_zero else steps + 1
    if n == 1:
        return with_final_zero(torch.tensor([float(sigma_max)], dtype=torch.float64), final_zero)
    field = as_field(model)
    pilot = log_uniform(sigma_max, sigma_min, pilot_steps, final_zero=False).to(x.dtype)
    xbar = x * math.sqrt(1.0 + sigma_max**2)
    traj = integrate(field, xbar, pilot, pilot_method, trajectory=True).trajectory
    with torch.no_grad():
        d = torch.stack([traj[i] - pilot[i] * field(pilot[i], traj[i]) for i in range(len(pilot))])
    lam = -torch.log(pilot.double())
    dlam = float(lam[1] - lam[0])
    diff = d.double()
    for _ in range(order):
        diff = diff[1:] - diff[:-1]
    e = diff.flatten(1).pow(2).mean(1).sqrt() / dlam**order  # at the centres of the difference stencils
    lam_c = lam[: len(e)] + 0.5 * order * dlam
    # density on the pilot intervals (piecewise constant), e extended flat to the ends
    e_at = torch.cat([e[:1], e, e[-1:]])
    lam_at = torch.cat([lam[:1], lam_c, lam[-1:]])
    mid = 0.5 * (lam[1:] + lam[:-1])
    e_mid = torch.from_numpy(np.interp(mid.numpy(), lam_at.numpy(), e_at.numpy()))
    rho = (e_mid + floor * float(e_mid.max())) ** (1.0 / (order + 1))
    cum = torch.cat([rho.new_zeros(1), torch.cumsum(rho * dlam, 0)])
    cum = cum / cum[-1]
    targets = torch.linspace(0, 1, n, dtype=torch.float64)
    lam_grid = torch.from_numpy(np.interp(targets.numpy(), cum.numpy(), lam.numpy()))
    s = torch.exp(-lam_grid)
    s[0], s[-1] = sigma_max, sigma_min
    return with_final_zero(s, final_zero)


def _density_grid(sigma0: float, sigma1: float, log_density, n: int) -> Tensor:
    """n points σ_0 = sigma0 > … > σ_{n−1} = sigma1 at equal quantiles, in λ = −log σ, of a piecewise-constant
    density exp(log_density) on equal bins of [λ_0, λ_{n−1}]."""
    lam0, lam1 = -math.log(sigma0), -math.log(sigma1)
    k = len(log_density)
    rho = np.exp(log_density - log_density.max())
    cum = np.concatenate([[0.0], np.cumsum(rho)])
    cum /= cum[-1]
    edges = np.linspace(lam0, lam1, k + 1)
    lam = np.interp(np.linspace(0.0, 1.0, n), cum, edges)
    s = torch.from_numpy(np.exp(-lam))
    s[0], s[-1] = sigma0, sigma1
    return s


def calibrated(
    model,
    x: Tensor,
    sigma_max: float,
    sigma_min: float,
    steps: int,
    method: str = "unipc",
    *,
    bins: int = 6,
    max_evals: int = 400,
    ref_tol: float = 1e-10,
    reference: Tensor | None = None,
) -> Tensor:
    """A grid optimised for `method` on a small calibration batch: min over grids of the RMSE at σ = 0.

    Eq. 12 is integrated down (σ_max → 0, in x̄) from the calibration batch `x` (the model's variable, as
    `probflow.sample` takes it; independent of the noise the grid will be used on) with `method` on
    candidate grids of `steps` steps, and the error of x̄(0) is measured against `reference` (x̄(0) of the
    same batch, default: `scipy_dop853` at rtol = atol = `ref_tol`). A candidate has σ_max, `steps` − 1 points
    at equal quantiles of a step density in λ = −log σ, piecewise constant on `bins` equal bins of
    [−log σ_max, −log σ_end], then 0; σ_end and the bin densities (bins + 1 numbers) are chosen by
    Nelder–Mead (scipy) from the log-SNR uniform grid to σ_end = `sigma_min`, at most `max_evals`
    solves (each costs about `steps` NFE on the calibration batch). The final grid is never worse on the
    calibration batch than that start.
    """

    check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected a positive integer, got {bins!r}")
    if not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals: expected a positive integer, got {max_evals!r}")
    if not isinstance(x, Tensor) or x.ndim < 1 or not x.is_floating_point():
        raise ValueError("x: expected a floating-point calibration batch (B, ...) in the model's variable")
    if steps < 2:
        return log_uniform(sigma_max, sigma_min, steps)
    field = as_field(model)
    xbar = x.double() * math.sqrt(1.0 + sigma_max**2)
    if reference is None:
        ends = torch.tensor([sigma_max, 0.0], dtype=torch.float64)
        reference = integrate(field, xbar, ends, "scipy_dop853", rtol=ref_tol, atol=ref_tol,
                              options={"group": len(xbar)}).x
    elif reference.shape != xbar.shape:
        raise ValueError(f"reference: expected shape {tuple(xbar.shape)}, got {tuple(reference.shape)}")
    lo, hi = math.log(sigma_min) - math.log(10.0), min(math.log(sigma_min) + math.log(10.0), math.log(sigma_max) - 1)

    def grid(theta) -> Tensor:
        log_end = float(np.clip(theta[0], lo, hi))
        s = _density_grid(sigma_max, math.exp(log_end), np.clip(theta[1:], -8.0, 8.0), steps)
        return torch.cat([s, s.new_zeros(1)])

    def loss(theta) -> float:
        try:
            out = integrate(field, xbar, grid(theta), method).x
        except (FloatingPointError, ValueError):
            return math.inf
        return math.log(float((out - reference).pow(2).mean()) + 1e-300)

    theta0 = np.concatenate([[math.log(sigma_min)], np.zeros(bins)])
    simplex = np.vstack([theta0] + [theta0 + 0.5 * np.eye(bins + 1)[i] for i in range(bins + 1)])
    res = minimize(loss, theta0, method="Nelder-Mead",
                   options={"maxfev": max_evals, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-3})
    best = res.x if res.fun < loss(theta0) else theta0
    return check_grid(grid(best))


# Candidates of `calibrated_select`, chosen on the tuning problems of probflow.bench.heldout (seeds 100–109): with
# a grid calibrated for each and the choice made on a validation batch, {unipc, unipc_3} reached the same
# 128-fresh-sample RMSE as {unipc, unipc_3, dpmpp_2m, dpmpp_3m} on every tuning problem at NFE 10/20/50, at half
# the cost (the dpmpp methods were never the choice); against unipc alone (NFE 10) the geometric mean RMSE
# was 0.70×, against unipc_3 alone (NFE 20 / 50) 0.96× / 0.99×.
SELECT_METHODS = ("unipc", "unipc_3")


class Selection(NamedTuple):
    """`calibrated_select`'s answer: the chosen method and grid, and per candidate its validation RMSE and grid."""

    method: str
    grid: Tensor
    val_rmse: dict[str, float]
    grids: dict[str, Tensor]


def _reference(field, xbar: Tensor, sigma_max: float, ref_tol: float) -> Tensor:
    ends = torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    return integrate(field, xbar, ends, "scipy_dop853", rtol=ref_tol, atol=ref_tol, options={"group": len(xbar)}).x


def calibrated_select(
    model,
    x: Tensor,
    x_val: Tensor,
    sigma_max: float,
    sigma_min: float,
    steps: int,
    methods: tuple[str, ...] = SELECT_METHODS,
    *,
    max_evals: int = 100,
    ref_tol: float = 1e-10,
) -> Selection:
    """Per model: a grid `calibrated` for each of `methods` on the calibration batch `x`, then the method whose
    grid has the smallest RMSE of x̄(0) on a *separate* validation batch `x_val` (both in the model's
    variable; the validation batch is never fitted on, so the choice does not reward a grid that fits its own
    calibration noise). References: `scipy_dop853` at rtol = atol = `ref_tol`, one per batch. Candidates are
    compared at equal `steps`, so they must cost the same number of model calls per step.

    Returns a `Selection` (the method, its grid, the validation RMSE and the grid of every candidate); a
    candidate that fails to solve scores inf. Cost,
    in model calls on batches of len(x) and len(x_val): two references (≈ 1–2 × 10³ calls each at 1e-10) +
    len(methods)·(max_evals + 1)·steps for the calibrations + len(methods)·steps for the validation.
    """

    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods: expected distinct method names, got {methods!r}")
    if len({get_method(m).stages for m in methods}) != 1:
        raise ValueError(f"methods: expected methods with equal model calls per step, got {methods!r}")
    for name, b in (("x", x), ("x_val", x_val)):
        if not isinstance(b, Tensor) or b.ndim < 1 or not b.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point batch (B, ...) in the model's variable")
    if x_val.shape[1:] != x.shape[1:]:
        raise ValueError(f"x_val: expected samples of shape {tuple(x.shape[1:])}, got {tuple(x_val.shape[1:])}")
    field = as_field(model)
    scale = math.sqrt(1.0 + sigma_max**2)
    ref_cal = _reference(field, x.double() * scale, sigma_max, ref_tol)
    xv = x_val.double() * scale
    ref_val = _reference(field, xv, sigma_max, ref_tol)
    scores: dict[str, float] = {}
    found: dict[str, Tensor] = {}
    for m in methods:
        found[m] = calibrated(field, x, sigma_max, sigma_min, steps, m, max_evals=max_evals, reference=ref_cal)
        try:
            err = float((integrate(field, xv, found[m], m).x - ref_val).pow(2).mean().sqrt())
        except (FloatingPointError, ValueError):
            err = math.inf
        scores[m] = err if math.isfinite(err) else math.inf
    best = min(methods, key=lambda m: (scores[m], methods.index(m)))
    return Selection(best, found[best], scores, found)


def calibrated_builder(
    model,
    shape: tuple[int, ...],
    method: str = "unipc_3",
    *,
    n: int = 16,
    seed: int = 1234,
    end: float = 3.0,
    max_evals: int = 400,
    ref_method: str = "scipy_dop853",
    ref_tol: float = 1e-10,
) -> Callable[[Schedule, int], Tensor]:
    """`builder(schedule, steps)` of `calibrated` grids for one model (for benchmarks, e.g.
    `probflow.bench.run_workload(..., grids=[calibrated_builder(model, shape)])`).

    Calibration batch: `probflow.noise(n, shape, seed)` (choose a seed the evaluation noise does not use);
    its reference x̄(0) (`ref_method` at rtol = atol = `ref_tol`; "scipy_dop853" solves the batch jointly)
    is computed once per schedule, the grids once per step count. The start grid is log-SNR uniform from
    σ_max to `end`·σ_0 (`log_snr_tuned`).
    """

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    field = as_field(model)
    x = noise(n, tuple(shape), seed)
    refs: dict[tuple, Tensor] = {}
    cache: dict[tuple, Tensor] = {}

    def builder(schedule: Schedule, steps: int) -> Tensor:
        key = (schedule.name, schedule.T, schedule.sigma_max)
        if key not in refs:
            ends = torch.tensor([schedule.sigma_max, 0.0], dtype=torch.float64)
            opts = {"group": n} if ref_method == "scipy_dop853" else None
            refs[key] = integrate(field, x.double() * math.sqrt(1 + schedule.sigma_max**2), ends, ref_method,
                                  rtol=ref_tol, atol=ref_tol, options=opts).x
        if (*key, steps) not in cache:
            cache[(*key, steps)] = calibrated(field, x, schedule.sigma_max, end * schedule.sigma_min, steps, method,
                                              max_evals=max_evals, reference=refs[key])
        return cache[(*key, steps)].clone()

    builder.__name__ = f"calibrated_{method}"
    return builder
