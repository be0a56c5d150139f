"""The held-out study: the recommended solver per NFE chosen on the tuning problems, reported on held-out ones.

    python benchmarks/heldout.py --out benchmarks/HELDOUT.md [--force] [--cache PATH]
    python benchmarks/heldout.py --tune            # refit the `tuned` grid on the tuning set and print TUNED

The family and its split are `probflow.bench.heldout`; the computations are `heldout_study.py`, the adaptive
comparison `adaptive_study.py` (both beside this file). Phases ("tuning", "heldout", "adaptive_o4",
"calibrated_select") are cached with `--cache PATH` so that a long run can resume; a phase's key names its
recipe, so a cache written before a recipe changed is recomputed for that phase, not reused (rename the key when
a phase's computation changes). The report names the command that wrote it.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
from pathlib import Path

import adaptive_study
import heldout_study as hs
import numpy as np
import torch

from probflow.bench.heldout import HELDOUT_SEEDS, TUNING_SEEDS, make_problem, setup
from probflow.calibrate import SELECT_METHODS
from probflow.io.atomic import atomic_write, check_writable


def _fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.2f}"


def _calibrated_rows(held: list[dict], rows: list[dict]) -> list[dict]:
    """Per NFE: the selection's and the fixed method's ratios to the best peer, the choices and the cost."""
    seeds = list(HELDOUT_SEEDS[:len(held)])
    out = []
    for n in sorted({r["nfe"] for r in rows}):
        rs = {r["problem"]: r for r in rows if r["nfe"] == n}
        peer = {sd: hs.best(h["peer"], n)[0] for sd, h in zip(seeds, held, strict=True) if sd in rs}
        fixed = hs.CALIBRATED_FIXED[n]
        picks = [rs[sd]["method"] for sd in peer]
        out.append({"nfe": n, "sel": [rs[sd]["rmse"] / peer[sd] for sd in peer],
                    "fixed": [rs[sd]["cand_rmse"][fixed] / peer[sd] for sd in peer], "fixed_method": fixed,
                    "picks": ", ".join(f"{m} ×{picks.count(m)}" for m in sorted(set(picks))),
                    "cost": float(np.median([r["cal_nfe"] for r in rs.values()]))})
    return out


def _calibrated_table(held: list[dict], rows: list[dict]) -> list[str]:
    out = ["| NFE | chosen per model (problems) | selected ÷ best peer, median | worst | problems ≤ 1.0× | fixed "
           "method (previous recipe) | its median | its worst | its ≤ 1.0× | calibration calls (median) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for c in _calibrated_rows(held, rows):
        s, f = c["sel"], c["fixed"]
        out.append(f"| {c['nfe']} | {c['picks']} | {_fmt(float(np.median(s)))} | {_fmt(max(s))} | "
                   f"{sum(v <= 1 for v in s)}/{len(s)} | {c['fixed_method']} | {_fmt(float(np.median(f)))} | "
                   f"{_fmt(max(f))} | {sum(v <= 1 for v in f)}/{len(f)} | {c['cost']:.0f} |")
    return out


def _ratio_table(results: list[dict], chosen: dict, nfe) -> list[str]:
    out = ["| NFE | chosen on tuning set (method, grid) | median ratio | worst | oracle median | "
           "oracle worst | problems ≤ 1.0× |", "|---|---|---|---|---|---|---|"]
    for n in nfe:
        r = hs.ratios(results, n, chosen[n])
        o = hs.ratios(results, n, None)
        ok = sum(v <= 1.0 for v in r)
        out.append(f"| {n} | {chosen[n][0]}, {chosen[n][1]} | {_fmt(float(np.median(r)))} | {_fmt(max(r))} | "
                   f"{_fmt(float(np.median(o)))} | {_fmt(max(o))} | {ok}/{len(r)} |")
    return out


def _problem_table(results: list[dict], meta: list, chosen: dict, nfe) -> list[str]:
    out = ["| problem | " + " | ".join(f"NFE {n}: best peer (RMSE) → ratio" for n in nfe) + " |",
           "|---|" + "---|" * len(nfe)]
    for r, (desc, _) in zip(results, meta, strict=True):
        cells = []
        for n in nfe:
            bp, key = hs.best(r["peer"], n)
            pick = f" [{r['pilot_choice'][n]}]" if chosen[n][0] == "pilot" else ""
            cells.append(f"{key[0]}/{key[1]} ({bp:.1e}) → {_fmt(r['pf'].get((*chosen[n], n), math.inf) / bp)}{pick}")
        out.append(f"| {desc} | " + " | ".join(cells) + " |")
    return out


def _cached(cache: dict, path: str | None, key: str, compute):
    """cache[key], computed (and the cache pickled to `path`, if given) when missing: a long run can resume."""
    if key not in cache:
        t0 = time.perf_counter()
        cache[key] = compute()
        cache[f"{key}_wall_s"] = time.perf_counter() - t0
        if path:
            Path(path).write_bytes(pickle.dumps(cache))
    return cache[key]


def _meta(setups: list) -> list[tuple[str, float]]:
    return [(s.problem.describe(), s.ref_check) for s in setups]


def _evaluate(seeds, n_samples: int, nfe, calibrated: int = 0) -> tuple[list[dict], list, list[dict]]:
    setups = hs.make_setups(seeds, n_samples)
    res = []
    for s in setups:
        t1 = time.perf_counter()
        res.append(hs.run_problem(s, nfe))
        hs.say(f"  evaluated {s.problem.describe()}: {time.perf_counter() - t1:.1f} s")
    cal = hs.calibrated_study(setups[:calibrated]) if calibrated else []
    return res, _meta(setups), cal


def report(a: argparse.Namespace) -> int:
    """Run (or resume from `a.cache`) the phases of a held-out run and write its markdown report to `a.out`
    (printed when None)."""
    t0 = time.perf_counter()
    text = build(a)
    if a.out:
        def write(tmp: str) -> None:
            Path(tmp).write_text(text, encoding="utf-8")

        atomic_write(a.out, write, force=a.force, name="--out")
        hs.say(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
    else:
        print(text)
    return 0


def build(a: argparse.Namespace) -> str:
    """The markdown report of a held-out run (phases resumed from `a.cache` when given)."""
    t0 = time.perf_counter()
    quick = a.quick
    nfe = (10, 20) if quick else hs.NFE
    n_samples = 4 if quick else a.samples
    tun_seeds = TUNING_SEEDS[:2 if quick else a.tuning]
    held_seeds = HELDOUT_SEEDS[:2 if quick else a.heldout]
    cache = pickle.loads(Path(a.cache).read_bytes()) if a.cache and Path(a.cache).exists() else {}
    hs.say(f"tuning set: {len(tun_seeds)} problems")
    tun, tun_meta, _ = _cached(cache, a.cache, "tuning", lambda: _evaluate(tun_seeds, n_samples, nfe))
    chosen = {n: hs.choose(tun, n) for n in nfe}
    hs.say(f"chosen on the tuning set: {chosen}")
    hs.say(f"held-out set: {len(held_seeds)} problems (+ the calibrated grid on the first 4)")
    held, held_meta, cal = _cached(cache, a.cache, "heldout",
                                   lambda: _evaluate(held_seeds, n_samples, nfe, 0 if quick else 4))
    adaptive_md = ""
    if not quick:
        hs.say("adaptive study")
        # the key names the solver set: a cache from before adaptive_exp_o4 (key "adaptive") is not reused
        rows = _cached(cache, a.cache, "adaptive_o4", lambda: adaptive_study.tolerance_study(
            [setup(make_problem(sd), 8, 1e-12, 1e-10) for sd in HELDOUT_SEEDS[:3]]))
        adaptive_md = adaptive_study.tolerance_tables(rows)
    # the key names the recipe: a cache written by an earlier recipe ("calibrated_all": one fixed method per NFE)
    # is not reused
    cal_all = [] if quick or a.no_calibrated else _cached(
        cache, a.cache, "calibrated_select", lambda: hs.calibrated_all(held_seeds, n_samples))
    used = ("tuning", "heldout", "adaptive_o4", "calibrated_select")  # phases of this recipe (stale keys ignored)
    phases = {k: cache[f"{k}_wall_s"] for k in used if f"{k}_wall_s" in cache}
    wall = sum(phases.values()) + (time.perf_counter() - t0 if not phases else 0.0)
    return _markdown(a, nfe, n_samples, tun_meta, held_meta, tun, held, chosen, cal, adaptive_md, wall, cal_all,
                     phases)


def _markdown(a, nfe, n_samples, tun_meta, held_meta, tun, held, chosen, cal, adaptive_md, wall, cal_all=(),
              phases=None) -> str:
    argv = list(a.argv)
    resumed = ""
    if "--cache" in argv:  # a local path: named in words, not printed
        i = argv.index("--cache")
        del argv[i:i + 2]
        resumed = " (resumed from its own cache of finished phases)"
    cmd = " ".join(["python benchmarks/heldout.py", *argv])
    split = ", ".join(f"{k} {v / 60:.1f}" for k, v in (phases or {}).items())
    lines = [
        "# Held-out problem family", "",
        f"Generated by `{cmd}`{resumed} in {wall / 60:.1f} min wall on one thread"
        f"{f' ({split} min)' if split else ''}, on a shared 2-core machine (torch {torch.__version__}).", "",
        "Everything chosen (the solver + grid per NFE, the `tuned` grid's (ρ, end), the adaptive method's "
        "settings) was chosen on the tuning set; the held-out set is used for these numbers only. Family, split "
        "and evaluation: `probflow/bench/heldout.py` and `benchmarks/heldout_study.py` (module docs). "
        f"{len(tun_meta)} tuning and {len(held_meta)} held-out problems, {n_samples} samples each, Eq. 12 from "
        "σ_max = 157 (DDPM linear, t = 999) to σ = 0, error = RMSE of x_0 against DOP853 at 1e-10.", "",
        "## Ratio to the best peer, held-out set", "",
        "Ratio = probflow's RMSE / the best peer's RMSE on the same problem, the peer being the best of diffusers' "
        f"{', '.join(hs.PEERS)} on every grid each supports (trailing, Karras, exponential; model at the rounded "
        "timestep or at the scheduler's σ), chosen per problem. \"chosen\": one probflow method + grid per NFE, "
        "picked on the tuning set by the median log-ratio; \"oracle\": probflow's best per problem (for context "
        "only; it selects on the held-out set).", "",
        *_ratio_table(held, chosen, nfe), "",
        "Tuning set, same columns (where the choice was made):", "", *_ratio_table(tun, chosen, nfe), "",
    ]
    if cal:
        lines += ["## The calibrated grid on held-out problems", "",
                  "unipc_3, RMSE on the first 4 held-out problems; calibrated = `probflow.calibrate.calibrated` (16 "
                  "calibration samples of its own noise, ≤ 100 solves, start log-SNR to 3σ_0).", "",
                  "| problem | NFE | calibrated | log_snr_tuned | tuned | calibrated ÷ best other |",
                  "|---|---|---|---|---|---|"]
        for r in cal:
            other = min(r["log_snr_tuned"], r["tuned"])
            lines.append(f"| {r['problem']} | {r['nfe']} | {r['calibrated']:.2e} | {r['log_snr_tuned']:.2e} | "
                         f"{r['tuned']:.2e} | {_fmt(r['calibrated'] / other)} |")
        gains = [r["calibrated"] / min(r["log_snr_tuned"], r["tuned"]) for r in cal]
        lines += ["", f"Median calibrated ÷ best uncalibrated: {_fmt(float(np.median(gains)))} (worst "
                  f"{_fmt(max(gains))}); {sum(g < 1 for g in gains)}/{len(gains)} cases better.", ""]
    if cal_all:
        lines += ["## Calibrated grid + method chosen per model, on every held-out problem", "",
                  "Per model and NFE: `probflow.calibrate.calibrated_select` — a grid calibrated "
                  "(`probflow.calibrate.calibrated`, ≤ 100 solves, start log-SNR to 3σ_0) for each of "
                  f"{', '.join(f'`{m}`' for m in SELECT_METHODS)} on 16 samples of the model's own "
                  "calibration noise, then the method whose grid has the smaller RMSE on 16 other samples of the "
                  "model's own noise (validation; references DOP853 at 1e-10). The candidates and the rule were "
                  "chosen on the tuning problems; the evaluation noise is never used. \"fixed method\": the same "
                  "calibrated grid of the method the previous recipe fixed per NFE from the tuning problems. "
                  "Calibration calls: model calls on batches of 16 samples, per model and NFE (both references "
                  "included); a one-off cost per model, not per sample.", "",
                  *_calibrated_table(held, list(cal_all)), ""]
    if adaptive_md:
        lines += ["## Adaptive solving: tolerance proportionality and NFE beside DPM-Solver's adaptive recipe", "",
                  "First 3 held-out problems, 8 samples each, reference DOP853 at 1e-12 (checked against 1e-10). "
                  "dopri5 = torchdiffeq in log σ (integrate's default), dopri5_sigma = the same in σ (the old "
                  "default), adaptive_exp = probflow's adaptive exponential integrator (3(4) pair, the default), "
                  "adaptive_exp_o4 = the same with options={\"order\": 4} (4(5) pair), dpm23 / dpm23_deep = "
                  "the recipe (`benchmarks/adaptive_study.py`, written from the paper) ending at σ_0 = 0.01 / at "
                  "1e-3, each with its denoising step to σ = 0.", "", adaptive_md, ""]
    lines += ["## Recommendations (from the held-out numbers above)", ""]
    for n in nfe:
        r = hs.ratios(held, n, chosen[n])
        lines.append(f"- NFE {n}: `{chosen[n][0]}` on the `{chosen[n][1]}` grid — held-out median "
                     f"{_fmt(float(np.median(r)))}× the best peer, worst {_fmt(max(r))}×.")
    if cal_all:
        lines += ["", "With a per-model calibration (`probflow.calibrate.calibrated_select`: the method and its "
                  "calibrated grid chosen on the model's own validation noise; one-off cost in the table above):", ""]
        for c in _calibrated_rows(held, list(cal_all)):
            s = c["sel"]
            lines.append(f"- NFE {c['nfe']}: `calibrated_select` ({c['picks']}) — held-out median "
                         f"{_fmt(float(np.median(s)))}× the best peer, worst {_fmt(max(s))}× "
                         f"({sum(v <= 1 for v in s)}/{len(s)} problems ≤ 1.0×).")
    lines += ["", "## Problems", "", "Tuning set:", "",
              *[f"- {d} (reference check {c:.1e})" for d, c in tun_meta], "",
              "Held-out set, per problem at the chosen configuration:", "",
              *_problem_table(held, held_meta, chosen, nfe), ""]
    return "\n".join(lines)


def _tune(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    fitted = hs.tune(hs.make_setups(TUNING_SEEDS[:a.tuning], a.samples))
    print("TUNED = {")
    for k, v in fitted.items():
        print(f"    {k!r}: ({v[0]!r}, {v[1]!r}),")
    print("}")
    hs.say(f"tuning took {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/heldout.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the report (markdown) here, atomically")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--tune", action="store_true", help="fit the `tuned` grid on the tuning set and print TUNED")
    p.add_argument("--samples", type=int, default=8, help="samples per problem (default 8)")
    p.add_argument("--tuning", type=int, default=len(TUNING_SEEDS), help="first N tuning problems")
    p.add_argument("--heldout", type=int, default=len(HELDOUT_SEEDS), help="first N held-out problems")
    p.add_argument("--cache", help="pickle the finished phases here and resume from it (a long run can resume)")
    p.add_argument("--no-calibrated", action="store_true", help="skip the calibrated grid on every held-out problem")
    p.add_argument("--quick", action="store_true", help="2 + 2 problems, 4 samples, NFE 10 and 20, no adaptive")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)  # the command, named in the report
    torch.set_num_threads(1)
    if a.samples < 1 or a.tuning < 1 or a.heldout < 1:
        p.exit(2, "benchmarks/heldout.py: --samples, --tuning, --heldout: expected positive integers\n")
    if a.out:  # before the study runs, not after
        try:
            check_writable(a.out, a.force, "--out")
        except (OSError, ValueError) as e:
            p.exit(2, f"benchmarks/heldout.py: {e}\n")
    return _tune(a) if a.tune else report(a)


if __name__ == "__main__":
    sys.exit(main())
