"""Solver overhead: time per step beyond the model, with a near-free model, against a bare torchdiffeq loop.

Timings belong here (and in RESULTS.md), never in a unit test: they move with the machine's load.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from probflow import grids as _grids
from probflow.bench import peers as _peers
from probflow.bench.grids import UNIFORM_STEP_GRID, grid_sigmas
from probflow.bench.runner import fixed_methods
from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.schedules import linear
from probflow.solvers import METHODS

__all__ = ["solver_overhead", "overhead_ratios"]

BARE = "torchdiffeq.odeint euler (bare)"


def _interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds, the functions taking turns in every round (so that
    load from other processes on a shared machine hits all of them alike); one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _model(xx: Tensor, s: Tensor) -> Tensor:
    return 0.1 * xx


def _peer_loops(peers: Sequence[str], x: Tensor, sigma_max: float, steps: int, fns: dict, calls: dict) -> None:
    """diffusers schedulers in a pipeline loop (set_timesteps, scale_model_input, step; float32 tables)."""
    import diffusers

    for p in peers:
        spec = _peers.PEERS[p]
        sched = getattr(diffusers, spec.cls)(**spec.config)
        x0 = x if spec.variable == "xbar" else x / math.sqrt(1 + sigma_max**2)

        def loop(sched=sched, x0=x0) -> Tensor:
            sched.set_timesteps(steps)
            xx = x0
            with torch.no_grad():
                for t in sched.timesteps:
                    xx = sched.step(_model(sched.scale_model_input(xx, t), t), t, xx, return_dict=False)[0]
            return xx
        sched.set_timesteps(steps)
        order = spec.config.get("solver_order")
        label = f"diffusers {spec.cls}" + (f" (order {order})" if order else "")
        calls[label] = len(sched.timesteps) / steps
        fns[label] = loop


def solver_overhead(shape: tuple[int, ...] = (64, 3, 32, 32), steps: int = 50, repeats: int = 7,
                    methods: Sequence[str] | None = None, peers: Sequence[str] = ("ddim", "dpmpp_2m", "unipc"),
                    threads: int | None = 1) -> dict:
    """Time per step beyond the model, with a near-free model ε = 0.1·x on a float32 batch of `shape`.

    Baseline: a bare `torchdiffeq.odeint(f, x̄, σ, method="euler")` with f(σ, x̄) = model(x̄/sqrt(1+σ²), σ) (the work
    of Eq. 12 and nothing else). probflow: `integrate(model, x̄, σ, method)` for every fixed-grid method; peers:
    diffusers schedulers in a pipeline loop. All on the trailing DDIM grid of `steps` steps (Adams methods: equal
    steps in σ), `threads` torch threads, medians of `repeats` interleaved rounds. ratio = time per step / the
    bare loop's; overhead = time per step − (model calls per step) × (time of one model call)."""
    import torchdiffeq

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        sch = linear()
        sig = _grids.ddim(sch, steps).float()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).float() * math.sqrt(1 + sch.sigma_max**2)
        s0 = torch.tensor(1.0)

        def model_only() -> None:  # the model's share of a step, each output dropped as a solver would
            for _ in range(steps):
                _model(x, s0)

        def bare() -> Tensor:
            with torch.no_grad():
                return torchdiffeq.odeint(lambda s, xb: _model(xb * torch.rsqrt(1 + s * s), s), x, sig, method="euler")
        fns: dict[str, Callable[[], Any]] = {"model": model_only, BARE: bare}
        calls: dict[str, float] = {BARE: 1.0}
        skipped: dict[str, str] = {}
        sig_eq = grid_sigmas(UNIFORM_STEP_GRID, sch, steps).float()  # for methods that need equal steps in σ
        for m in (list(methods) if methods is not None else fixed_methods()):
            sg = sig_eq if METHODS[m].uniform_steps else sig
            f = DDIMField(_model)
            try:
                integrate(f, x, sg, m)
            except (ValueError, FloatingPointError) as e:
                skipped[m] = str(e)
                continue
            calls[f"probflow {m}"] = f.nfe / steps
            fns[f"probflow {m}"] = functools.partial(integrate, _model, x, sg, m)
        if peers and _peers.available():
            _peer_loops(peers, x, sch.sigma_max, steps, fns, calls)
        med = _interleaved_medians(fns, repeats)
    finally:
        torch.set_num_threads(old_threads)
    return _summary(med, calls, skipped, shape, steps, repeats, threads)


def _summary(med: dict, calls: dict, skipped: dict, shape, steps: int, repeats: int, threads: int | None) -> dict:
    t_model = med.pop("model") / steps
    t_bare = med[BARE] / steps
    rows = []
    for k, t in med.items():
        t /= steps
        kind = "baseline" if k == BARE else ("peer" if k.startswith("diffusers") else "probflow")
        rows.append({"solver": k, "kind": kind, "nfe_per_step": calls[k], "step_s": t,
                     "overhead_s": t - calls[k] * t_model, "ratio": t / t_bare})
    euler = next((r for r in rows if r["solver"] == "probflow euler"), None)
    return {"shape": list(shape), "dtype": "float32", "steps": steps, "repeats": repeats,
            "threads": threads or torch.get_num_threads(), "model_s": t_model, "rows": rows, "skipped": skipped,
            "euler_ratio": euler["ratio"] if euler else None}


def overhead_ratios(ov: dict | None) -> list[tuple[str, str, float]]:
    """(probflow solver, diffusers solver, probflow time per step / diffusers') at the same order."""
    if not ov:
        return []
    t = {r["solver"]: r["step_s"] for r in ov["rows"]}
    pairs = [("probflow dpmpp_2m", "diffusers DPMSolverMultistepScheduler (order 2)"),
             ("probflow dpmpp_3m", "diffusers DPMSolverMultistepScheduler (order 3)"),
             ("probflow unipc", "diffusers UniPCMultistepScheduler (order 2)"),
             ("probflow unipc_3", "diffusers UniPCMultistepScheduler (order 3)")]
    return [(a, b, t[a] / t[b]) for a, b in pairs if a in t and b in t and t[b] > 0]
