"""The suites of `probflow bench`: sizes (`FULL`, `QUICK`), the run of each suite into one results dict, and a
cost estimate for model workloads before they run.

Suites: "mixture2" and "mixture64" (sharp Gaussian mixtures with exact ε, DOP853 reference at 1e-12), "digits"
(the shipped digits network), "model" (any `--model SPEC`, see `workloads.load_model_spec`) and "overhead" (time
per step beyond the model). `SUITES` maps a suite's name to its runner `run(ctx) -> None`, which adds its workload
(or a markdown section, ctx.results["sections"]) to ctx.results; further suites register here. The one-off
studies that produced committed numbers (the held-out family's recommendations, digits sample quality) are
scripts in `benchmarks/`, not suites.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from probflow.bench import peers as _peers
from probflow.bench.fair import fair_peers, fair_plan
from probflow.bench.grids import CALIBRATED, DEFAULT_GRIDS
from probflow.bench.overhead import solver_overhead
from probflow.bench.reference import default_reference
from probflow.bench.runner import NFE, TOLERANCES, run_workload
from probflow.bench.workloads import load_model_spec, mixture_workload, model_workload, sample_shape
from probflow.solvers import METHODS

__all__ = ["Config", "FULL", "QUICK", "Context", "SUITES", "run_suites", "estimate_seconds", "versions", "machine"]

# The digits network: Karras/exponential peer grids and the trailing one (the network's cost keeps this small).
NETWORK_PEER_GRIDS = ("trailing", "karras", "exponential", "exponential_sigma")


@dataclass(frozen=True)
class Config:
    """Sizes of a run: samples per workload, NFE targets, tolerances, grids, peers (None: all), the closed-form
    models' reference tolerances, the network workloads' NFE/grids/smallest tolerance/reference tolerances, and
    the overhead timing."""

    n2: int
    n64: int
    n_model: int
    nfe: tuple[int, ...]
    tolerances: tuple[float, ...]
    grids: tuple[str, ...]
    peers: tuple[str, ...] | None
    ref_tol: float
    check_tol: float
    network_nfe: tuple[int, ...]
    network_grids: tuple[str, ...]
    network_min_tol: float
    network_ref_tol: float
    network_check_tol: float
    overhead_steps: int
    overhead_repeats: int
    # suite → `run_workload`'s calibration (absent: the default; None: no calibrated grid in that suite)
    calibration: dict = field(default_factory=dict)
    # the network reference: solver (None: `default_reference`), network dtype (None: the model's own), and whether
    # a third solve at a tenth of its tolerance measures its own error (`reference.reference`'s error_tol). FULL's
    # network reference is dopri5 at 1e-6 on the solvers' own float32 network: its error is measured, never assumed
    # (the shipped digits network's ε is only continuous in σ, with a kink at each table σ_t where t(σ) changes slope,
    # so an adaptive solve converges slowly there; benchmarks/RESULTS.md reports the measured ε_ref).
    network_ref_method: str | None = None
    network_ref_dtype: torch.dtype | None = None
    measure_ref_error: bool = True


FULL = Config(n2=256, n64=128, n_model=16, nfe=NFE, tolerances=TOLERANCES, grids=DEFAULT_GRIDS, peers=None,
              ref_tol=1e-12, check_tol=1e-10, network_nfe=(5, 10, 20, 50),
              network_grids=("uniform", "karras", CALIBRATED),
              network_min_tol=1e-3, network_ref_tol=1e-6, network_check_tol=1e-5, overhead_steps=50,
              overhead_repeats=7,
              calibration={"mixture2": None, "mixture64": {},
                           "network": {"nfe": (10,), "options": {"n": 32, "ref_method": "dopri5", "ref_tol": 1e-6,
                                                                 "max_evals": 100}}})
QUICK = Config(n2=16, n64=4, n_model=8, nfe=(5, 10, 20), tolerances=(1e-3,), grids=("uniform", "karras"),
               peers=("ddim", "dpmpp_2m"), ref_tol=1e-9, check_tol=1e-7, network_nfe=(10,), network_grids=("uniform",),
               network_min_tol=1e-3, network_ref_tol=1e-7, network_check_tol=1e-5, overhead_steps=10,
               overhead_repeats=3, network_ref_dtype=torch.float64)


@dataclass
class Context:
    """What every suite gets: the config, the chosen methods/grids/NFE/peers, the options that override the
    config (samples, model specs, reference), progress on/off, and the results dict it writes into."""

    cfg: Config
    methods: list[str]
    grids: list[str] | None
    nfe: list[int] | None
    peers: list[str]
    results: dict
    samples: int | None = None
    model: str | None = None
    digits_model: str | None = None
    ref: tuple[str | None, float | None, float | None] = (None, None, None)
    progress: bool = True
    peer_mode: str = "fair"  # `fair.PEER_MODES`: "fair" adds the fair peers and named configurations
    condition: dict = field(default_factory=dict)  # the --model's condition (`workloads.load_model_spec`)

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"probflow bench: {msg}", file=sys.stderr, flush=True)


def _mixture(ctx: Context, dim: int, key: str, n: int) -> None:
    cfg = ctx.cfg
    n = ctx.samples or n
    ctx.say(f"{key}: reference DOP853 at {cfg.ref_tol:g} (checked at {cfg.check_tol:g}) for {n} samples …")
    w = mixture_workload(dim, n, 0, ref_tol=cfg.ref_tol, check_tol=cfg.check_tol)
    cal = cfg.calibration.get(key, {})
    grids = [g for g in (ctx.grids or list(cfg.grids)) if g != CALIBRATED or cal is not None]
    rows = run_workload(w, ctx.methods, grids, ctx.nfe or list(cfg.nfe), cfg.tolerances, ctx.peers, None,
                        ctx.progress, cal)
    ctx.results["workloads"][w.name] = {
        "description": f"Sharp Gaussian mixture, D = {dim}, K = 8, full covariances, per-direction std log-uniform "
                       f"in [0.05, 0.5] (`GaussianMixture.random({dim}, 8, seed=0)`); {n} samples x_T = "
                       f"probflow.noise({n}, ({dim},), seed=1); σ_max = {w.schedule.sigma_max:.4f} (t = T−1 of the "
                       "linear DDPM table) → σ = 0.",
        "reference": w.ref, "extra": w.extra, "rows": rows}


def _network_or_model(ctx: Context, spec: str, name: str, condition: dict | None = None) -> None:
    """A workload for any model spec: networks get the network sizes (fewer NFE/grids, tolerances ≥
    network_min_tol), closed-form models the mixtures' (every grid, DOP853 at the config's tolerance)."""
    cfg = ctx.cfg
    model = load_model_spec(spec, **(condition or {}))
    network = hasattr(model, "net")
    n = ctx.samples or cfg.n_model
    method = (network and cfg.network_ref_method) or default_reference(model)[0]
    tol, check = (cfg.network_ref_tol, cfg.network_check_tol) if network else (cfg.ref_tol, cfg.check_tol)
    method, tol, check = ctx.ref[0] or method, ctx.ref[1] or tol, ctx.ref[2] or check
    err_tol = tol / 10 if network and cfg.measure_ref_error else None
    dtype = cfg.network_ref_dtype if network else None
    ctx.say(f"{name}: reference {method} at {tol:g} (checked at {check:g}"
            + (f", error measured at {err_tol:g}" if err_tol else "") + f") for {n} samples …")
    w = model_workload(model, n, 0, name=name, ref_method=method, ref_tol=tol, check_tol=check, ref_dtype=dtype,
                       error_tol=err_tol)
    cal = cfg.calibration.get("network" if network else "model", {})
    grids = ctx.grids or list(cfg.network_grids if network else cfg.grids)
    grids = [g for g in grids if g != CALIBRATED or cal is not None]
    nfe = ctx.nfe or list(cfg.network_nfe if network else cfg.nfe)
    tols = tuple(t for t in cfg.tolerances if t >= cfg.network_min_tol) if network else cfg.tolerances
    extra = (lambda wl, gs: fair_plan(wl, gs, nfe, ctx.methods)) if ctx.peer_mode == "fair" else None
    rows = run_workload(w, ctx.methods, grids, nfe, tols, ctx.peers, NETWORK_PEER_GRIDS if network else None,
                        ctx.progress, cal, extra)
    shape = tuple(w.noise.shape[1:])
    ctx.results["workloads"][w.name] = {
        "description": f"Model `{spec}` ({type(model).__name__}"
                       + (f", fingerprint {w.extra['fingerprint']}" if w.extra.get("fingerprint") else "")
                       + f"), network dtype {w.extra['network_dtype'] or '—'}, float64 state; {n} samples x_T = "
                       f"probflow.noise({n}, {shape}, seed=0); σ_max = {w.schedule.sigma_max:.4f} → σ = 0. Grids "
                       f"{', '.join(grids)} at NFE {', '.join(map(str, nfe))}; adaptive tolerances "
                       f"{', '.join(f'{t:g}' for t in tols)}."
                       + (f" Fair peers ({', '.join(fair_peers())}) on the same grids but `calibrated`; the README's "
                          "recommended and benchmarks/FAIR.md's chosen configurations per NFE."
                          if ctx.peer_mode == "fair" else ""),
        "reference": w.ref, "extra": w.extra, "rows": rows}


def _overhead(ctx: Context) -> None:
    ctx.say("overhead: near-free model, 64×3×32×32 float32 …")
    ov_methods = [m for m in ctx.methods if not METHODS[m].adaptive]
    ctx.results["overhead"] = solver_overhead(
        steps=ctx.cfg.overhead_steps, repeats=ctx.cfg.overhead_repeats, methods=ov_methods, threads=None,
        peers=("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3") if ctx.peers else ())


SUITES: dict[str, Callable[[Context], None]] = {
    "mixture2": lambda ctx: _mixture(ctx, 2, "mixture2", ctx.cfg.n2),
    "mixture64": lambda ctx: _mixture(ctx, 64, "mixture64", ctx.cfg.n64),
    "digits": lambda ctx: _network_or_model(ctx, ctx.digits_model or "digits", "digits"),
    "model": lambda ctx: _network_or_model(ctx, ctx.model, f"model {ctx.model}", ctx.condition),
    "overhead": _overhead,
}
DEFAULT_SUITES = ("mixture2", "mixture64", "digits", "overhead")


def run_suites(ctx: Context, suites: Sequence[str]) -> dict:
    """Run `suites` in order into ctx.results (with each suite's wall time); returns ctx.results."""
    t_start = time.perf_counter()
    for key in suites:
        t0 = time.perf_counter()
        SUITES[key](ctx)
        ctx.results["suite_wall_s"][key] = time.perf_counter() - t0
    ctx.results["wall_s"] = time.perf_counter() - t_start
    return ctx.results


def planned_calls(methods: Sequence[str], grids: Sequence[str], nfe: Sequence[int], n_tol: int,
                  peers: Sequence[str], n_peer_grids: int, n_cal: int, n_fair: int = 0) -> int:
    """Batched model calls of one workload's solves: fixed methods × grids × NFE (calibrated: `n_cal` methods),
    adaptive methods × tolerances at a rough 300 calls each, peers × grids × NFE, the reference and its check at
    a rough 1,000 calls, the calibration at a rough 200 calls per step count, and `n_fair` further configurations
    per NFE (`--peers fair`)."""
    fixed = [m for m in methods if not METHODS[m].adaptive]
    n_adaptive = len(methods) - len(fixed)
    plain = [g for g in grids if g != CALIBRATED]
    calls = sum(nfe) * (len(fixed) * len(plain) + (n_cal if CALIBRATED in grids else 0) + len(peers) * n_peer_grids
                        + n_fair)
    return int(calls + 300 * n_adaptive * n_tol + 1000 + (200 * len(nfe) if CALIBRATED in grids else 0))


def estimate_seconds(model, n_samples: int, calls: int, repeats: int = 3) -> tuple[float, float]:
    """(seconds per batched model call of `n_samples` samples, measured as the median of `repeats` calls after
    one warm-up; that × `calls`)."""
    from probflow.field import DDIMField
    from probflow.flows import noise

    x = noise(n_samples, sample_shape(model), 0)
    f = DDIMField(model, model_dtype=getattr(model, "model_dtype", None))
    s = torch.tensor(1.0, dtype=torch.float64)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            f(s, x)
            if i:
                times.append(time.perf_counter() - t0)
    per = float(np.median(times))
    return per, per * calls


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("scipy", "torchdiffeq", "diffusers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an optional dependency that fails to import is reported as absent
            v[mod] = None
    from probflow import __version__

    v["probflow"] = __version__
    return v


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def peer_list(cfg: Config) -> list[str]:
    """The peers of a run: the config's (None: all), or none where diffusers cannot be imported."""
    if not _peers.available():
        return []
    return list(cfg.peers) if cfg.peers else _peers.peer_names()
