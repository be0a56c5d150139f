"""Design data for `probflow.fit.fit_recipe`'s validation rule against mode switches (issue 26), on the TUNING
problems only (`heldout.TUNING_SEEDS` and `heldout.DESIGN_SEEDS`): how often a fitted grid sends a sample into
another mixture component on fresh noise, and what each validation rule keeps.

Per tuning problem and NFE: the fit's start (2 methods × `fit.candidate_grids` on 32 calibration samples,
seed + 7, trimmed RMSE), the Nelder–Mead warp of it (`optimise_grid`, 12 bins, ≤ 400 solves), and the README's
uncalibrated recipe (`recipes.RECOMMENDED`); per-sample RMS errors of each on 256 validation samples (seed + 8;
the first 32 are the 32-sample batch) and 256 fresh samples (seed + 11, never seen by any choice), and its RMSE
on the problem's evaluation noise (seed + 1, 32 samples) ÷ the peer's configuration chosen on tuning
(`recipes.FAIR_CHOSEN["peer"]`, FAIR.md's measure). Rules (kept: the fitted grid, else the start):
"trim" (lower RMSE leaving out the worst sample: the rule before issue 26's fix), "full" (lower RMSE over every
sample), "max" (both, and a largest error no larger than the start's), "jumpJ" (trim, and no sample whose error
the fitted grid alone makes J× larger: `fit._confirmed`). A "jump" on fresh noise: a sample whose RMS error
per coordinate exceeds 0.1 (a switch of component).

Run: `python benchmarks/fit_design.py --nfe 10,20 --seeds 100-109 --out FILE.json` (prints the rule table).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch
from fair_fewstep import peer_chosen, tuning_seeds  # benchmarks/ is the script's own folder on sys.path

from probflow import fit as C
from probflow.bench import recipes as R
from probflow.bench.heldout import TUNING_SEEDS, make_problem, rmse, setup
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.solvers import get_method

JUMP = 0.1
RULES = ("trim", "full", "max", "jump3", "jump5", "jump10", "jump30")


def _ref(model, xb, sch):
    ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    return integrate(model, xb, ends, "scipy_dop853", rtol=1e-10, atol=1e-10, options={"group": len(xb)}).x


def per_sample(model, xb, ref, grid, method) -> torch.Tensor:
    out = integrate(DDIMField(model), xb, grid, method).x
    return (out - ref).pow(2).mean(1).sqrt()


def study(seed: int, nfes, trust: float | None = None) -> list[dict]:
    p = make_problem(seed)
    s = setup(p, 32)
    sch, model = s.schedule, p.model
    sc = math.sqrt(1 + sch.sigma_max**2)
    x, xv, xf = (noise(k, (p.dim,), seed + o) * sc for k, o in ((32, 7), (256, 8), (256, 11)))
    ref, rv, rf = _ref(model, x, sch), _ref(model, xv, sch), _ref(model, xf, sch)
    rows = []
    for n in nfes:
        f = DDIMField(model)
        cands = C.candidate_grids(sch, get_method(C.FIT_METHODS[0]).steps_for_nfe(n))
        scores = {(m, g): C._solve_error(f, x, gr, m, ref, 1) for m in C.FIT_METHODS for g, gr in cands.items()}
        method, name = min(scores, key=lambda k: (scores[k], k))
        start = cands[name]
        fit = C.optimise_grid(f, x, ref, start, method, sigma_floor=sch.sigma_min, bins=12, max_evals=400,
                              drop_worst=1, trust=trust)[0]
        rm, rb = R.recipe_for(R.RECOMMENDED, n)
        row = {"seed": seed, "nfe": n, "start_name": f"{method}|{name}", "peer_chosen": peer_chosen(s, n)}
        for k, (g, m) in {"start": (start, method), "fit": (fit, method),
                          "rec": (rb(sch, get_method(rm).steps_for_nfe(n)), rm)}.items():
            row[k] = {"val": per_sample(model, xv, rv, g, m).tolist(),
                      "fresh": per_sample(model, xf, rf, g, m).tolist(),
                      "eval": rmse(integrate(DDIMField(model), s.xbar, g, m).x, s.reference) / row["peer_chosen"]}
        rows.append(row)
        print(f"{seed} NFE {n}: fit ÷ peer {row['fit']['eval']:.3f}, start ÷ peer {row['start']['eval']:.3f}",
              file=sys.stderr, flush=True)
    return rows


def _rms(v, drop: int = 0) -> float:
    v = np.sort(np.asarray(v) ** 2)
    return math.sqrt(v[: len(v) - drop].mean())


def kept(r: dict, rule: str, n_val: int) -> bool:
    a, b = np.asarray(r["start"]["val"][:n_val]), np.asarray(r["fit"]["val"][:n_val])
    if rule.startswith("jump"):
        return C._confirmed(torch.from_numpy(a**2), torch.from_numpy(b**2), 1, float(rule[4:]))
    trim, full = _rms(b, 1) < _rms(a, 1), _rms(b) < _rms(a)
    return {"trim": trim, "full": full, "max": trim and full and b.max() <= a.max()}[rule]


def rule_table(rows: list[dict]) -> str:
    lines = ["| NFE | validation | rule | fit kept | eval ÷ peer chosen: median / worst | fresh RMSE ÷ start's: geo. "
             "mean / worst | fresh RMSE ÷ README recipe's: worst | fresh jumps (every fit; start; README) |",
             "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["nfe"] for r in rows}):
        at = [r for r in rows if r["nfe"] == n]
        for n_val in (32, 256):
            for rule in RULES:
                ch = ["fit" if kept(r, rule, n_val) else "start" for r in at]
                ev = [r[c]["eval"] for r, c in zip(at, ch)]
                fs = [_rms(r[c]["fresh"]) / _rms(r["start"]["fresh"]) for r, c in zip(at, ch)]
                fr = [_rms(r[c]["fresh"]) / _rms(r["rec"]["fresh"]) for r, c in zip(at, ch)]
                jumps = [sum(v > JUMP for v in r[k]["fresh"]) for k in ("fit", "start", "rec") for r in at]
                j = [sum(jumps[i * len(at):(i + 1) * len(at)]) for i in range(3)]
                lines.append(f"| {n} | {n_val} | {rule} | {ch.count('fit')} of {len(at)} | {np.median(ev):.3f} / "
                             f"{max(ev):.3f} | {math.exp(np.mean(np.log(fs))):.3f} / {max(fs):.2f} | {max(fr):.2f} "
                             f"| {j[0]}; {j[1]}; {j[2]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfe", default="10,20")
    ap.add_argument("--seeds", default=f"{TUNING_SEEDS[0]}-{TUNING_SEEDS[-1]}")
    ap.add_argument("--trust", type=float, help="the fit's trust region (`optimise_grid`; default: none)")
    ap.add_argument("--out", help="JSON of the per-sample errors (read back with --table)")
    ap.add_argument("--table", nargs="*", help="only print the rule table of these JSON files")
    a = ap.parse_args(argv)
    if a.table is not None:
        print(rule_table([r for f in a.table for r in json.load(open(f))]))
        return 0
    if not a.out:
        ap.exit(2, "fit_design: --out: expected a JSON path\n")
    try:
        seeds = tuning_seeds(a.seeds)
    except ValueError as e:
        ap.exit(2, f"fit_design: --seeds: {e}\n")
    torch.set_num_threads(1)
    rows = [r for sd in seeds for r in study(sd, [int(v) for v in a.nfe.split(",")], a.trust)]
    with open(a.out, "w") as fh:
        json.dump(rows, fh)
    print(rule_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
