"""How far a step-size controller can take `adaptive_exp` against k-diffusion's `dpm_adaptive` (issue 26, item 4).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/adaptive_bound.py [--seeds 100-104] [--samples 32]

On tuning problems of the held-out family (`probflow.bench.heldout`; never the reported ones), ending at σ = 0:

1. the bound: for each rtol = atol ∈ {1e-2, 1e-3} of `dpm_adaptive` (to σ_0, then x_0 = D(x̄, σ_0), as
   `fair_fewstep.adaptive_run` drives it), the model calls the *best* fixed grid needs for the same RMSE: `unipc_3`
   (probflow's best fixed-grid method at these NFE, benchmarks/FAIR.md) on every power-in-t grid
   `grids.t_power` (q ∈ {2, 2.5, 3} × σ_min ∈ {σ_0, 0.02, 0.03, 0.05, 0.1}) at 8, 10, … steps, log-log
   interpolated in NFE (`fair_fewstep._nfe_at`), the minimum over the 15 grids chosen on the evaluation noise
   itself (an oracle: no controller placing steps like these grids does better);
2. the controller: `adaptive_exp` as shipped and with the PI controller's constants and first step changed
   (module constants of `probflow.adaptive`, restored after each run), calls at dpm_adaptive's RMSE per tolerance.

Prints markdown. Measured numbers and their reading: the closing notes of issue 26.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fair_fewstep as F  # noqa: E402

import probflow.adaptive as A  # noqa: E402
from probflow import grids  # noqa: E402
from probflow.bench import kdiffusion as kd  # noqa: E402
from probflow.bench.heldout import make_problem, rmse, setup  # noqa: E402
from probflow.field import DDIMField  # noqa: E402
from probflow.integrate import integrate  # noqa: E402

TOLS = (1e-2, 1e-3)
CURVE_TOLS = (1e-1, 3e-2, 1e-2, 1e-3, 1e-4)  # adaptive_exp's own curve, wide enough to reach dpm's errors
VARIANTS = {  # name: (module constants, options)
    "as shipped": ({}, {}),
    "first step 0.3": ({}, {"first_step": 0.3}),
    "PI α=1, β=0.6, safety 0.8, first step 0.3": ({"_ALPHA": 1.0, "_BETA": 0.6, "_SAFETY": 0.8}, {"first_step": 0.3}),
    "PI α=1, β=0.4, safety 0.7, first step 0.3": ({"_ALPHA": 1.0, "_BETA": 0.4, "_SAFETY": 0.7}, {"first_step": 0.3}),
    "order 4": ({}, {"order": 4}),
}


def _fixed_bound(s, err: float) -> float:
    """Fewest model calls of unipc_3 on any power-in-t grid to reach RMSE `err` (inf if none does by 80)."""
    sch, best = s.schedule, math.inf
    for q in F.T_POWERS:  # FAIR.md's power-in-t family
        for smin in (F._end(sch, e) for e in F.T_ENDS):
            curve = []
            for n in range(8, 81, 2):
                sol = integrate(DDIMField(s.problem.model), s.xbar, grids.t_power(sch, n, q, smin), "unipc_3")
                curve.append((rmse(sol.x, s.reference), sol.nfe))
                if curve[-1][0] < err / 2:
                    break
            best = min(best, F._nfe_at(curve, err))
    return best


def _adaptive_calls(s, consts: dict, options: dict, err: float) -> float:
    saved = {k: getattr(A, k) for k in consts}
    try:
        for k, v in consts.items():
            setattr(A, k, v)
        full = torch.tensor([s.schedule.sigma_max, 0.0], dtype=torch.float64)
        curve = []
        for tol in CURVE_TOLS:
            sol = integrate(DDIMField(s.problem.model), s.xbar, full, "adaptive_exp", rtol=tol, atol=tol,
                            options=options, max_steps=5000)
            curve.append((rmse(sol.x, s.reference), sol.nfe))
        return F._nfe_at(curve, err)
    finally:
        for k, v in saved.items():
            setattr(A, k, v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="100-104", help="tuning seeds, e.g. 100-104 or 100,103")
    ap.add_argument("--samples", type=int, default=32)
    a = ap.parse_args(argv)
    try:
        seeds = F.tuning_seeds(a.seeds)
    except ValueError as e:
        ap.exit(2, f"adaptive_bound: --seeds: {e}\n")
    torch.set_num_threads(1)
    ratios: dict[str, list[float]] = {name: [] for name in ["fixed-grid oracle", *VARIANTS]}
    print("| problem | tol | dpm_adaptive: RMSE, calls | best fixed grid (unipc_3, oracle) | "
          + " | ".join(VARIANTS) + " |\n|---|---|---|---|" + "---|" * len(VARIANTS))
    for seed in seeds:
        p = make_problem(seed)
        s = setup(p, a.samples)
        sch = s.schedule
        for tol in TOLS:
            k = kd.run_dpm_adaptive(p.model, s.z, sch.sigma_max, sch.sigma_min, tol, tol, to_zero=True)
            err = rmse(k.x, s.reference)
            cells = [("fixed-grid oracle", _fixed_bound(s, err))]
            cells += [(name, _adaptive_calls(s, *VARIANTS[name], err)) for name in VARIANTS]
            for name, n in cells:
                ratios[name].append(n / k.nfe)
            print(f"| {p.describe()} | {tol:g} | {err:.1e}, {k.nfe} | "
                  + " | ".join(f"{n:.1f} ({n / k.nfe:.2f})" for _, n in cells) + " |", flush=True)
    print("\nRatio to dpm_adaptive's calls at its RMSE, median / worst over the rows:\n")
    for name, r in ratios.items():
        print(f"- {name}: {statistics.median(r):.2f} / {max(r):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
