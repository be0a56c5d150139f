"""Design data for `probflow.calibrate.fit_recipe`'s guards against mode switches (issue 26), on the TUNING problems
only (`heldout.TUNING_SEEDS`): how often a fitted grid sends a sample into another mixture component on fresh noise,
and what each fit rule gives.

Per tuning problem and NFE: the fit's start (2 methods × `calibrate.candidate_grids` on 32 calibration samples,
seed + 7), then Nelder–Mead (`optimise_grid`) without and with the tail constraint (`tail` = 3: the three largest
per-sample calibration errors may not exceed the start's), then the validation rules (`calibrate._confirmed`)
on 32 or `--val` validation samples (seed + 8; the first 32 of the larger batch are the 32). Judged on
`--fresh` fresh samples (seed + 11, never seen by a fit) and on the problem's evaluation noise (seed + 1, 32
samples, FAIR.md's measure, ÷ the peer's configuration chosen on tuning, `recipes.FAIR_CHOSEN["peer"]`). A
"jump": a fresh sample whose RMS error per coordinate exceeds 0.1 (a switch of component; the largest error of
a sample that does not switch is ≤ 2e-2 on these problems).

Run: `python benchmarks/fit_design.py --nfe 10,20,50 --seeds 100-109 [--val 256 --fresh 256] --out FILE.json`
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from probflow import calibrate as C
from probflow.bench import kdiffusion as kd
from probflow.bench import peers as P
from probflow.bench import recipes as R
from probflow.bench.fair import _peer_steps
from probflow.bench.heldout import TUNING_SEEDS, make_problem, rmse, setup
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.solvers import get_method

JUMP = 0.1


def peer_chosen(s, n: int) -> float:
    """RMSE of the peer's configuration chosen on tuning (FAIR.md) on the problem's evaluation noise."""
    name, builder = R.recipe_for(R.FAIR_CHOSEN["peer"], n)
    lib, peer = R.peer_library(name)
    sig = builder(s.schedule, _peer_steps(name, n))
    model = s.problem.model
    r = kd.run_kpeer(peer, model, s.z, sig) if lib == "kdiffusion" else P.run_peer(
        peer, model, s.z, s.schedule, _peer_steps(name, n), sigmas=sig)
    return rmse(r.x, s.reference)


def _ref(model, xb, sch):
    ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    return integrate(model, xb, ends, "scipy_dop853", rtol=1e-10, atol=1e-10, options={"group": len(xb)}).x


def per_sample(model, xb, ref, grid, method) -> torch.Tensor:
    out = integrate(DDIMField(model), xb, grid, method).x
    return (out - ref).pow(2).mean(1).sqrt()


def _stats(per) -> dict:
    """Full and trimmed (worst left out) RMSE and the largest per-sample RMS error of sorted per-sample MSEs."""
    if per is None:
        return {"full": math.inf, "trim1": math.inf, "max": math.inf}
    return {"full": C._trimmed(per), "trim1": C._trimmed(per, 1), "max": float(per[-1].sqrt())}


def study(seed: int, nfes, n_val: int, n_fresh: int) -> list[dict]:
    p = make_problem(seed)
    s = setup(p, 32)
    sch, model = s.schedule, p.model
    sc = math.sqrt(1 + sch.sigma_max**2)
    x, xv = noise(32, (p.dim,), seed + 7) * sc, noise(n_val, (p.dim,), seed + 8) * sc
    xf = noise(n_fresh, (p.dim,), seed + 11) * sc
    ref, ref_v, ref_f = _ref(model, x, sch), _ref(model, xv, sch), _ref(model, xf, sch)
    rows = []
    for n in nfes:
        t0 = time.perf_counter()
        pc = peer_chosen(s, n)
        steps = R.recipe_for(R.RECOMMENDED, n)
        rec_m, rec_b = steps
        rec_grid = rec_b(sch, get_method(rec_m).steps_for_nfe(n))
        f = DDIMField(model)
        st = get_method(C.FIT_METHODS[0]).steps_for_nfe(n)
        cands = C.candidate_grids(sch, st)
        scores = {(m, g): C._solve_error(f, x, gr, m, ref, 1) for m in C.FIT_METHODS for g, gr in cands.items()}
        method, name = min(scores, key=lambda k: (scores[k], k))
        start = cands[name]
        fits = {t: C.optimise_grid(f, x, ref, start, method, sigma_floor=sch.sigma_min, bins=12, max_evals=400,
                                   drop_worst=1, tail=t)[0] for t in (0, 3)}
        grids = {"start": (start, method), "recommended": (rec_grid, rec_m)}
        val_stats = {}
        for t, g in fits.items():
            vs, vf = C._per_sample(f, xv, start, method, ref_v), C._per_sample(f, xv, g, method, ref_v)
            vs32, vf32 = C._per_sample(f, xv[:32], start, method, ref_v[:32]), C._per_sample(f, xv[:32], g, method,
                                                                                            ref_v[:32])
            grids[f"fit_tail{t}"] = (g, method)
            val_stats[t] = {nm: {"start": _stats(a), "fit": _stats(b)} for nm, (a, b) in
                            {"val32": (vs32, vf32), f"val{n_val}": (vs, vf)}.items()}
            for rule, (a, b, guard) in {"old32": (vs32, vf32, False), "guard32": (vs32, vf32, True),
                                        f"guard{n_val}": (vs, vf, True), f"old{n_val}": (vs, vf, False)}.items():
                grids[f"tail{t}_{rule}"] = (g if C._confirmed(a, b, 1, guard) else start, method)
        row = {"seed": seed, "nfe": n, "peer_chosen": pc, "start": f"{method}|{name}", "configs": {},
               "val": val_stats}
        for k, (g, m) in grids.items():
            e = per_sample(model, xf, ref_f, g, m)
            ev = rmse(integrate(DDIMField(model), s.xbar, g, m).x, s.reference)
            row["configs"][k] = {"eval_ratio": ev / pc, "fresh_rmse": float(e.pow(2).mean().sqrt()),
                                 "fresh_median": float(e.median()), "jumps": int((e > JUMP).sum()),
                                 "fresh_max": float(e.max()), "end": float(g[-2]), "fit": bool(g is not start)}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps({"seed": seed, "nfe": n, "s": round(row["seconds"]),
                          **{k: (round(v["eval_ratio"], 3), v["jumps"]) for k, v in row["configs"].items()}}),
              file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nfe", default="10,20,50")
    ap.add_argument("--seeds", default=f"{TUNING_SEEDS[0]}-{TUNING_SEEDS[-1]}")
    ap.add_argument("--val", type=int, default=256)
    ap.add_argument("--fresh", type=int, default=256)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    lo, _, hi = a.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    if not set(seeds) <= set(TUNING_SEEDS):
        ap.exit(2, "fit_design: --seeds: expected tuning seeds only (heldout.TUNING_SEEDS)\n")
    torch.set_num_threads(1)
    rows = [r for sd in seeds for r in study(sd, [int(v) for v in a.nfe.split(",")], a.val, a.fresh)]
    with open(a.out, "w") as fh:
        json.dump(rows, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
