"""`probflow bench`: its arguments and its run, a thin layer over `probflow.bench` (suites, report, plots).

Writes results.json, RESULTS.md and the plots into a fresh folder (default bench-out/<UTC time>); an existing
folder's results are kept unless --force. Bad input raises ValueError naming the option (the CLI: one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from probflow import distributed as dist
from probflow.bench import kdiffusion as _kd
from probflow.bench import peers as _peers
from probflow.bench.fair import PEER_MODES, fair_peers
from probflow.bench.grids import CALIBRATED, DEFAULT_GRIDS, UNIFORM_STEP_GRID, grid_sigmas
from probflow.bench.plots import HEADLINE, plot_headline, plot_workload, write_text
from probflow.bench.recipes import FAIR_METHODS
from probflow.bench.reference import REFERENCE
from probflow.bench.report import HEADLINE_WORKLOAD, markdown
from probflow.bench.runner import CALIBRATION, adaptive_methods, fixed_methods
from probflow.bench.suites import (
    DEFAULT_SUITES,
    FULL,
    NETWORK_PEER_GRIDS,
    QUICK,
    SUITES,
    Config,
    Context,
    estimate_seconds,
    machine,
    peer_list,
    planned_calls,
    run_suites,
    versions,
)
from probflow.bench.workloads import load_model_spec
from probflow.cli.common import add_condition_arguments, condition_kwargs, flag_error
from probflow.cli.request import TOL_FLOOR, bounded, check_threads, condition
from probflow.schedules import linear
from probflow.solvers import METHODS

__all__ = ["add_bench_arguments", "run_bench"]


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder for results.json, RESULTS.md and the plots (default: "
                   "a fresh bench-out/<UTC time>; the committed results are regenerated with --out benchmarks --force)")
    p.add_argument("--model", default=None, metavar="SPEC", help="benchmark one model instead of the default suites: "
                   "'mixture2d', 'digits', a local diffusers (or digits checkpoint) folder, or 'module:factory'")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, few methods (about a minute)")
    p.add_argument("--suites", default=None, help=f"comma-separated subset of {','.join(SUITES)} (default: "
                   f"{','.join(DEFAULT_SUITES)}; with --model: model)")
    p.add_argument("--methods", default=None, help="comma-separated registered methods (default: all)")
    p.add_argument("--grids", default=None, help=f"comma-separated grids (default: {','.join(DEFAULT_GRIDS)})")
    p.add_argument("--nfe", default=None, help="comma-separated target NFEs (default: 5,10,20,50,100; each at most "
                   "10000 unless --no-limits)")
    p.add_argument("--samples", type=int, default=None, help="samples per workload (default: 256 at D=2, 128 at "
                   "D=64, 16 for a model; at most 65536 unless --no-limits)")
    p.add_argument("--ref-method", default=None, help="reference solver (default: scipy_dop853 for closed-form "
                   "models, dopri5 for networks)")
    p.add_argument("--ref-tol", type=float, default=None, help="reference rtol = atol (default 1e-12 / 1e-6 for "
                   "networks, whose reference error is then measured against a solve at a tenth of it)")
    p.add_argument("--check-tol", type=float, default=None, help="the looser tolerance the reference is checked "
                   "against (default 1e-10 / 1e-5)")
    p.add_argument("--budget-minutes", type=float, default=None, help="refuse a model run whose estimated cost "
                   "exceeds this many minutes (the estimate is printed either way)")
    p.add_argument("--digits-model", default=None, metavar="FOLDER",
                   help="digits checkpoint folder for the digits suite (default: the shipped model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1; at most the CPUs unless "
                   "--no-limits)")
    p.add_argument("--peers", default="fair", choices=PEER_MODES, help="fair (default): besides diffusers' "
                   "schedulers on their own grids, k-diffusion's samplers and diffusers' DPM-Solver++/UniPC (orders 2 "
                   "and 3) on every grid probflow's methods get, and the README's recommended and benchmarks/FAIR.md's "
                   "chosen configurations per NFE (model and digits suites); default: diffusers' schedulers on their "
                   "own grids only; none: no peers")
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    add_condition_arguments(p)  # the --model's condition


def _csv(s: str | None, conv=str, opt: str = "") -> list | None:
    """A comma-separated flag's values (None when the flag was not given); a list with no value is refused."""
    if s is None:
        return None
    try:
        values = [conv(v.strip()) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{opt}: expected comma-separated values, got {s!r}") from None
    if not values:
        raise ValueError(f"{opt}: expected at least one comma-separated value, got {s!r}")
    return values


def _suites(args: argparse.Namespace) -> list[str]:
    suites = _csv(args.suites, opt="--suites") or (["model"] if args.model else list(DEFAULT_SUITES))
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ValueError(f"--suites: unknown {bad or suites}; expected a non-empty subset of {list(SUITES)}")
    if "model" in suites and not args.model:
        raise ValueError("--suites: the model suite needs --model SPEC")
    if args.model and "model" not in suites:
        suites.append("model")
    return suites


def _methods(args: argparse.Namespace) -> list[str]:
    methods = _csv(args.methods, opt="--methods")
    if methods is None:
        if not args.quick:
            return fixed_methods() + adaptive_methods()
        return ["euler", "heun2", "dpmpp_2m", "dopri5"]
    for m in methods:
        if m not in METHODS or m == REFERENCE:
            raise ValueError(f"--methods: {m!r} is not a registered solver other than the reference; expected "
                             f"among {[n for n in METHODS if n != REFERENCE]}")
    return methods


def _check(args: argparse.Namespace) -> tuple[list[str] | None, list[int] | None]:
    grids = _csv(args.grids, opt="--grids")
    for g in grids or []:
        if g != CALIBRATED:
            try:
                grid_sigmas(g, linear(), 4)
            except ValueError as e:
                raise ValueError(f"--grids: {e}") from None
    limits = not args.no_limits
    nfe = _csv(args.nfe, int, "--nfe")
    for n in nfe or []:
        bounded("--nfe", n, limits)
    bounded("--samples", args.samples, limits, lo=2)
    check_threads(args.threads, limits)
    for opt, v in (("--ref-tol", args.ref_tol), ("--check-tol", args.check_tol), ("--budget-minutes",
                                                                                  args.budget_minutes)):
        if v is not None and not (v > 0 and np.isfinite(v)):
            raise ValueError(f"{opt}: expected a positive number, got {v}")
    for opt, v in (("--ref-tol", args.ref_tol), ("--check-tol", args.check_tol)):
        if limits and v is not None and v < TOL_FLOOR:  # a reference below it never returns
            raise ValueError(f"{opt}: {v:g} is below the floor {TOL_FLOOR:g} that an adaptive solve can reach (pass "
                             "--no-limits to try anyway)")
    if args.ref_tol and args.check_tol and args.check_tol <= args.ref_tol:
        raise ValueError(f"--check-tol: expected a looser tolerance than --ref-tol {args.ref_tol:g}, got "
                         f"{args.check_tol:g}")
    if args.ref_method is not None and (args.ref_method not in METHODS or not METHODS[args.ref_method].adaptive):
        raise ValueError(f"--ref-method: expected an adaptive solver, one of "
                         f"{[n for n, m in METHODS.items() if m.adaptive]}, got {args.ref_method!r}")
    if args.digits_model is not None and not Path(args.digits_model).is_dir():
        raise ValueError(f"--digits-model: {args.digits_model} is not a folder")
    return grids, nfe


def _out(args: argparse.Namespace, suites: list[str]) -> Path:
    out = Path(args.out) if args.out else Path("bench-out") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    if not args.force and out.is_dir():
        exist = [str(out / n) for n in ("results.json", "RESULTS.md", HEADLINE) if (out / n).exists()]
        exist += [str(p) for p in out.glob("error_vs_*.png")]
        if exist:
            raise FileExistsError(f"--out: {out} already holds results ({len(exist)} files, e.g. "
                                  f"{Path(exist[0]).name}); pass --force to overwrite them")
    return out


def _estimate(ctx: Context, suites: list[str], budget: float | None) -> None:
    """Print the estimated cost of each model workload (a timed batched call × the planned calls); refuse the run
    when their sum exceeds `budget` minutes."""
    total = 0.0
    for key in suites:
        spec = {"digits": ctx.digits_model or "digits", "model": ctx.model}.get(key)
        if spec is None:
            continue
        model = load_model_spec(spec, **(ctx.condition if key == "model" else {}))
        network, cfg = hasattr(model, "net"), ctx.cfg
        n = ctx.samples or cfg.n_model
        grids = ctx.grids or list(cfg.network_grids if network else cfg.grids)
        nfe = ctx.nfe or list(cfg.network_nfe if network else cfg.nfe)
        n_tol = len([t for t in cfg.tolerances if t >= cfg.network_min_tol]) if network else len(cfg.tolerances)
        n_pg = len(NETWORK_PEER_GRIDS) if network else 5
        n_fair = (len(fair_peers()) * (len([g for g in grids if g != CALIBRATED]) + 3) + 3 + 3 * len(
            [m for m in ctx.methods if m in FAIR_METHODS])) if ctx.peer_mode == "fair" else 0
        calls = planned_calls(ctx.methods, grids, nfe, n_tol, ctx.peers, n_pg, len(CALIBRATION["methods"]), n_fair)
        per, secs = estimate_seconds(model, n, calls)
        total += secs
        ctx.say(f"{key}: about {calls} batched model calls of {n} samples at {per * 1e3:.1f} ms each ≈ "
                f"{secs / 60:.1f} min (rough: adaptive and reference solves are guessed)")
    if budget is not None and total > 60 * budget:
        raise ValueError(f"--budget-minutes: the run is estimated at {total / 60:.1f} min, over the budget of "
                         f"{budget:g}; lower --samples, --nfe or --methods, or use --quick")


def _context(args: argparse.Namespace, cfg: Config, suites: list[str], methods: list[str],
             grids: list[str] | None, nfe: list[int] | None, cond: dict) -> Context:
    peers = peer_list(cfg) if args.peers != "none" else []
    results: dict = {"command": _command(args), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                     "quick": bool(args.quick), "versions": versions(), "machine": machine(), "workloads": {},
                     "skipped": [], "suite_wall_s": {}, "sections": [], "notes": [],
                     "config": {"suites": suites, "methods": methods, "grids": grids or list(cfg.grids),
                                "nfe": nfe or list(cfg.nfe), "tolerances": list(cfg.tolerances), "peers": peers,
                                "uniform_step_grid": UNIFORM_STEP_GRID, "model": args.model,
                                "condition": {k: v for k in ("class_label", "prompt", "prompt_embeds", "negative",
                                                             "guidance") if (v := getattr(args, k)) is not None},
                                "peer_mode": args.peers,
                                "fair_peers": fair_peers() if args.peers == "fair" else []}}
    if not _peers.available():
        results["skipped"].append("diffusers peers: diffusers could not be imported")
    if args.peers == "fair" and not _kd.available():
        results["skipped"].append("k-diffusion peers: k_diffusion/sampling.py could not be loaded (pip install "
                                  "--no-deps k-diffusion)")
    return Context(cfg, methods, grids, nfe, peers, results, args.samples, args.model, args.digits_model,
                   (args.ref_method, args.ref_tol, args.check_tol), not args.no_progress, args.peers, cond)


def run_bench(args: argparse.Namespace) -> int:
    """`probflow bench`: run the suites; write results.json, RESULTS.md and the plots into the output folder."""
    cfg = QUICK if args.quick else FULL
    suites = _suites(args)
    methods = _methods(args)
    grids, nfe = _check(args)
    cond = {k: v for k, v in condition_kwargs(condition(args)).items() if v is not None}
    if cond and not args.model:
        raise ValueError(f"--{'class' if 'class_label' in cond else next(iter(cond)).replace('_', '-')}: a condition "
                         "goes with --model (a conditional model)")
    if args.model:
        try:
            load_model_spec(args.model, **cond)  # a bad spec or condition fails here, before anything runs
        except ValueError as e:
            raise flag_error(e) from None
    out = _out(args, suites)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    try:
        ctx = _context(args, cfg, suites, methods, grids, nfe, cond)
        _estimate(ctx, suites, args.budget_minutes)
        results = run_suites(ctx, suites)
    finally:
        torch.set_num_threads(old_threads)
    dist.on_rank0(lambda: _write(results, out))
    if dist.world().rank == 0:
        print(f"probflow bench: results.json, RESULTS.md and {len(results['plots'])} plots written to {out} "
              f"({results['wall_s']:.0f} s)")
    return 0


def _write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for wname, wres in results["workloads"].items():
        plots += plot_workload(wname, wres["rows"], out)
    if HEADLINE_WORKLOAD in results["workloads"]:
        plots.append(plot_headline(HEADLINE_WORKLOAD, results["workloads"][HEADLINE_WORKLOAD]["rows"], out / HEADLINE))
    results["plots"] = [p.name for p in plots]
    write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default, allow_nan=True))
    write_text(out / "RESULTS.md", markdown(results))


def _command(args: argparse.Namespace) -> str:
    """The command line equivalent to `args` (every option that differs from its default)."""
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    defaults = vars(p.parse_args([]))
    parts = ["probflow bench"]
    for k, v in vars(args).items():
        if k in defaults and v != defaults[k]:
            flag = "class" if k == "class_label" else k.replace("_", "-")
            parts.append(f"--{flag}" + ("" if v is True else f" {v}"))
    return " ".join(parts)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


