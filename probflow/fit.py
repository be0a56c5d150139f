"""The per-model fitted recipe (opt-in; issue 26's calibrated row): `fit_recipe` picks the best of a few candidate
grids (`candidate_grids`) and UniPC order on a calibration batch of the model's own noise, moves the grid's points
by a monotone warp (`warped`) fitted by Nelder–Mead (`optimise_grid`), then fits UniPC's per-interval factors
(`probflow.coefficients`), keeping each fit only where a separate validation batch confirms it.

Above `integrate` and `probflow.calibrate` (it solves the ODE to measure a grid, with calibrate's references). A
fitted recipe is fitted to one model and NFE: its gain must be measured on noise it was not fitted on
(`benchmarks/fair_fewstep.py --fit` does), never on the calibration batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from probflow.calibrate import _reference
from probflow.coefficients import SCALED_METHODS, fit_scales, scales_state
from probflow.field import DDIMField, as_field
from probflow.grids import check_grid, check_steps, log_uniform, t_power
from probflow.integrate import integrate
from probflow.schedules import Schedule
from probflow.solvers import get_method

__all__ = ["warped", "optimise_grid", "candidate_grids", "FIT_METHODS", "Fitted", "fit_recipe"]


def warped(start: Tensor, theta, sigma_floor: float) -> Tensor:
    """The grid `start` (σ_max > … > σ_min, then 0; N points before 0) with its points moved by a monotone warp.

    θ = (a, b_1 … b_B): the end moves to σ_min·e^a (clipped to [`sigma_floor`, σ_max/e]); the points keep their
    order: point i sits at τ_i = F^{-1}(i/(N−1)) of the start grid's log σ, linear in τ between its points, where
    F is the normalised cumulative of the piecewise-constant density e^{b_k} on B equal bins of τ ∈ [0, 1]; log σ
    is then rescaled affinely so that it runs from log σ_max to the new end. θ = 0 gives `start` itself, so
    any θ is a grid of the same step count, strictly decreasing by construction (up to rounding)."""
    lg = torch.log(start[:-1].double()).numpy()
    n, th = len(lg), np.asarray(theta, dtype=np.float64)
    if n < 3:
        return start.clone()
    b = np.clip(th[1:], -8.0, 8.0)
    rho = np.exp(b - b.max())
    cum = np.concatenate([[0.0], np.cumsum(rho)])
    tau = np.interp(np.linspace(0.0, 1.0, n), cum / cum[-1], np.linspace(0.0, 1.0, len(b) + 1))
    lw = np.interp(tau, np.linspace(0.0, 1.0, n), lg)
    end = float(np.clip(lg[-1] + th[0], math.log(sigma_floor), lg[0] - 1.0))
    lw = lg[0] + (lw - lg[0]) * (end - lg[0]) / (lg[-1] - lg[0])
    s = torch.from_numpy(np.exp(lw))
    s[0] = start[0]
    return torch.cat([s, s.new_zeros(1)])


def _per_sample(field, xbar: Tensor, grid: Tensor, method: str, reference: Tensor,
                scales=None) -> Tensor | None:
    """Per-sample mean squared error of x̄(0) on `grid` (with UniPC's fitted `scales`, `probflow.coefficients`)
    against `reference`, in batch order (None: failed)."""
    try:
        state = None if scales is None else scales_state(scales, grid)
        out = integrate(field, xbar, check_grid(grid), method, state=state).x
    except (FloatingPointError, ValueError):
        return None
    per = (out.double() - reference.double()).pow(2).flatten(1).mean(1)
    return per if bool(torch.isfinite(per).all()) else None


def _trimmed(per: Tensor | None, drop_worst: int = 0) -> float:
    """RMS over the per-sample mean squared errors `per`, leaving out the `drop_worst` largest."""
    if per is None:
        return math.inf
    return float(per.sort().values[: max(1, len(per) - drop_worst)].mean().sqrt())


def _solve_error(field, xbar: Tensor, grid: Tensor, method: str, reference: Tensor, drop_worst: int = 0) -> float:
    """RMS error of x̄(0) on `grid` over the batch leaving out the `drop_worst` largest (inf: failed). Why: on a
    multimodal model a sample near a mode boundary can end in another mode for a few-step grid; on a small batch
    one such sample decides the plain RMS, so a fit would choose by it."""
    return _trimmed(_per_sample(field, xbar, grid, method, reference), drop_worst)


def optimise_grid(model, xbar: Tensor, reference: Tensor, start: Tensor, method: str, *, sigma_floor: float,
                  bins: int = 8, max_evals: int = 200, drop_worst: int = 0,
                  trust: float | None = None) -> tuple[Tensor, float]:
    """min over θ of the calibration RMSE of `method` on `warped(start, θ, sigma_floor)` (Nelder–Mead from θ = 0,
    at most `max_evals` solves of the batch `xbar` (x̄ at σ_max), each costing the grid's NFE; the `drop_worst`
    samples with the largest error left out, `_solve_error`). `trust` bounds the warp's step density: the bin
    parameters b_k are clipped to [−trust/2, trust/2], so no bin's density changes by more than e^trust against
    another's (a trust region around the start grid; None: unbounded). Returns the grid and its calibration RMSE,
    never worse than `start`'s on this batch."""
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected a positive integer, got {bins!r}")
    if not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals: expected a positive integer, got {max_evals!r}")
    if trust is not None and not (isinstance(trust, (int, float)) and trust > 0):
        raise ValueError(f"trust: expected a positive number or None, got {trust!r}")
    field = as_field(model)

    def bounded(theta) -> np.ndarray:
        th = np.array(theta, dtype=np.float64)
        if trust is not None:
            th[1:] = np.clip(th[1:], -0.5 * trust, 0.5 * trust)
        return th

    def loss(theta) -> float:
        grid = warped(start, bounded(theta), sigma_floor)
        return math.log(_solve_error(field, xbar, grid, method, reference, drop_worst) + 1e-300)

    theta0 = np.zeros(bins + 1)
    simplex = np.vstack([theta0] + [theta0 + 0.5 * np.eye(bins + 1)[i] for i in range(bins + 1)])
    res = minimize(loss, theta0, method="Nelder-Mead",
                   options={"maxfev": max_evals, "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-3})
    start_err = _solve_error(field, xbar, start, method, reference, drop_worst)
    if math.exp(res.fun) < start_err:
        return warped(start, bounded(res.x), sigma_floor), math.exp(res.fun)
    return start.clone(), start_err


def candidate_grids(schedule: Schedule, steps: int) -> dict[str, Tensor]:
    """`fit_recipe`'s start grids: power-in-t (`grids.t_power`, q ∈ {2, 2.5, 3}) and log-SNR uniform, each ending at
    σ_min ∈ {σ_0, 0.02, 0.03, 0.05, 0.1} (those above σ_0), then 0."""
    ends = sorted({schedule.sigma_min} | {e for e in (0.02, 0.03, 0.05, 0.1) if e > schedule.sigma_min})
    out = {f"t^{q:g}/{e:.3g}": t_power(schedule, steps, q, e) for q in (2.0, 2.5, 3.0) for e in ends}
    out.update({f"logsnr/{e:.3g}": log_uniform(schedule.sigma_max, e, steps) for e in ends})
    return out


FIT_METHODS = ("unipc", "unipc_3")
# UniPC's fitted factors from this many steps up: below it, on the tuning problems of benchmarks/FAIR.md, factors
# that the validation batch confirmed were worse on fresh noise (benchmarks/DESIGN.md).
COEF_MIN_STEPS = 20


class Fitted(NamedTuple):
    """`fit_recipe`'s answer: method and grid; the start grid's name; calibration and validation RMSE (validation:
    every sample) of the start and the fitted grid; model calls spent (batched, references included); whether the
    fitted grid was kept (else `grid` is the start grid); UniPC's fitted per-interval factors where the validation
    batch confirmed them (else None) and the backward passes their fit spent. Solve with
    `integrate(model, x, f.grid, f.method, state=f.state)`."""

    method: str
    grid: Tensor
    start: str
    cal_rmse: tuple[float, float]
    val_rmse: tuple[float, float]
    calls: int
    kept: bool = False
    scales: tuple | None = None
    backward: int = 0

    @property
    def state(self):
        """The start state that carries `scales` (None without them)."""
        return None if self.scales is None else scales_state(self.scales, self.grid)


def _batch(name: str, b, like: Tensor | None = None) -> Tensor:
    if not isinstance(b, Tensor) or b.ndim < 1 or not b.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point batch (B, ...) in the model's variable")
    if like is not None and b.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name}: expected samples of shape {tuple(like.shape[1:])}, got {tuple(b.shape[1:])}")
    return b.double()


def _confirmed(start: Tensor | None, fit: Tensor | None, drop_worst: int, jump: float | None) -> bool:
    """The validation rule of `fit_recipe` on the per-sample errors (batch order) of the start and the fitted grid:
    the trimmed RMSE must be lower and, unless `jump` is None, no sample may be sent into another mode by the
    fitted grid alone: an RMS error above `jump` × the same sample's on the start grid and above `jump` × the
    start's median (paired, the batches being the same noise: a sample near a mode boundary that both grids switch
    does not count; one that only the fitted grid switches, which the trimmed RMSE may leave out, does)."""
    if fit is None:
        return False
    if start is None:
        return True
    ok = _trimmed(fit, drop_worst) < _trimmed(start, drop_worst)
    return ok and (jump is None or not bool(((fit > jump**2 * start) & (fit > jump**2 * start.median())).any()))


def fit_recipe(model, x: Tensor, x_val: Tensor, schedule: Schedule, nfe: int, methods: tuple[str, ...] = FIT_METHODS,
               *, bins: int = 12, max_evals: int = 400, drop_worst: int = 1, trust: float | None = None,
               jump: float | None = None, coef_iters: int = 200, coef_lr: float = 0.005,
               ref_tol: float = 1e-10, references: tuple[Tensor, Tensor] | None = None) -> Fitted:
    """A per-model recipe at `nfe` model calls per sample, fitted on the model's own noise (opt-in):

    1. every method of `methods` × every `candidate_grids` start grid, solved on the calibration batch `x` (in the
       model's variable, as `probflow.sample` takes it); the smallest RMSE of x̄(0) against the batch's reference
       picks the method and start grid;
    2. `optimise_grid` moves that grid's points (end point and step density, `bins` + 1 numbers, ≤ `max_evals`
       solves, step density within `trust`) to minimise the same RMSE, never below the schedule's σ_0 (the model's
       trained range);
    3. the fitted grid is kept only if the separate validation batch `x_val` confirms it (`_confirmed`: a lower
       trimmed RMSE, and, with `jump` set (opt-in), no validation sample whose error the fitted grid alone makes
       `jump` times larger, a switch to another mode), else the start grid is returned, so that a fit to the
       calibration noise does not survive;
    4. for UniPC on `COEF_MIN_STEPS` steps or more, per-interval factors on the higher-order parts of its
       predictor and corrector fitted on `x` on that grid (`probflow.coefficients.fit_scales`, Adam, `coef_iters`
       solves at rate `coef_lr`, the model's backward pass; 0: skipped), kept by the same validation rule
       against the grid without them. They lower the typical sample's error, and can send a sample that sits
       near a decision between modes across it, which a validation batch of typical samples does not show
       (benchmarks/FAIR.md); `coef_iters=0` keeps the grid alone.

    The RMSEs leave out the `drop_worst` samples with the largest error (`_solve_error`: on a multimodal model
    one sample that ends in another mode would otherwise decide every choice; on the tuning problems of
    benchmarks/FAIR.md, leaving out 1 of 32 beat leaving out none and leaving out 10 % at NFE 10, 20 and 50).
    Leaving out the worst sample would also hide a fitted grid that switches one validation sample into another
    mode that the start grid does not: hence the paired `jump` test (e.g. 10), off by default because on the
    tuning problems (fresh noise, `benchmarks/fit_design.py`) it kept the same fits as the trimmed RMSE alone with
    32 validation samples, so nothing measured yet favours it;
    comparing the largest errors instead (unpaired) rejected good fits at NFE 10, where every grid switches some
    samples, and so did 256 validation samples (there one switch more or less decides the RMSE).

    References: `scipy_dop853` at rtol = atol = `ref_tol` per batch (pass `references` = (x̄(0) of x, of x_val)
    to reuse them across NFEs). Cost (`Fitted.calls`, batched model calls): the references (≈ 10³ each, unless
    given) + nfe·(len(methods)·len(candidates) + ≤ max_evals + 2 + 2 + 1) on batches of len(x) or len(x_val),
    and for UniPC coef_iters·nfe more calls with as many backward passes (`Fitted.backward`) on len(x).
    """
    check_steps(nfe)
    if not methods or len({get_method(m).steps_for_nfe(nfe) for m in methods}) != 1:
        raise ValueError(f"methods: expected methods with equal steps for nfe = {nfe}, got {methods!r}")
    x, x_val = _batch("x", x), _batch("x_val", x_val, x)
    n_min = min(len(x), len(x_val))
    if isinstance(drop_worst, bool) or not isinstance(drop_worst, int) or not 0 <= drop_worst < n_min:
        raise ValueError(f"drop_worst: expected an integer in [0, {n_min}) (the smaller batch), got {drop_worst!r}")
    if jump is not None and (isinstance(jump, bool) or not isinstance(jump, (int, float)) or not jump > 1):
        raise ValueError(f"jump: expected a number > 1 (an error ratio) or None, got {jump!r}")
    if isinstance(coef_iters, bool) or not isinstance(coef_iters, int) or coef_iters < 0:
        raise ValueError(f"coef_iters: expected a non-negative integer (0: no fitted coefficients), got {coef_iters!r}")
    if not (isinstance(coef_lr, (int, float)) and math.isfinite(coef_lr) and coef_lr > 0):
        raise ValueError(f"coef_lr: expected a positive learning rate, got {coef_lr!r}")
    field = DDIMField(model) if not isinstance(model, DDIMField) else model
    calls0 = field.nfe
    scale = math.sqrt(1.0 + schedule.sigma_max**2)
    xb, xv = x * scale, x_val * scale
    if references is None:
        references = (_reference(field, xb, schedule.sigma_max, ref_tol),
                      _reference(field, xv, schedule.sigma_max, ref_tol))
    ref, ref_val = references
    if ref.shape != xb.shape or ref_val.shape != xv.shape:
        raise ValueError("references: expected x̄(0) of the calibration and validation batches, shaped like them")
    steps = get_method(methods[0]).steps_for_nfe(nfe)
    cands = candidate_grids(schedule, steps)
    scores = {(m, g): _solve_error(field, xb, grid, m, ref, drop_worst) for m in methods
              for g, grid in cands.items()}
    method, name = min(scores, key=lambda k: (scores[k], k))
    if not math.isfinite(scores[(method, name)]):
        raise ValueError(f"nfe: no candidate grid solved the calibration batch at nfe = {nfe}")
    grid, cal = optimise_grid(field, xb, ref, cands[name], method, sigma_floor=schedule.sigma_min, bins=bins,
                              max_evals=max_evals, drop_worst=drop_worst, trust=trust)
    per = (_per_sample(field, xv, cands[name], method, ref_val), _per_sample(field, xv, grid, method, ref_val))
    kept = _confirmed(*per, drop_worst, jump)
    grid, scales, backward = grid if kept else cands[name], None, 0
    if coef_iters and method in SCALED_METHODS and steps >= COEF_MIN_STEPS:
        calls1 = field.nfe
        fitted = fit_scales(field, xb, ref, grid, method, iters=coef_iters, lr=coef_lr, drop_worst=drop_worst)[0]
        backward = field.nfe - calls1
        plain = per[1] if kept else per[0]
        if _confirmed(plain, _per_sample(field, xv, grid, method, ref_val, fitted), drop_worst, jump):
            scales = fitted
    return Fitted(method, grid, name, (scores[(method, name)], cal), (_trimmed(per[0]), _trimmed(per[1])),
                  field.nfe - calls0, kept, scales, backward)
