"""Solver comparison against exact ground truth and against diffusers, in one run (`probflow bench`).

Every solver integrates Eq. 12, dx̄/dσ = ε(x̄/sqrt(1+σ²), σ), *down* from σ_max (t = T−1 of the DDPM linear
table) to σ = 0, from the same x_T; at σ = 0, x̄ = x = x_0, which is compared with a reference x_0 from the
same noise (MATH.md §7):

- Gaussian mixtures (ε exact): reference = `scipy_dop853` at rtol = atol = 1e-12 in float64, its own
  convergence checked against a second solve at 1e-10 (the max difference is reported).
- The digits model (a network): reference = the tightest feasible adaptive float64 solve, checked the same
  way against a looser one; plus the Fréchet distance of each solver's samples to the test digits.

Methods: every registered method (`probflow.solvers.METHODS`, so methods registered later appear by
themselves) except the reference; fixed-grid ones on every grid of `GRIDS` at NFE ≈ 5 … 100 (steps =
round(NFE / stages), NFE counted by the field), adaptive ones at rtol = atol = 1e-2 … 1e-7 (rejected steps
counted). Peers: diffusers' schedulers driven as pipelines drive them (`probflow.peers`).

Metrics: RMSE of x_0 over all samples and coordinates; the median over samples of the per-sample RMS error
(a few samples that land in another mixture component dominate the RMSE); NFE; wall time.

Helper API for notebooks and other benchmarks: `mixture_workload`, `run_mixture_suite`, `error_vs_nfe`,
`convergence_order`, `best_per_nfe`, `solver_overhead`; grids by name in `GRIDS` (extend with
`register_grid`, or pass the name of a function `f(schedule, steps)` in `probflow.grids`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from probflow import calibrate as _calibrate
from probflow import grids as _grids
from probflow import peers as _peers
from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.io.atomic import atomic_write
from probflow.models import GaussianMixture
from probflow.schedules import Schedule, linear
from probflow.solvers import METHODS, Method

__all__ = [
    "GRIDS", "NFE", "TOLERANCES", "Workload", "register_grid", "grid_sigmas", "fixed_methods", "adaptive_methods",
    "mixture_workload", "digits_workload", "run_workload", "run_mixture_suite", "error_vs_nfe", "convergence_order",
    "best_per_nfe", "solver_overhead", "add_bench_arguments", "run_bench",
]

REFERENCE = "scipy_dop853"
NFE = (5, 10, 20, 50, 100)
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
GridBuilder = Callable[[Schedule, int], Tensor]

# ------------------------------------------------------------------------------------------------ grids

GRIDS: dict[str, GridBuilder] = {
    "uniform": lambda s, n: _grids.ddim(s, n, "uniform"),      # DDIM trailing, uniform in t
    "quadratic": lambda s, n: _grids.ddim(s, n, "quadratic"),  # DDIM trailing, quadratic in t
    "logsnr": lambda s, n: _grids.log_uniform(s.sigma_max, s.sigma_min, n),  # uniform in log σ
    "karras": lambda s, n: _grids.karras(s.sigma_max, s.sigma_min, n, 7.0),  # Karras ρ = 7
    "sigma_uniform": lambda s, n: torch.linspace(s.sigma_max, 0.0, n + 1, dtype=torch.float64),  # equal steps in σ
    "log_snr_tuned": lambda s, n: _grids.log_snr_tuned(s, n),  # log-SNR uniform from σ_max to 3σ_0
}
# "calibrated" is not a builder of (schedule, steps) alone: it needs the workload's model, so `run_workload` makes
# it per workload (`grids.calibrated_builder`, see `CALIBRATION`).
CALIBRATED = "calibrated"
DEFAULT_GRIDS = ("uniform", "quadratic", "logsnr", "karras", "log_snr_tuned", CALIBRATED)
# How the calibrated grid is made and used: optimised for `method` (`grids.calibrated_builder`, on its own
# calibration noise, seed 1234, independent of every workload's noise), used by `methods` at the NFE targets `nfe`
# (None: every NFE); `options` go to `calibrated_builder`. Its cost is reported, not counted in per-sample NFE.
# The default methods take one call per step (steps = NFE), so one calibration per NFE serves them all.
CALIBRATION = {"method": "unipc_3", "methods": ("dpmpp_2m", "unipc", "unipc_3"), "nfe": None, "options": {}}
# Methods whose coefficients assume equal steps in σ (torchdiffeq's Adams methods, `Method.uniform_steps`) are
# wrong on every other grid (integrate refuses them), so the benchmark runs them on this grid instead.
UNIFORM_STEP_GRID = "sigma_uniform"


def register_grid(name: str, builder: GridBuilder, *, replace: bool = False) -> None:
    """Add a grid `builder(schedule, steps) -> σ grid` (decreasing, σ_max … 0, steps + 1 points) by name."""
    if name in GRIDS and not replace:
        raise ValueError(f"grid: {name!r} is already registered")
    GRIDS[name] = builder


def grid_sigmas(grid: str | GridBuilder, schedule: Schedule, steps: int) -> Tensor:
    """The σ grid of `steps` steps: a name in `GRIDS`, the name of a function f(schedule, steps) in
    `probflow.grids`, or a builder; checked to run from σ_max to 0. ("calibrated" needs a model: see
    `run_workload`.)"""
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


def _grid_name(grid: str | GridBuilder) -> str:
    return grid if isinstance(grid, str) else getattr(grid, "__name__", "custom")


# ------------------------------------------------------------------------------------------------ methods


def _register_all() -> None:
    """Import the modules that register solvers, so that every method shows up (failures are skipped)."""
    import importlib

    for mod in ("probflow.exponential", "probflow.reversible"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - a module being written elsewhere must not break the benchmark
            pass


def fixed_methods() -> list[str]:
    """Every registered fixed-grid method (probflow's own and torchdiffeq's)."""
    _register_all()
    return [n for n, m in METHODS.items() if not m.adaptive]


def adaptive_methods() -> list[str]:
    """Every registered adaptive method except the scipy reference."""
    _register_all()
    return [n for n, m in METHODS.items() if m.adaptive and n != REFERENCE]


# Model calls a probflow method makes beyond stages × steps (dpmpp_3m: one, for its start), learnt from the warm-up
# solve of each method (`_warm_up`), so that steps are chosen for counted NFE ≤ target.
_EXTRA_CALLS: dict[str, int] = {}


def _steps(method: Method, nfe: int) -> int:
    return max(1, int(round((nfe - _EXTRA_CALLS.get(method.name, 0)) / max(1, method.stages))))


# ------------------------------------------------------------------------------------------------ models


def sharp_mixture(dim: int, components: int = 8, seed: int = 0, std_range: tuple[float, float] = (0.05, 0.5)
                  ) -> GaussianMixture:
    """`GaussianMixture.random(dim, components, seed, std_range)`: full covariances, per-direction std
    log-uniform in `std_range` (down to 0.05: sharp components, like data near a manifold)."""
    return GaussianMixture.random(dim, components, seed, std_range=std_range)


# ------------------------------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    """Same noise, same start σ_max, same end σ = 0 for every solver. noise: x_T in the model's variable
    (float64); reference: x_0 from it; ref: how the reference was made and its convergence check."""

    name: str
    model: Any
    schedule: Schedule
    noise: Tensor
    reference: Tensor
    ref: dict
    model_dtype: torch.dtype | None = None
    extra: dict = field(default_factory=dict)

    @property
    def xbar(self) -> Tensor:
        return self.noise * math.sqrt(1.0 + self.schedule.sigma_max**2)

    def field(self) -> DDIMField:
        return DDIMField(self.model, model_dtype=self.model_dtype)


def _reference(model, xbar: Tensor, schedule: Schedule, method: str, tol: float, check_tol: float,
               model_dtype: torch.dtype | None, options: dict | None) -> tuple[Tensor, dict]:
    """x_0 from a tight float64 solve, and the max |difference| to a looser solve (its convergence check)."""
    end = torch.tensor([schedule.sigma_max, 0.0], dtype=torch.float64)
    out = {}
    for key, t in (("tight", tol), ("check", check_tol)):
        f = DDIMField(model, model_dtype=model_dtype)
        t0 = time.perf_counter()
        sol = integrate(f, xbar, end, method, rtol=t, atol=t, options=options)
        out[key] = (sol.x, sol.nfe, time.perf_counter() - t0)
    x, nfe, wall = out["tight"]
    diff = (x - out["check"][0]).abs()
    info = {"method": method, "rtol": tol, "atol": tol, "options": options or {}, "nfe": nfe, "wall_s": wall,
            "check_rtol": check_tol, "check_nfe": out["check"][1],
            "check_max_abs_diff": float(diff.max()),
            "check_rmse": float(diff.pow(2).mean().sqrt())}
    return x, info


@functools.lru_cache(maxsize=8)
def mixture_workload(dim: int = 64, n_samples: int = 128, seed: int = 0, components: int = 8,
                     std_range: tuple[float, float] = (0.05, 0.5), ref_tol: float = 1e-12,
                     check_tol: float = 1e-10, group: int | None = None) -> Workload:
    """A sharp Gaussian-mixture workload (`sharp_mixture(dim, components, seed)`), n_samples x_T =
    `probflow.noise(n, (dim,), seed + 1)`, reference DOP853 at `ref_tol` checked against `check_tol`.
    Cached per arguments (the reference is the expensive part)."""
    from probflow.flows import noise

    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive integer, got {dim!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples: expected a positive integer, got {n_samples!r}")
    model = sharp_mixture(dim, components, seed, std_range)
    sch = linear()
    z = noise(n_samples, (dim,), seed + 1)
    group = group or max(1, min(n_samples, 1024 // dim))
    x0, info = _reference(model, z * math.sqrt(1 + sch.sigma_max**2), sch, REFERENCE, ref_tol, check_tol, None,
                          {"group": group})
    return Workload(f"mixture D={dim}", model, sch, z, x0, info,
                    extra={"dim": dim, "components": components, "std_range": list(std_range), "seed": seed,
                           "n_samples": n_samples})


def digits_workload(n_samples: int = 16, seed: int = 0, ref_method: str = "dopri5", ref_tol: float = 1e-5,
                    check_tol: float = 1e-4, folder: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, ref_dtype: torch.dtype | None = None) -> Workload:
    """The digits ε-UNet, x_T = `probflow.noise(n, (1, 8, 8), seed)`, σ_max → 0 in x̄ (float64 state).

    dtype: the network's dtype for the benchmarked solvers (None: the shipped float32, as users run it;
    float64 costs 3× per call on CPU). ref_dtype: the network's dtype for the reference (None: the same;
    float64 for tolerances near float32's rounding of ε, ~1e-7). Reference =
    `ref_method` at `ref_tol`, checked against a solve at `check_tol`; its field differs from the solvers' only
    by that rounding (reported as `float32_field_diff`: the largest |Δε| at σ_max, 1 and 0.01 near the flow).
    folder: a checkpoint folder (`probflow.digits.load_model`), default the shipped model
    (`probflow.models.load("digits")`). Raises FileNotFoundError/ValueError when absent."""
    from probflow.flows import noise

    model = _load_digits(folder)
    if dtype is not None:
        model = _with_dtype(model, dtype)
    ref_model = _with_dtype(model, ref_dtype) if ref_dtype is not None else model
    sch = model.schedule
    shape = tuple(model.sample_shape or (1, 8, 8))
    z = noise(n_samples, shape, seed)
    md, rd = getattr(model, "model_dtype", None), getattr(ref_model, "model_dtype", None)
    xbar = z * math.sqrt(1 + sch.sigma_max**2)
    x0, info = _reference(ref_model, xbar, sch, ref_method, ref_tol, check_tol, rd, None)
    info["network_dtype"] = str(rd).replace("torch.", "")
    if rd != md:
        with torch.no_grad():
            fields = [DDIMField(m, model_dtype=d) for m, d in ((model, md), (ref_model, rd))]
            pts = [(sch.sigma_max, xbar), (1.0, x0 + z), (0.01, x0 + 0.01 * z)]  # x̄ ≈ x_0 + σ z on the way
            info["float32_field_diff"] = max(float((fields[0](s, xb) - fields[1](s, xb)).abs().max()) for s, xb in
                                             ((torch.tensor(v, dtype=torch.float64), xb) for v, xb in pts))
    return Workload("digits", model, sch, z, x0, info, md,
                    extra={"n_samples": n_samples, "shape": list(shape), "seed": seed,
                           "network_dtype": str(md).replace("torch.", ""),
                           "fingerprint": getattr(model, "fingerprint", None)})


def _load_digits(folder: str | os.PathLike | None = None):
    from probflow.models.digits import load_model

    if folder is not None:
        return load_model(folder)
    from probflow.models import load

    return load("digits")


def _with_dtype(model, dtype: torch.dtype):
    """A copy of a `DiscreteTimeModel` whose network runs in `dtype` (the original is left as it is)."""
    import copy

    out = copy.copy(model)
    out.net = copy.deepcopy(model.net).to(dtype)
    out.model_dtype = dtype
    return out


# ------------------------------------------------------------------------------------------------ running


def _errors(x: Tensor, ref: Tensor) -> dict:
    d = (x.double() - ref.double()).reshape(len(ref), -1)
    per = d.pow(2).mean(1).sqrt()
    return {"rmse": float(d.pow(2).mean().sqrt()), "median": float(per.median()), "max": float(per.max())}


def _finish(row: dict, w: Workload, x: Tensor) -> None:
    row.update(_errors(x, w.reference))
    if w.extra.get("keep_x"):
        row["_x"] = x.detach().float().reshape(len(x), -1)


def _row(w: Workload, family: str, method: str, grid: str, **kw) -> dict:
    return {"workload": w.name, "family": family, "method": method, "grid": grid, "nfe_target": None, "steps": None,
            "tol": None, "nfe": None, "rmse": math.nan, "median": math.nan, "max": math.nan, "wall_s": None,
            "error": None, "notes": [], **kw}


def _solve(w: Workload, method: str, sigmas: Tensor, **kw) -> tuple[Tensor, int, float]:
    f = w.field()
    t0 = time.perf_counter()
    sol = integrate(f, w.xbar, sigmas, method, **kw)
    return sol.x, sol.nfe, time.perf_counter() - t0


def run_fixed(w: Workload, method: str, grid: str | GridBuilder, nfe: int) -> dict:
    """One fixed-grid solve at NFE ≈ `nfe` (steps = round(nfe / stages)); the row of its errors."""
    m = METHODS[method]
    steps = _steps(m, nfe)
    row = _row(w, "probflow", method, _grid_name(grid), nfe_target=nfe, steps=steps)
    try:
        x, row["nfe"], row["wall_s"] = _solve(w, method, grid_sigmas(grid, w.schedule, steps))
        _finish(row, w, x)
    except (FloatingPointError, RuntimeError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def run_adaptive(w: Workload, method: str, tol: float) -> dict:
    """One adaptive solve at rtol = atol = `tol` from σ_max to 0 (NFE counts rejected steps)."""
    row = _row(w, "adaptive", method, "adaptive", tol=tol)
    try:
        end = torch.tensor([w.schedule.sigma_max, 0.0], dtype=torch.float64)
        x, row["nfe"], row["wall_s"] = _solve(w, method, end, rtol=tol, atol=tol)
        _finish(row, w, x)
    except (FloatingPointError, RuntimeError, ValueError, AssertionError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def run_peer(w: Workload, name: str, grid: str, nfe: int) -> dict:
    """One diffusers peer at NFE ≈ `nfe` on `grid` ("trailing", "karras", "karras_sigma")."""
    steps = _peers.steps_for_nfe(name, nfe)
    row = _row(w, "peer", name, grid, nfe_target=nfe, steps=steps)
    model = w.model
    if w.model_dtype is not None:
        md = w.model_dtype
        model = _cast_model(w.model, md)
    try:
        t0 = time.perf_counter()
        r = _peers.run_peer(name, model, w.noise, w.schedule, steps, grid)
        row["wall_s"] = time.perf_counter() - t0
        row["nfe"], row["notes"] = r.nfe, r.notes
        _finish(row, w, r.x)
    except (FloatingPointError, RuntimeError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def _cast_model(model, dtype):
    def eps(x: Tensor, sigma: Tensor) -> Tensor:
        return model(x.to(dtype), sigma.to(dtype)).to(x.dtype)
    return eps


def run_workload(w: Workload, methods: Sequence[str] | None = None, grids: Sequence[str | GridBuilder] | None = None,
                 nfe: Sequence[int] = NFE, tolerances: Sequence[float] = TOLERANCES,
                 peers: Sequence[str] | None = None, peer_grids: Sequence[str] | None = None,
                 progress: bool | Callable[[Iterable], Iterable] = False,
                 calibration: dict | None = None) -> list[dict]:
    """Rows for every (method × grid × NFE), (adaptive method × tolerance), (peer × peer grid × NFE).

    methods: registered names (default: all but the reference; fixed and adaptive are told apart by the
    registry). grids: names or builders (default `DEFAULT_GRIDS`); a method that needs equal steps in σ
    (`Method.uniform_steps`: torchdiffeq's Adams methods) runs on `UNIFORM_STEP_GRID` instead. peers:
    diffusers peer names (default all, or none where diffusers is absent); peer_grids: restrict the peers'
    grids (default: each peer's all). The grid "calibrated" is `grids.calibrated_builder(w.model, shape,
    calibration["method"], **calibration["options"])` (default `CALIBRATION`), run by calibration["methods"]
    at the NFE targets calibration["nfe"] (None: all); its cost (NFE, seconds per step count, the first including the
    calibration batch's reference solve) goes into `w.extra["calibration"]`, not into any row's NFE.
    """
    methods = list(methods) if methods is not None else fixed_methods() + adaptive_methods()
    for m in methods:
        if m not in METHODS or m == REFERENCE:
            raise ValueError(f"methods: {m!r} is not a registered solver (or is the reference)")
    grids = list(grids) if grids is not None else list(DEFAULT_GRIDS)
    if peers is None:
        peers = _peers.peer_names() if _peers.available() else []
    cal = dict(CALIBRATION, **(calibration or {}))
    cal_builder = _calibrated_grid(w, cal) if CALIBRATED in grids else None
    tasks: list[Callable[[], dict]] = []
    for m in methods:
        if METHODS[m].adaptive:
            tasks += [functools.partial(run_adaptive, w, m, t) for t in tolerances]
        else:
            gs = [UNIFORM_STEP_GRID] if METHODS[m].uniform_steps else grids
            for g in gs:
                if g == CALIBRATED:
                    if m in cal["methods"]:
                        tasks += [functools.partial(run_fixed, w, m, cal_builder, n) for n in nfe
                                  if cal["nfe"] is None or n in cal["nfe"]]
                else:
                    tasks += [functools.partial(run_fixed, w, m, g, n) for n in nfe]
    for p in peers:
        for g in _peers.peer_grids(p):
            if peer_grids is None or g in peer_grids:
                tasks += [functools.partial(run_peer, w, p, g, n) for n in nfe]
    _warm_up(w, [m for m in methods if not METHODS[m].adaptive], peers)
    it: Iterable = tasks
    if progress is True:
        from tqdm import tqdm

        it = tqdm(tasks, desc=w.name, unit="solve", leave=False, file=sys.stderr)
    elif callable(progress):
        it = progress(tasks)
    return [_noting_warnings(t) for t in it]


def _calibrated_grid(w: Workload, cal: dict) -> GridBuilder:
    """The workload's calibrated grid builder, timed and counted per step count into w.extra["calibration"]."""
    f = DDIMField(w.model, model_dtype=w.model_dtype)  # as_field keeps a field as is, so its NFE counts
    inner = _calibrate.calibrated_builder(f, tuple(w.noise.shape[1:]), cal["method"], **cal["options"])
    info = {"method": cal["method"], "methods": list(cal["methods"]),
            "nfe": None if cal["nfe"] is None else list(cal["nfe"]),
            "options": dict(cal["options"]), "per_steps": {}, "cost_nfe": 0, "wall_s": 0.0}
    w.extra["calibration"] = info

    def builder(schedule: Schedule, steps: int) -> Tensor:
        n0, t0 = f.nfe, time.perf_counter()
        out = inner(schedule, steps)
        if f.nfe > n0:
            dt = time.perf_counter() - t0
            info["per_steps"][str(steps)] = {"nfe": f.nfe - n0, "wall_s": dt}
            info["cost_nfe"] += f.nfe - n0
            info["wall_s"] += dt
        return out

    builder.__name__ = CALIBRATED
    return builder


def _warm_up(w: Workload, methods: Sequence[str], peers: Sequence[str]) -> None:
    """One 3-step solve of one sample per method and peer before anything is timed, so that no row's wall
    time includes a first call's lazy imports and caches (diffusers' first scheduler costs ~1 s); it also
    measures the calls a method makes beyond stages × steps (`_EXTRA_CALLS`)."""
    one = Workload(w.name, w.model, w.schedule, w.noise[:1], w.reference[:1], w.ref, w.model_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in methods:
            mm = METHODS[m]
            try:
                _, nfe, _ = _solve(one, m, grid_sigmas(UNIFORM_STEP_GRID if mm.uniform_steps else "uniform",
                                                        one.schedule, 3))
                if mm.backend == "probflow":  # a fixed start-up cost; torchdiffeq's Adams start-up varies
                    _EXTRA_CALLS[m] = max(0, nfe - 3 * max(1, mm.stages))
            except (FloatingPointError, RuntimeError, ValueError):
                pass
        for p in peers:
            run_peer(one, p, _peers.peer_grids(p)[-1], 2)


def _noting_warnings(task: Callable[[], dict]) -> dict:
    """Run one solve; warnings it raises (e.g. torchdiffeq's "Functional iteration did not converge" of
    implicit Adams) go into the row's notes instead of the terminal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = task()
    msgs = sorted({str(c.message) for c in caught if not issubclass(c.category, (DeprecationWarning, FutureWarning))})
    row["notes"] = list(row["notes"]) + [f"warning: {m}" for m in msgs]
    return row


def run_mixture_suite(dim: int = 64, n_samples: int = 128, nfe: Sequence[int] = NFE,
                      methods: Sequence[str] | None = None, grids: Sequence[str | GridBuilder] | None = None,
                      peers: Sequence[str] | None = None, tolerances: Sequence[float] = TOLERANCES, seed: int = 0,
                      progress: bool = False) -> list[dict]:
    """The sharp-mixture suite at dimension `dim` (K = 8, std down to 0.05): rows of every method × grid ×
    NFE, adaptive × tolerance and diffusers peer × grid × NFE, errors against DOP853 at 1e-12. The
    workload (and its reference) is cached, so repeated calls only pay for the solves.
    Summarise with `best_per_nfe(rows)`."""
    w = mixture_workload(dim, n_samples, seed)
    return run_workload(w, methods, grids, nfe, tolerances, peers, None, progress)


def error_vs_nfe(model, methods: Sequence[str], grids: Sequence[str | GridBuilder] = ("uniform",),
                 nfe_list: Sequence[int] = NFE, n_samples: int = 64, seed: int = 0, *,
                 schedule: Schedule | None = None, shape: tuple[int, ...] | None = None,
                 peers: Sequence[str] = (), ref_tol: float = 1e-12, check_tol: float = 1e-10) -> list[dict]:
    """Error vs NFE of `methods` on `grids` for any ε-model with a closed form (or any model, at the cost
    of a DOP853 reference): x_T = `probflow.noise(n_samples, shape, seed)`, reference DOP853 at `ref_tol`.
    shape defaults to (model.dim,); schedule to the linear DDPM table. Rows as `run_workload`; the
    reference and its convergence check are in every row under "reference"."""
    from probflow.flows import noise

    sch = schedule or linear()
    if shape is None:
        if not hasattr(model, "dim"):
            raise ValueError("shape: give the sample shape for a model without a `dim`")
        shape = (model.dim,)
    z = noise(n_samples, tuple(shape), seed)
    dim = int(np.prod(shape))
    x0, info = _reference(model, z * math.sqrt(1 + sch.sigma_max**2), sch, REFERENCE, ref_tol, check_tol, None,
                          {"group": max(1, min(n_samples, 1024 // dim))})
    w = Workload(getattr(model, "name", type(model).__name__), model, sch, z, x0, info)
    rows = run_workload(w, methods, grids, nfe_list, TOLERANCES, peers)
    for r in rows:
        r["reference"] = info
    return rows


def convergence_order(model, method: str, grid: str | GridBuilder = "uniform", steps: Sequence[int] = (8, 16, 32, 64),
                      n_samples: int = 32, seed: int = 0, *, schedule: Schedule | None = None,
                      shape: tuple[int, ...] | None = None) -> dict:
    """Measured order of `method` on `grid`: the least-squares slope p of log RMSE = −p·log steps + c
    against a DOP853 reference at 1e-12, and the local orders log2(e_k/e_{k+1}) for doubled steps."""
    if METHODS.get(method) is None or METHODS[method].adaptive:
        raise ValueError(f"method: expected a registered fixed-grid solver, got {method!r}")
    steps = [int(s) for s in steps]
    if len(steps) < 2:
        raise ValueError("steps: need at least two step counts")
    st = METHODS[method].stages
    rows = error_vs_nfe(model, [method], [grid], [s * st for s in steps], n_samples, seed, schedule=schedule,
                        shape=shape)
    errs = np.array([r["rmse"] for r in rows])
    ns = np.array([r["steps"] for r in rows], dtype=float)
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    local = [float(np.log(errs[i] / errs[i + 1]) / np.log(ns[i + 1] / ns[i])) for i in range(len(ns) - 1)]
    return {"method": method, "grid": _grid_name(grid), "steps": ns.astype(int).tolist(),
            "nfe": [r["nfe"] for r in rows], "rmse": errs.tolist(), "order": float(slope), "local_orders": local,
            "declared_order": METHODS[method].order, "reference": rows[0]["reference"]}


# ------------------------------------------------------------------------------------------------ summaries


def best_per_nfe(rows: Sequence[dict], key: str = "rmse") -> list[dict]:
    """Per target NFE, probflow's best fixed-grid method+grid and the best diffusers peer+grid by `key`
    ("rmse" or "median"), counting only runs whose measured NFE ≤ the target (no one gets extra calls)."""
    out = []
    for n in sorted({r["nfe_target"] for r in rows if r["nfe_target"] is not None}):
        best = {}
        for fam in ("probflow", "peer"):
            ok = [r for r in rows if r["family"] == fam and r["nfe_target"] == n and r["error"] is None
                  and r["nfe"] is not None and r["nfe"] <= n and math.isfinite(r[key])]
            best[fam] = min(ok, key=lambda r: r[key]) if ok else None
        p, q = best["probflow"], best["peer"]
        out.append({"nfe": n, "key": key, "probflow": p, "peer": q,
                    "ratio": (p[key] / q[key]) if p and q and q[key] > 0 else None})
    return out


# ------------------------------------------------------------------------------------------------ overhead


def _interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds, the functions taking turns in every round
    (so that load from other processes on a shared machine hits all of them alike); one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def solver_overhead(shape: tuple[int, ...] = (64, 3, 32, 32), steps: int = 50, repeats: int = 7,
                    methods: Sequence[str] | None = None, peers: Sequence[str] = ("ddim", "dpmpp_2m", "unipc"),
                    threads: int | None = 1) -> dict:
    """Time per step beyond the model, with a near-free model ε = 0.1·x on a float32 batch of `shape`.

    Baseline: a bare `torchdiffeq.odeint(f, x̄, σ, method="euler")` with f(σ, x̄) = model(x̄/sqrt(1+σ²), σ)
    (the work of Eq. 12 and nothing else). probflow: `integrate(model, x̄, σ, method)` for every fixed-grid
    method; peers: diffusers schedulers in a pipeline loop (set_timesteps, scale_model_input, step; float32
    tables, as users run them). All on the trailing DDIM grid of `steps` steps (Adams methods: `steps` equal
    steps in σ), `threads` torch threads,
    medians of `repeats` interleaved rounds. ratio = time per step / the bare loop's; overhead = time per
    step − (model calls per step) × (time of one model call).
    """
    import torchdiffeq

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        sch = linear()
        sig = _grids.ddim(sch, steps).float()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).float() * math.sqrt(1 + sch.sigma_max**2)

        def model(xx: Tensor, s: Tensor) -> Tensor:
            return 0.1 * xx

        def bare_f(s: Tensor, xb: Tensor) -> Tensor:
            return model(xb * torch.rsqrt(1 + s * s), s)

        s0 = torch.tensor(1.0)
        def model_only() -> None:  # the model's share of a step, each output dropped as a solver would
            for _ in range(steps):
                model(x, s0)
        fns: dict[str, Callable[[], Any]] = {"model": model_only}
        calls: dict[str, float] = {}
        skipped: dict[str, str] = {}

        def bare() -> Tensor:
            with torch.no_grad():
                return torchdiffeq.odeint(bare_f, x, sig, method="euler")
        fns["torchdiffeq.odeint euler (bare)"] = bare
        calls["torchdiffeq.odeint euler (bare)"] = 1.0
        sig_eq = grid_sigmas(UNIFORM_STEP_GRID, sch, steps).float()  # for methods that need equal steps in σ
        for m in (list(methods) if methods is not None else fixed_methods()):
            sg = sig_eq if METHODS[m].uniform_steps else sig
            f = DDIMField(model)
            try:
                integrate(f, x, sg, m)
            except (ValueError, FloatingPointError) as e:
                skipped[m] = str(e)
                continue
            calls[f"probflow {m}"] = f.nfe / steps
            fns[f"probflow {m}"] = functools.partial(integrate, model, x, sg, m)
        if peers and _peers.available():
            import diffusers

            for p in peers:
                spec = _peers.PEERS[p]
                sched = getattr(diffusers, spec.cls)(**spec.config)
                x0 = x if spec.variable == "xbar" else x / math.sqrt(1 + sch.sigma_max**2)

                def loop(sched=sched, x0=x0) -> Tensor:
                    sched.set_timesteps(steps)
                    xx = x0
                    with torch.no_grad():
                        for t in sched.timesteps:
                            xx = sched.step(model(sched.scale_model_input(xx, t), t), t, xx, return_dict=False)[0]
                    return xx
                sched.set_timesteps(steps)
                label = f"diffusers {spec.cls}" + (f" (order {spec.config['solver_order']})"
                                                   if "solver_order" in spec.config else "")
                calls[label] = len(sched.timesteps) / steps
                fns[label] = loop
        med = _interleaved_medians(fns, repeats)
    finally:
        torch.set_num_threads(old_threads)
    t_model = med.pop("model") / steps
    t_bare = med["torchdiffeq.odeint euler (bare)"] / steps
    rows = []
    for k, t in med.items():
        t /= steps
        kind = "baseline" if k.startswith("torchdiffeq") else ("peer" if k.startswith("diffusers") else "probflow")
        rows.append({"solver": k, "kind": kind, "nfe_per_step": calls[k], "step_s": t,
                     "overhead_s": t - calls[k] * t_model, "ratio": t / t_bare})
    euler = next((r for r in rows if r["solver"] == "probflow euler"), None)
    return {"shape": list(shape), "dtype": "float32", "steps": steps, "repeats": repeats,
            "threads": threads or torch.get_num_threads(),
            "model_s": t_model, "rows": rows, "skipped": skipped, "euler_ratio": euler["ratio"] if euler else None,
            "euler_ok": bool(euler and euler["ratio"] <= 1.1)}


# ------------------------------------------------------------------------------------------------ output


def _fmt(v: float | None, spec: str = ".2e") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _label(r: dict | None) -> str:
    if r is None:
        return "—"
    return f"{r['method']}/{r['grid']}"


TARGET_NFE = (10, 20, 50)
TARGET_RATIO = 0.5


def _overhead_ratios(ov: dict | None) -> list[tuple[str, str, float]]:
    """(probflow solver, diffusers solver, probflow time per step / diffusers') at the same order."""
    if not ov:
        return []
    t = {r["solver"]: r["step_s"] for r in ov["rows"]}
    pairs = [("probflow dpmpp_2m", "diffusers DPMSolverMultistepScheduler (order 2)"),
             ("probflow dpmpp_3m", "diffusers DPMSolverMultistepScheduler (order 3)"),
             ("probflow unipc", "diffusers UniPCMultistepScheduler (order 2)")]
    return [(a, b, t[a] / t[b]) for a, b in pairs if a in t and b in t and t[b] > 0]


def issue5_summary(results: dict) -> str:
    """The issue 5 target, from this run: on the sharp D = 64 mixture, probflow's best RMSE and median at NFE
    10, 20, 50 ≤ 0.5 × the best diffusers peer's (each on its best grid, NFE counted, ≤ target); on digits, the
    Fréchet distance at NFE 10 no worse than the best peer's; and the solver overhead vs diffusers."""
    out = ["## Issue 5 target\n"]
    w64 = results["workloads"].get("mixture D=64")
    if w64:
        out.append(f"Sharp D = 64 mixture, this run: probflow's best fixed-grid solver+grid vs the best diffusers "
                   f"peer+grid at each NFE (counted NFE ≤ target for both); target ratio ≤ {TARGET_RATIO}.\n")
        out.append("| NFE | metric | probflow best | value | diffusers best | value | ratio | target met |")
        out.append("|---|---|---|---|---|---|---|---|")
        for key in ("rmse", "median"):
            for b in best_per_nfe([r for r in w64["rows"] if r["nfe_target"] in TARGET_NFE], key):
                p, q, ratio = b["probflow"], b["peer"], b["ratio"]
                ok = "yes" if ratio is not None and ratio <= TARGET_RATIO else "no"
                out.append(f"| {b['nfe']} | {'RMSE' if key == 'rmse' else 'median'} | {_label(p)} "
                           f"({p['nfe'] if p else '—'}) | {_fmt(p and p[key])} | {_label(q)} "
                           f"({q['nfe'] if q else '—'}) | {_fmt(q and q[key])} | "
                           f"{_fmt(ratio, '.3f')} | {ok} |")
        out.append("")
    wd = results["workloads"].get("digits")
    if wd:
        fam = {}
        for f in ("probflow", "peer"):
            ok = [r for r in wd["rows"] if r["family"] == f and r["nfe_target"] == 10 and r["error"] is None
                  and r["nfe"] is not None and r["nfe"] <= 10 and math.isfinite(r.get("frechet", math.nan))]
            fam[f] = min(ok, key=lambda r: r["frechet"]) if ok else None
        p, q = fam["probflow"], fam["peer"]
        if p and q:
            out.append(f"Digits, NFE 10, Fréchet distance to the test digits (lower is better; reference "
                       f"{wd['frechet_reference']:.4f}): probflow best {_label(p)} {p['frechet']:.4f} (RMSE "
                       f"{_fmt(p['rmse'])}), diffusers best {_label(q)} {q['frechet']:.4f} (RMSE {_fmt(q['rmse'])}): "
                       f"{'no worse: target met' if p['frechet'] <= q['frechet'] else 'worse: target NOT met'}.\n")
    for wname, wres in results["workloads"].items():
        c = wres.get("extra", {}).get("calibration")
        if c and c["per_steps"]:
            per = ", ".join(f"{k} steps {v['nfe']} NFE / {v['wall_s']:.1f} s" for k, v in c["per_steps"].items())
            out.append(f"Calibration ({wname}): the `calibrated` grid (`grids.calibrated_builder(model, shape, "
                       f"\"{c['method']}\"{''.join(f', {k}={v!r}' for k, v in c['options'].items())})`, its own "
                       f"calibration noise, seed 1234, independent of the benchmark's) cost {c['cost_nfe']} NFE (batch "
                       f"model calls) and {c['wall_s']:.1f} s in all ({per}; the first includes the calibration "
                       f"batch's reference solve). It is a one-off cost per model and step count, NOT counted in "
                       f"the per-sample NFE of the rows. Used by {', '.join(c['methods'])}"
                       + (f" at NFE {', '.join(map(str, c['nfe']))}" if c["nfe"] else "") + ".\n")
    ratios = _overhead_ratios(results.get("overhead"))
    if ratios:
        out.append("Solver overhead at the same order (time per step with a near-free model, from the overhead "
                   "suite below): " + "; ".join(f"{a} / {b} = {r:.2f}" for a, b, r in ratios) + ".\n")
    return "\n".join(out) + "\n"


def markdown_tables(results: dict) -> str:
    """All tables of a results dict (as `run_bench` writes to JSON) as markdown."""
    out = [issue5_summary(results)]
    for wname, wres in results["workloads"].items():
        ref = wres["reference"]
        out.append(f"### {wname}\n")
        out.append(f"{wres['description']}\n")
        out.append(f"Reference: {ref['method']} rtol = atol = {ref['rtol']:g} ({ref['nfe']} NFE, "
                   f"{ref['wall_s']:.1f} s); convergence check against rtol = atol = {ref['check_rtol']:g}: "
                   f"max |Δx_0| = {ref['check_max_abs_diff']:.2e}, RMS {ref['check_rmse']:.2e}.\n")
        if "float32_field_diff" in ref:
            out.append(f"Reference network in {ref['network_dtype']}; the solvers' float32 network differs from "
                       f"it by max |Δε| = {ref['float32_field_diff']:.1e} (at σ = σ_max, 1, 0.01 near the flow).\n")
        if "frechet_reference" in wres:
            out.append(f"Fréchet distance to the test digits: reference {wres['frechet_reference']:.4f}, "
                       f"floor (train vs test) {wres['frechet_floor']:.4f}.\n")
        rows = wres["rows"]
        for key in ("rmse", "median"):
            best = best_per_nfe(rows, key)
            if not best:
                continue
            what = "RMSE" if key == "rmse" else "median per-sample RMS error"
            out.append(f"Best per NFE by {what} (runs with measured NFE ≤ target):\n")
            out.append("| NFE | probflow best | NFE | RMSE | median | diffusers best | NFE | RMSE | median | ratio |")
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for b in best:
                p, q = b["probflow"], b["peer"]
                out.append(f"| {b['nfe']} | {_label(p)} | {p['nfe'] if p else '—'} | {_fmt(p and p['rmse'])} | "
                           f"{_fmt(p and p['median'])} | {_label(q)} | {q['nfe'] if q else '—'} | "
                           f"{_fmt(q and q['rmse'])} | {_fmt(q and q['median'])} | {_fmt(b['ratio'], '.2f')} |")
            out.append("")
        fd = any("frechet" in r for r in rows)
        out.append("<details><summary>All runs</summary>\n")
        out.append("| family | method | grid | NFE target | steps / tol | NFE | RMSE | median | max | wall s |"
                   + (" Fréchet |" if fd else "") + " note |")
        out.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if fd else "") + "---|")
        for r in rows:
            st = r["steps"] if r["tol"] is None else f"{r['tol']:g}"
            note = (r["error"] or "; ".join(r["notes"]))[:80]
            out.append(f"| {r['family']} | {r['method']} | {r['grid']} | {r['nfe_target'] or ''} | {st} | "
                       f"{r['nfe'] if r['nfe'] is not None else '—'} | {_fmt(r['rmse'])} | {_fmt(r['median'])} | "
                       f"{_fmt(r['max'])} | {_fmt(r['wall_s'], '.3f')} |"
                       + (f" {_fmt(r.get('frechet'), '.4f')} |" if fd else "") + f" {note} |")
        out.append("\n</details>\n")
    ov = results.get("overhead")
    if ov:
        out.append(f"### Solver overhead\n\nNear-free model ε = 0.1·x on a {'×'.join(map(str, ov['shape']))} "
                   f"{ov['dtype']} batch, {ov['steps']} steps, {ov['threads']} torch thread(s), median of "
                   f"{ov['repeats']} interleaved runs; model call "
                   f"{ov['model_s'] * 1e3:.3f} ms. Ratio = time per step / the bare torchdiffeq Euler loop's, same "
                   f"run. probflow euler ratio {ov['euler_ratio']:.3f} (target ≤ 1.1: "
                   f"{'met' if ov['euler_ok'] else 'NOT met'}).\n")
        out.append("| solver | NFE/step | ms/step | overhead ms/step | ratio |")
        out.append("|---|---|---|---|---|")
        for r in ov["rows"]:
            out.append(f"| {r['solver']} | {r['nfe_per_step']:.2f} | {r['step_s'] * 1e3:.3f} | "
                       f"{r['overhead_s'] * 1e3:.3f} | {r['ratio']:.2f} |")
        out.append("")
    return "\n".join(out)


_PEER_PANEL = {"trailing": "uniform", "karras": "karras", "karras_sigma": "karras"}


def plot_workload(wname: str, rows: Sequence[dict], out: Path) -> list[Path]:
    """Error vs NFE and error vs wall time, log-log: one panel per grid (peers dashed in the panel of the grid
    they share: trailing with uniform, karras with karras), one line per method+grid, adaptive methods in a
    panel of their own; a method has the same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["error"] is None and math.isfinite(r["rmse"]) and r["rmse"] > 0:
            series.setdefault((r["family"], r["method"], r["grid"]), []).append(r)
    panels: list[str] = []
    for fam, _, g in series:
        p = "adaptive" if fam == "adaptive" else (_PEER_PANEL.get(g, g) if fam == "peer" else g)
        if p not in panels:
            panels.append(p)
    panels.sort(key=lambda p: (p == "adaptive", p not in DEFAULT_GRIDS,
                               DEFAULT_GRIDS.index(p) if p in DEFAULT_GRIDS else 0, p))
    # one colour per method name: a diffusers peer of the same name as a probflow method shares its colour
    palette = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("Dark2").colors)
    color = {n: palette[i % len(palette)] for i, n in enumerate(sorted({k[1] for k in series}))}
    paths = []
    slug = wname.replace(" ", "_").replace("=", "")
    ncol = min(3, len(panels)) or 1
    nrow = max(1, math.ceil(len(panels) / ncol))
    for xkey, fname, xl in (("nfe", f"error_vs_nfe_{slug}.png", "NFE (model calls)"),
                            ("wall_s", f"error_vs_wall_{slug}.png", "wall time (s)")):
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol + 3.2, 4.2 * nrow), sharey=True, squeeze=False)
        handles: dict[str, Any] = {}
        for (fam, m, g), rs in sorted(series.items()):
            p = "adaptive" if fam == "adaptive" else (_PEER_PANEL.get(g, g) if fam == "peer" else g)
            ax = axes.flat[panels.index(p)]
            rs = sorted(rs, key=lambda r: r[xkey])
            label = f"diffusers {m}" + (" (σ)" if g == "karras_sigma" else "") if fam == "peer" else m
            (line,) = ax.plot([r[xkey] for r in rs], [r["rmse"] for r in rs], "--" if fam == "peer" else "-",
                              marker="s" if g == "karras_sigma" else "o", ms=3, lw=1.1,
                              color=color[m], label=label)
            handles.setdefault(label, line)
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.set_visible(False)
                continue
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"grid: {panels[i]}" if panels[i] != "adaptive" else "adaptive (rtol = atol = 1e-2 … 1e-7)",
                         fontsize=9)
            ax.set_xlabel(xl, fontsize=8)
            if i % ncol == 0:
                ax.set_ylabel("RMSE of x_0 vs reference", fontsize=8)
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7, frameon=False)
        fig.suptitle(f"{wname}: error vs {xl.split(' (')[0]} (solid probflow, dashed diffusers; "
                     "(σ): model at the scheduler's σ)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1 - 2.9 / (5.2 * ncol + 3.2), 0.96))
        paths.append(out / fname)
        _atomic(paths[-1], lambda p, fig=fig: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
    return paths


def plot_headline(wname: str, rows: Sequence[dict], path: Path) -> Path:
    """Per method (probflow solid, diffusers dashed) its best grid at each NFE: RMSE vs NFE, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    fams = {}
    for r in rows:
        if r["family"] in ("probflow", "peer") and r["error"] is None and math.isfinite(r["rmse"]) and r["rmse"] > 0:
            d = fams.setdefault((r["family"], r["method"]), {})
            if r["nfe_target"] not in d or r["rmse"] < d[r["nfe_target"]]["rmse"]:
                d[r["nfe_target"]] = r
    # every line distinct: its own colour (tab20 then Dark2, 28 in all), and probflow solid with circles,
    # diffusers dashed with squares; past 28 lines the dash pattern varies as well
    palette = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("Dark2").colors)
    dashes = {"probflow": ["-", "-.", ":"], "peer": ["--", (0, (5, 1, 1, 1)), (0, (1, 1))]}
    for i, ((fam, m), d) in enumerate(sorted(fams.items(), key=lambda kv: (kv[0][0] == "peer", kv[0][1]))):
        rs = [d[k] for k in sorted(d)]
        ax.plot([r["nfe"] for r in rs], [r["rmse"] for r in rs], linestyle=dashes[fam][(i // len(palette)) % 3],
                marker="s" if fam == "peer" else "o", ms=3, color=palette[i % len(palette)],
                label=f"{'diffusers ' if fam == 'peer' else ''}{m}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (model calls)")
    ax.set_ylabel("RMSE of x_0 (best grid per method)")
    ax.set_title(f"{wname}: error vs NFE, each method on its best grid")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    # Whether an existing output may be replaced is decided once, before the run (run_bench's --force check).
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write, force=True)


def _write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(path, w)


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("scipy", "torchdiffeq", "diffusers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            v[mod] = None
    from probflow import __version__

    v["probflow"] = __version__
    return v


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ command

SUITES = ("mixture2", "mixture64", "digits", "overhead")
# High-order adaptive methods pay dearly on the digits network near σ → 0 (dopri8 at 1e-6 took 3× the NFE of
# dopri5): dopri5 is the reference.
DIGITS_REF = "dopri5"
DIGITS_PEER_GRIDS = ("trailing", "karras", "exponential", "exponential_sigma")


@dataclass(frozen=True)
class _Config:
    """Sizes of a run: samples per workload, NFE targets, tolerances, grids, peers (None: all), the
    references' tolerances and those of their convergence checks, and the overhead timing."""

    n2: int
    n64: int
    n_digits: int
    nfe: tuple[int, ...]
    tolerances: tuple[float, ...]
    grids: tuple[str, ...]
    peers: tuple[str, ...] | None
    ref_tol: float
    check_tol: float
    digits_nfe: tuple[int, ...]
    digits_grids: tuple[str, ...]
    digits_ref_tol: float
    digits_check_tol: float
    digits_min_tol: float
    overhead_steps: int
    overhead_repeats: int
    # suite → `run_workload`'s calibration (absent: the default; None: no calibrated grid in that suite)
    calibration: dict = field(default_factory=dict)


FULL = _Config(n2=256, n64=128, n_digits=16, nfe=NFE, tolerances=TOLERANCES, grids=DEFAULT_GRIDS, peers=None,
               ref_tol=1e-12, check_tol=1e-10, digits_nfe=(5, 10, 20, 50),
               digits_grids=("uniform", "karras", CALIBRATED),
               digits_ref_tol=1e-5, digits_check_tol=1e-4, digits_min_tol=1e-3, overhead_steps=50,
               overhead_repeats=7,
               calibration={"mixture2": None, "mixture64": {"nfe": (5, 10, 20)},
                            "digits": {"nfe": (10,), "options": {"n": 32, "ref_method": "dopri5", "ref_tol": 1e-6,
                                                                  "max_evals": 100}}})
QUICK = _Config(n2=16, n64=4, n_digits=8, nfe=(5, 10, 20), tolerances=(1e-3,), grids=("uniform", "karras"),
                peers=("ddim", "dpmpp_2m"), ref_tol=1e-9, check_tol=1e-7, digits_nfe=(10,),
                digits_grids=("uniform",), digits_ref_tol=1e-7, digits_check_tol=1e-5, digits_min_tol=1e-3,
                overhead_steps=10, overhead_repeats=3)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="benchmarks",
                   help="output folder for results.json, RESULTS.md and the plots (default: benchmarks)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few methods (≤ 60 s)")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--methods", default=None, help="comma-separated registered methods (default: all)")
    p.add_argument("--grids", default=None, help=f"comma-separated grids (default: {','.join(DEFAULT_GRIDS)})")
    p.add_argument("--nfe", default=None, help="comma-separated target NFEs (default: 5,10,20,50,100)")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per workload (default: 256 at D=2, 128 at D=64, 16 digits)")
    p.add_argument("--digits-model", default=None, metavar="FOLDER",
                   help="digits checkpoint folder (digits.safetensors + digits.json; default: the shipped model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1; more rarely helps these "
                   "small solves)")
    p.add_argument("--force", action="store_true", help="overwrite existing results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _csv(s: str | None, conv=str) -> list | None:
    return None if s is None else [conv(v.strip()) for v in s.split(",") if v.strip()]


_WORKLOAD = {"mixture2": "mixture D=2", "mixture64": "mixture D=64", "digits": "digits"}
HEADLINE = "headline.png"


def _plot_names(wname: str) -> list[str]:
    slug = wname.replace(" ", "_").replace("=", "")
    return [f"error_vs_nfe_{slug}.png", f"error_vs_wall_{slug}.png"]


def run_bench(args: argparse.Namespace) -> int:
    """`probflow bench`: run the suites; write results.json, RESULTS.md and the plots into --out, atomically."""
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    suites = _csv(args.suites)
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ValueError(f"--suites: unknown {bad or suites}; expected a non-empty subset of {list(SUITES)}")
    methods = _csv(args.methods)
    if methods is None:
        methods = (["euler", "heun2"] + [n for n in fixed_methods() if METHODS[n].backend == "probflow"][:1]
                   + ["dopri5"]) if args.quick else fixed_methods() + adaptive_methods()
    for m in methods:
        if m not in METHODS or m == REFERENCE:
            raise ValueError(f"--methods: {m!r} is not a registered solver other than the reference; expected "
                             f"among {[n for n in METHODS if n != REFERENCE]}")
    grid_list = _csv(args.grids) or list(cfg.grids)
    for g in grid_list:
        if g == CALIBRATED:
            continue
        try:
            grid_sigmas(g, linear(), 4)
        except ValueError as e:
            raise ValueError(f"--grids: {e}") from None
    nfe = _csv(args.nfe, int) or list(cfg.nfe)
    if any(n < 1 for n in nfe):
        raise ValueError(f"--nfe: expected positive integers, got {nfe}")
    if args.samples is not None and args.samples < 2:
        raise ValueError(f"--samples: expected at least 2, got {args.samples}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
    if args.digits_model is not None and not Path(args.digits_model).is_dir():
        raise ValueError(f"--digits-model: {args.digits_model} is not a folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    names = ["results.json", "RESULTS.md"] + [n for k in suites if k in _WORKLOAD for n in _plot_names(_WORKLOAD[k])]
    names += [HEADLINE] if "mixture64" in suites else []
    if not args.force:
        exist = [str(out / n) for n in names if (out / n).exists()]
        if exist:
            raise FileExistsError(f"--out: {', '.join(exist)} already exist(s); pass --force to overwrite")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        results = _run_suites(args, cfg, suites, methods, grid_list, nfe)
    finally:
        torch.set_num_threads(old_threads)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for wname, wres in results["workloads"].items():
        plots += plot_workload(wname, wres["rows"], out)
    if "mixture D=64" in results["workloads"]:
        plots.append(plot_headline("mixture D=64", results["workloads"]["mixture D=64"]["rows"], out / HEADLINE))
    results["plots"] = [p.name for p in plots]
    _write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default, allow_nan=True))
    _write_text(out / "RESULTS.md", _header(results) + markdown_tables(results))
    print(f"probflow bench: results.json, RESULTS.md and {len(plots)} plots written to {out} "
          f"({results['wall_s']:.0f} s)")
    ov = results.get("overhead")
    if ov and ov["euler_ratio"] is not None:
        print(f"probflow bench: euler / bare torchdiffeq per-step time = {ov['euler_ratio']:.3f} "
              f"({'≤' if ov['euler_ok'] else '>'} 1.1)")
    return 0


def _run_suites(args: argparse.Namespace, cfg: _Config, suites: list[str], methods: list[str],
                grid_list: list[str], nfe: list[int]) -> dict:
    progress = not args.no_progress
    t_start = time.perf_counter()
    peers = (list(cfg.peers) if cfg.peers else _peers.peer_names()) if _peers.available() else []
    results: dict = {"command": _command(args), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                     "versions": _versions(), "machine": _machine(), "workloads": {}, "skipped": [],
                     "suite_wall_s": {},
                     "config": {"suites": suites, "methods": methods, "grids": grid_list, "nfe": nfe,
                                "tolerances": list(cfg.tolerances), "peers": peers,
                                "uniform_step_grid": UNIFORM_STEP_GRID}}
    if not _peers.available():
        results["skipped"].append("diffusers peers: diffusers could not be imported")
        print("probflow bench: diffusers is not importable; peers skipped", file=sys.stderr)
    for dim, n, key in ((2, cfg.n2, "mixture2"), (64, cfg.n64, "mixture64")):
        if key not in suites:
            continue
        t0 = time.perf_counter()
        n = args.samples or n
        _say(progress, f"{key}: reference DOP853 at {cfg.ref_tol:g} (checked at {cfg.check_tol:g}) for {n} "
                       "samples …")
        w = mixture_workload(dim, n, 0, ref_tol=cfg.ref_tol, check_tol=cfg.check_tol)
        cal = cfg.calibration.get(key, {})
        gl = [g for g in grid_list if g != CALIBRATED or cal is not None]
        rows = run_workload(w, methods, gl, nfe, cfg.tolerances, peers, None, progress, cal)
        results["workloads"][w.name] = {
            "description": f"Sharp Gaussian mixture, D = {dim}, K = 8, full covariances, per-direction std "
                           f"log-uniform in [0.05, 0.5] (`GaussianMixture.random({dim}, 8, seed=0)`); {n} samples "
                           f"x_T = probflow.noise({n}, ({dim},), seed=1); σ_max = {w.schedule.sigma_max:.4f} "
                           "(t = T−1 of the linear DDPM table) → σ = 0.",
            "reference": w.ref, "extra": w.extra, "rows": rows}
        results["suite_wall_s"][key] = time.perf_counter() - t0
    if "digits" in suites:
        t0 = time.perf_counter()
        _run_digits(results, cfg, methods, peers, args.samples, progress, args.digits_model,
                    grid_list if args.grids else list(cfg.digits_grids), nfe if args.nfe else list(cfg.digits_nfe))
        results["suite_wall_s"]["digits"] = time.perf_counter() - t0
    if "overhead" in suites:
        t0 = time.perf_counter()
        _say(progress, "overhead: near-free model, 64×3×32×32 float32 …")
        ov_methods = [m for m in methods if not METHODS[m].adaptive]
        results["overhead"] = solver_overhead(steps=cfg.overhead_steps, repeats=cfg.overhead_repeats,
                                              methods=ov_methods, threads=None,
                                              peers=("ddim", "dpmpp_2m", "dpmpp_3m", "unipc") if peers else ())
        results["suite_wall_s"]["overhead"] = time.perf_counter() - t0
    results["wall_s"] = time.perf_counter() - t_start
    return results


def _command(args: argparse.Namespace) -> str:
    """The command line equivalent to `args` (every option that differs from its default)."""
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    defaults = vars(p.parse_args([]))
    parts = ["probflow bench"]
    for k, v in vars(args).items():
        if k in defaults and v != defaults[k]:
            parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return " ".join(parts)


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"probflow bench: {msg}", file=sys.stderr, flush=True)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _header(results: dict) -> str:
    v = results["versions"]
    m = results["machine"]
    walls = ", ".join(f"{k} {t:.0f} s" for k, t in results.get("suite_wall_s", {}).items())
    lines = ["# probflow benchmark results", "",
             "Generated by `probflow bench`; do not edit by hand. Regenerate with:", "",
             f"    {results['command']}", "",
             f"Started {results['started_utc']} UTC, wall time {results['wall_s']:.0f} s ({walls}). Versions: "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch threads "
             f"{m['torch_threads']}.", ""]
    if results["skipped"]:
        lines += ["Skipped: " + "; ".join(results["skipped"]), ""]
    lines += ["Every solver starts from the same x_T at σ_max (t = T−1) and ends at σ = 0; errors are of x_0 "
              "against the reference. RMSE is over all samples and coordinates; median is the median over "
              "samples of the per-sample RMS error. probflow rows are float64 and call `probflow.integrate`; "
              "diffusers peers are driven as their pipelines drive them, with the float64 tables swapped in "
              "(see `probflow/peers.py` for the traps handled). NFE is counted (model calls, rejected adaptive "
              "steps included), never assumed. Fixed-grid methods run at steps = round(NFE target / stages), so "
              "a 2- or 4-stage method can use slightly fewer calls than the target; best-per-NFE tables only "
              "count runs with measured NFE ≤ target; a method that makes extra calls beyond stages × steps "
              "(dpmpp_3m: one for its start, N + 1 calls on N steps) runs one step fewer per extra call, so that "
              "its counted NFE meets the target. Grids: uniform/quadratic = DDIM trailing timesteps "
              "uniform/quadratic in t; logsnr = uniform in log σ from σ_max to σ_0; karras = ρ = 7 from σ_max "
              "to σ_0; log_snr_tuned = `grids.log_snr_tuned` (log-SNR uniform to 3σ_0); calibrated = "
              "`grids.calibrated_builder` (a grid optimised per step count on a separate calibration batch; its "
              "cost is reported in the Issue 5 section and not counted in the rows' NFE); all then 0. torchdiffeq's "
              "Adams methods assume equal steps in σ and run on "
              f"`{UNIFORM_STEP_GRID}` (equal steps from σ_max to 0) instead. Peer grids: trailing = DDIM "
              "trailing timesteps; karras = diffusers' `use_karras_sigmas` with the network at the pipeline's "
              "(rounded) timestep; karras_sigma = the same grid with the model at the scheduler's own σ; "
              "exponential / exponential_sigma = diffusers' `use_exponential_sigmas` (σ log-uniform from σ_max to "
              "σ_0 = log-SNR uniform, σ matched to the float64 `grids.log_uniform`), the same two ways "
              "(DPM-Solver++, UniPC, Euler, Heun, LMS support both σ options; DDIM neither).", ""]
    for p in results.get("plots", []):
        if p == HEADLINE or "D64" in p:
            lines += [f"![{p}]({p})", ""]
    return "\n".join(lines) + "\n"


def _run_digits(results: dict, cfg: _Config, methods: list[str], peers: list[str], samples: int | None,
                progress: bool, folder: str | None, grid_list: list[str], nfe: list[int]) -> None:
    try:
        _load_digits(folder)
    except Exception as e:  # noqa: BLE001 - absent weights (or a broken checkpoint) skip the suite, loudly
        msg = f"digits: model not available ({type(e).__name__}: {e})"
        results["skipped"].append(msg)
        print(f"probflow bench: skipping {msg}", file=sys.stderr)
        return
    from probflow import digits

    n = samples or cfg.n_digits
    _say(progress, f"digits: reference {DIGITS_REF} at {cfg.digits_ref_tol:g} (checked at {cfg.digits_check_tol:g}) "
                   f"for {n} samples …")
    w = digits_workload(n, ref_method=DIGITS_REF, ref_tol=cfg.digits_ref_tol, check_tol=cfg.digits_check_tol,
                        folder=folder, ref_dtype=None)
    w.extra["keep_x"] = True
    tols = tuple(t for t in cfg.tolerances if t >= cfg.digits_min_tol)
    cal = cfg.calibration.get("digits", {})
    grid_list = [g for g in grid_list if g != CALIBRATED or cal is not None]
    rows = run_workload(w, methods, grid_list, nfe, tols, peers, DIGITS_PEER_GRIDS, progress, cal)
    w.extra.pop("keep_x")
    split = digits.load_split()
    mu, cov = digits.gaussian_fit(split["x_test"])
    floor = digits.frechet_distance(*digits.gaussian_fit(split["x_train"][:n]), mu, cov)
    results["workloads"][w.name] = {
        "description": f"The digits ε-UNet ({w.extra.get('fingerprint') or 'no fingerprint'}), run with a "
                       f"{w.extra['network_dtype']} network and float64 state; {n} samples x_T = "
                       f"probflow.noise({n}, {tuple(w.noise.shape[1:])}, seed=0); σ_max = "
                       f"{w.schedule.sigma_max:.4f} → σ = 0. Grids {', '.join(grid_list)} at NFE "
                       f"{', '.join(map(str, nfe))} (the network's cost keeps this suite small); adaptive "
                       f"tolerances ≥ {cfg.digits_min_tol:g}. Fréchet = Fréchet distance between the Gaussian "
                       f"fits (64 pixels) of the {n} samples and of the 360 test digits; with {n} samples it is "
                       "biased upwards, so compare rows with each other and with the reference's and the floor "
                       f"(the first {n} training digits against the test digits).",
        "reference": w.ref, "extra": w.extra, "rows": rows,
        "frechet_reference": digits.frechet_distance(*digits.gaussian_fit(w.reference.float()), mu, cov),
        "frechet_floor": floor}
    for r in rows:  # samples kept by `_finish` (keep_x) for the Fréchet distance, then dropped
        x = r.pop("_x", None)
        if x is not None:
            r["frechet"] = digits.frechet_distance(*digits.gaussian_fit(x), mu, cov)
