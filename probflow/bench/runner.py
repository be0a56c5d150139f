"""Running the benchmark: every solve is one row of errors of x_0 against the workload's reference.

Fixed-grid methods run at steps = round((NFE − extra_calls) / stages) (`Method.stages`, `Method.extra_calls`),
adaptive ones at rtol = atol = tol from σ_max to σ = 0, diffusers peers as their pipelines drive them
(`probflow.bench.peers`); NFE is counted by the field (model calls, rejected adaptive steps included), never
assumed. Every solve goes through `probflow.integrate.integrate` (peers through diffusers' own loop).

Metrics per row: RMSE of x_0 over all samples and coordinates; the median and max over samples of the per-sample
RMS error (a few samples that land in another mixture component dominate the RMSE); NFE; wall time.
"""

from __future__ import annotations

import functools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from probflow import distributed as dist
from probflow.bench import peers as _peers
from probflow.bench.grids import CALIBRATED, DEFAULT_GRIDS, UNIFORM_STEP_GRID, GridBuilder, grid_name, grid_sigmas
from probflow.bench.reference import REFERENCE, reference
from probflow.bench.workloads import Workload
from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.method import MethodCaution
from probflow.schedules import Schedule, linear
from probflow.solvers import METHODS, Method

__all__ = ["NFE", "TOLERANCES", "CALIBRATION", "fixed_methods", "adaptive_methods", "steps_for", "run_fixed",
           "run_adaptive", "run_peer", "run_workload", "run_mixture_suite", "error_vs_nfe", "convergence_order",
           "best_per_nfe"]

NFE = (5, 10, 20, 50, 100)
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
# How the calibrated grid is made and used: optimised for `method` (`calibrated_builder`, on its own calibration
# noise, seed 1234, independent of every workload's noise), used by `methods` at the NFE targets `nfe` (None: every
# NFE); `options` go to `calibrated_builder`. Its cost is reported, not counted in per-sample NFE. The default
# methods take one call per step (steps = NFE), so one calibration per NFE serves them all.
CALIBRATION = {"method": "unipc_3", "methods": ("dpmpp_2m", "unipc", "unipc_3"), "nfe": None, "options": {}}


def fixed_methods() -> list[str]:
    """Every registered fixed-grid method (probflow's own and torchdiffeq's)."""
    return [n for n, m in METHODS.items() if not m.adaptive]


def adaptive_methods() -> list[str]:
    """Every registered adaptive method except the scipy reference."""
    return [n for n, m in METHODS.items() if m.adaptive and n != REFERENCE]


def steps_for(method: Method, nfe: int) -> int:
    """Steps whose counted NFE (stages × steps + extra_calls) comes closest to `nfe`: `Method.steps_for_nfe`, the
    one rule (kept here under its old name for notebooks)."""
    return method.steps_for_nfe(nfe)


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
    """One fixed-grid solve at NFE ≈ `nfe` (`steps_for`); the row of its errors."""
    steps = steps_for(METHODS[method], nfe)
    row = _row(w, "probflow", method, grid_name(grid), nfe_target=nfe, steps=steps)
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
        with warnings.catch_warnings():  # the row reports the error at this tolerance: no caution about it
            warnings.simplefilter("ignore", MethodCaution)
            x, row["nfe"], row["wall_s"] = _solve(w, method, end, rtol=tol, atol=tol)
        _finish(row, w, x)
    except (FloatingPointError, RuntimeError, ValueError, AssertionError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def run_peer(w: Workload, name: str, grid: str, nfe: int) -> dict:
    """One diffusers peer at NFE ≈ `nfe` on `grid` (`peers.peer_grids(name)`)."""
    steps = _peers.steps_for_nfe(name, nfe)
    row = _row(w, "peer", name, grid, nfe_target=nfe, steps=steps)
    model = w.model if w.model_dtype is None else _cast_model(w.model, w.model_dtype)
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


def plan(w: Workload, methods: Sequence[str], grids: Sequence[str | GridBuilder], nfe: Sequence[int],
         tolerances: Sequence[float], peers: Sequence[str], peer_grids: Sequence[str] | None, cal: dict,
         cal_builder: GridBuilder | None) -> list[Callable[[], dict]]:
    """The solves of `run_workload`, as callables (each returns its row), in the order they run."""
    tasks: list[Callable[[], dict]] = []
    for m in methods:
        if METHODS[m].adaptive:
            tasks += [functools.partial(run_adaptive, w, m, t) for t in tolerances]
            continue
        for g in ([UNIFORM_STEP_GRID] if METHODS[m].uniform_steps else grids):
            if g != CALIBRATED:
                tasks += [functools.partial(run_fixed, w, m, g, n) for n in nfe]
            elif m in cal["methods"] and cal_builder is not None:
                tasks += [functools.partial(run_fixed, w, m, cal_builder, n) for n in nfe
                          if cal["nfe"] is None or n in cal["nfe"]]
    for p in peers:
        for g in _peers.peer_grids(p):
            if peer_grids is None or g in peer_grids:
                tasks += [functools.partial(run_peer, w, p, g, n) for n in nfe]
    return tasks


def run_workload(w: Workload, methods: Sequence[str] | None = None, grids: Sequence[str | GridBuilder] | None = None,
                 nfe: Sequence[int] = NFE, tolerances: Sequence[float] = TOLERANCES,
                 peers: Sequence[str] | None = None, peer_grids: Sequence[str] | None = None,
                 progress: bool | Callable[[Iterable], Iterable] = False,
                 calibration: dict | None = None,
                 extra: Callable[[Workload, list], list[Callable[[], dict]]] | None = None) -> list[dict]:
    """Rows for every (method × grid × NFE), (adaptive method × tolerance), (peer × peer grid × NFE).

    methods: registered names (default: all but the reference). grids: names or builders (default
    `DEFAULT_GRIDS`); a method that needs equal steps in σ (`Method.uniform_steps`) runs on `UNIFORM_STEP_GRID`
    instead. peers: diffusers peer names (default all, or none where diffusers is absent); peer_grids: restrict
    the peers' grids. The grid "calibrated" is `calibrated_builder(w.model, shape, calibration["method"],
    **calibration["options"])` (default `CALIBRATION`), run by calibration["methods"] at the NFE targets
    calibration["nfe"] (None: all); its cost goes into `w.extra["calibration"]`, not into any row's NFE.
    extra: `extra(w, grids)` returns further solves to run after these (e.g. `fair.fair_plan`'s), with `grids`
    holding the calibrated builder in place of its name.
    """
    methods = list(methods) if methods is not None else fixed_methods() + adaptive_methods()
    for m in methods:
        if m not in METHODS or m == REFERENCE:
            raise ValueError(f"methods: {m!r} is not a registered solver (or is the reference)")
    grids = list(grids) if grids is not None else list(DEFAULT_GRIDS)
    if peers is None:
        peers = _peers.peer_names() if _peers.available() else []
    cal = dict(CALIBRATION, **(calibration or {}))
    cal_builder = calibrated_grid(w, cal) if CALIBRATED in grids else None
    tasks = plan(w, methods, grids, nfe, tolerances, peers, peer_grids, cal, cal_builder)
    if extra is not None:
        tasks += extra(w, [cal_builder if g == CALIBRATED else g for g in grids])
    _warm_up(w, [m for m in methods if not METHODS[m].adaptive], peers)
    it: Iterable = tasks
    if progress is True:
        from tqdm import tqdm

        it = tqdm(tasks, desc=w.name, unit="solve", leave=False, file=sys.stderr)
    elif callable(progress):
        it = progress(tasks)
    world = dist.world()
    if world.size > 1:  # under torchrun: cell i on rank i mod W, no collective inside a solve
        return dist.map_cells(lambda i: _noting_warnings(tasks[i]), len(tasks), w=world)
    return [_noting_warnings(t) for t in it]


def calibrated_grid(w: Workload, cal: dict) -> GridBuilder:
    """The workload's calibrated grid builder, timed and counted per step count into w.extra["calibration"]."""
    from probflow.calibrate import calibrated_builder

    f = DDIMField(w.model, model_dtype=w.model_dtype)  # as_field keeps a field as is, so its NFE counts
    inner = calibrated_builder(f, tuple(w.noise.shape[1:]), cal["method"], **cal["options"])
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
    """One 3-step solve of one sample per method and peer before anything is timed, so that no row's wall time
    includes a first call's lazy imports and caches (diffusers' first scheduler costs ~1 s)."""
    one = Workload(w.name, w.model, w.schedule, w.noise[:1], w.reference[:1], w.ref, w.model_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in methods:
            grid = UNIFORM_STEP_GRID if METHODS[m].uniform_steps else "uniform"
            try:
                _solve(one, m, grid_sigmas(grid, one.schedule, 3))
            except (FloatingPointError, RuntimeError, ValueError):
                pass
        for p in peers:
            run_peer(one, p, _peers.peer_grids(p)[-1], 2)


def _noting_warnings(task: Callable[[], dict]) -> dict:
    """Run one solve; warnings it raises (e.g. torchdiffeq's "Functional iteration did not converge" of implicit
    Adams) go into the row's notes instead of the terminal."""
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
    """The sharp-mixture suite at dimension `dim` (K = 8, std down to 0.05): rows of every method × grid × NFE,
    adaptive × tolerance and diffusers peer × grid × NFE, errors against DOP853 at 1e-12 (the workload and its
    reference are cached). Summarise with `best_per_nfe(rows)`."""
    from probflow.bench.workloads import mixture_workload

    w = mixture_workload(dim, n_samples, seed)
    return run_workload(w, methods, grids, nfe, tolerances, peers, None, progress)


def error_vs_nfe(model, methods: Sequence[str], grids: Sequence[str | GridBuilder] = ("uniform",),
                 nfe_list: Sequence[int] = NFE, n_samples: int = 64, seed: int = 0, *,
                 schedule: Schedule | None = None, shape: tuple[int, ...] | None = None,
                 peers: Sequence[str] = (), ref_tol: float = 1e-12, check_tol: float = 1e-10) -> list[dict]:
    """Error vs NFE of `methods` on `grids` for any ε-model (a DOP853 reference at `ref_tol`): x_T =
    `probflow.noise(n_samples, shape, seed)`; shape defaults to (model.dim,), schedule to the linear DDPM
    table. Rows as `run_workload`; the reference and its convergence check are in every row under "reference"."""
    from probflow.flows import noise

    sch = schedule or linear()
    if shape is None:
        if not hasattr(model, "dim"):
            raise ValueError("shape: give the sample shape for a model without a `dim`")
        shape = (model.dim,)
    z = noise(n_samples, tuple(shape), seed)
    dim = int(np.prod(shape))
    x0, info = reference(model, z * math.sqrt(1 + sch.sigma_max**2), sch, REFERENCE, ref_tol, check_tol, None,
                         {"group": max(1, min(n_samples, 1024 // dim))})
    w = Workload(getattr(model, "name", type(model).__name__), model, sch, z, x0, info)
    rows = run_workload(w, methods, grids, nfe_list, TOLERANCES, peers)
    for r in rows:
        r["reference"] = info
    return rows


def convergence_order(model, method: str, grid: str | GridBuilder = "uniform", steps: Sequence[int] = (8, 16, 32, 64),
                      n_samples: int = 32, seed: int = 0, *, schedule: Schedule | None = None,
                      shape: tuple[int, ...] | None = None) -> dict:
    """Measured order of `method` on `grid`: the least-squares slope p of log RMSE = −p·log steps + c against a
    DOP853 reference at 1e-12, and the local orders log2(e_k/e_{k+1}) for doubled steps."""
    if METHODS.get(method) is None or METHODS[method].adaptive:
        raise ValueError(f"method: expected a registered fixed-grid solver, got {method!r}")
    steps = [int(s) for s in steps]
    if len(steps) < 2:
        raise ValueError("steps: need at least two step counts")
    m = METHODS[method]
    rows = error_vs_nfe(model, [method], [grid], [s * m.stages + m.extra_calls for s in steps], n_samples, seed,
                        schedule=schedule, shape=shape)
    errs = np.array([r["rmse"] for r in rows])
    ns = np.array([r["steps"] for r in rows], dtype=float)
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    local = [float(np.log(errs[i] / errs[i + 1]) / np.log(ns[i + 1] / ns[i])) for i in range(len(ns) - 1)]
    return {"method": method, "grid": grid_name(grid), "steps": ns.astype(int).tolist(),
            "nfe": [r["nfe"] for r in rows], "rmse": errs.tolist(), "order": float(slope), "local_orders": local,
            "declared_order": m.order, "reference": rows[0]["reference"]}


def _best(rows: Sequence[dict], n: int, key: str, keep: Callable[[dict], bool]) -> dict | None:
    ok = [r for r in rows if keep(r) and r["nfe_target"] == n and r["error"] is None and r["nfe"] is not None
          and r["nfe"] <= n and math.isfinite(r[key])]
    return min(ok, key=lambda r: r[key]) if ok else None


def best_per_nfe(rows: Sequence[dict], key: str = "rmse") -> list[dict]:
    """Per target NFE, by `key` ("rmse" or "median"), counting only runs whose measured NFE ≤ the target (no one
    gets extra calls): probflow's best fixed-grid method+grid ("probflow", any grid), its best on a grid that does
    not depend on the model ("uncalibrated": every grid but `CALIBRATED`), the best diffusers peer+grid ("peer"),
    and the ratios of the first two to the peer ("ratio", "ratio_uncalibrated")."""
    out = []
    for n in sorted({r["nfe_target"] for r in rows if r["nfe_target"] is not None}):
        p = _best(rows, n, key, lambda r: r["family"] == "probflow")
        u = _best(rows, n, key, lambda r: r["family"] == "probflow" and r["grid"] != CALIBRATED)
        q = _best(rows, n, key, lambda r: r["family"] == "peer")
        out.append({"nfe": n, "key": key, "probflow": p, "uncalibrated": u, "peer": q,
                    "ratio": (p[key] / q[key]) if p and q and q[key] > 0 else None,
                    "ratio_uncalibrated": (u[key] / q[key]) if u and q and q[key] > 0 else None})
    return out
