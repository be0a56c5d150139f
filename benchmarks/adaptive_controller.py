"""`adaptive_exp`'s step-size controller, measured against k-diffusion's `dpm_adaptive` at equal error on the fair
study's tuning problems (issue 26, item 4; benchmarks/DESIGN.md, `adaptive_exp`):

    python benchmarks/adaptive_controller.py [--seeds 100-109] [--samples 256] [--variants base,safety0.8,...]

The PI controller h_new = h·s·err^{−0.7/k}·err_prev^{0.4/k} (probflow/adaptive.py) settles where err_n = err_{n−1}
= s^{k/0.3}: at the safety factor s = 0.9 and k = 4, err ≈ 0.25, close enough to 1 for steps to be rejected (each
rejection costs a call). The variants change one setting of the module (or the options) for the whole run.

Per problem, `adaptive_exp` at rtol = atol ∈ 1e-1 … 3e-6 (its RMSE-vs-calls curve, ending at σ_0 and at σ = 0)
and `dpm_adaptive` at 1e-2 … 1e-5 (as `fair_fewstep.adaptive_run`); `adaptive_exp`'s calls at `dpm_adaptive`'s RMSE
by log-log interpolation (`fair_fewstep._nfe_at`) ÷ `dpm_adaptive`'s calls; printed: the geometric mean and the
largest ratio over the problems per tolerance of `dpm_adaptive`. Tuning problems only.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
from fair_fewstep import _nfe_at, problem_by_seed, tuning_seeds

from probflow import adaptive as A
from probflow.bench import kdiffusion as kd
from probflow.bench.heldout import rmse, setup
from probflow.field import DDIMField
from probflow.integrate import integrate

K_TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
A_TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6)
VARIANTS = {  # name: (options, module settings)
    "base": ({}, {}),
    "safety0.85": ({}, {"_SAFETY": 0.85}),
    "safety0.8": ({}, {"_SAFETY": 0.8}),
    "safety0.7": ({}, {"_SAFETY": 0.7}),
    "hairer_pi": ({}, {"_ALPHA": 0.88, "_BETA": 0.16}),  # Hairer–Wanner's β = 0.04·k, α = 1 − 0.75β·k
    "max_ratio2": ({}, {"_MAX_RATIO": 2.0}),
    "order4": ({"order": 4}, {}),
    "first_step1": ({"first_step": 1.0}, {}),
    "jump0.3": ({}, {"_JUMP_SAFETY": 0.3}),
}


def _peer(p, s) -> tuple[list[dict], torch.Tensor]:
    """dpm_adaptive's (RMSE, calls) at K_TOLS, both ends, and the DOP853 reference at σ_0."""
    sch = s.schedule
    ends = torch.tensor([sch.sigma_max, sch.sigma_min], dtype=torch.float64)
    ref0 = integrate(p.model, s.xbar, ends, "scipy_dop853", rtol=1e-10, atol=1e-10,
                     options={"group": s.xbar.shape[0]}).x
    out = []
    for tol in K_TOLS:
        k0 = kd.run_dpm_adaptive(p.model, s.z, sch.sigma_max, sch.sigma_min, tol, tol)
        k1 = kd.run_dpm_adaptive(p.model, s.z, sch.sigma_max, sch.sigma_min, tol, tol, to_zero=True)
        out.append({"s0": (rmse(k0.x * math.sqrt(1 + sch.sigma_min**2), ref0), k0.nfe),
                    "0": (rmse(k1.x, s.reference), k1.nfe)})
    return out, ref0


def _curve(p, s, ref0, options: dict) -> dict[str, list[tuple[float, float]]]:
    sch = s.schedule
    out: dict[str, list] = {"s0": [], "0": []}
    for tol in A_TOLS:
        for end, to, ref in (("s0", sch.sigma_min, ref0), ("0", 0.0, s.reference)):
            sol = integrate(DDIMField(p.model), s.xbar, torch.tensor([sch.sigma_max, to], dtype=torch.float64),
                            "adaptive_exp", rtol=tol, atol=tol, options=options)
            out[end].append((rmse(sol.x, ref), sol.nfe))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="100-109", help="tuning problems (default 100-109)")
    ap.add_argument("--samples", type=int, default=256, help="samples per problem (default 256, as FAIR.md)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    a = ap.parse_args(argv)
    names = a.variants.split(",")
    if not set(names) <= set(VARIANTS):
        ap.error(f"--variants: expected names from {', '.join(VARIANTS)}, got {a.variants!r}")
    torch.set_num_threads(1)
    ratios: dict[str, dict[str, list]] = {n: {"s0": [], "0": []} for n in names}
    for seed in tuning_seeds(a.seeds):
        p = problem_by_seed(seed)
        s = setup(p, a.samples)
        peer, ref0 = _peer(p, s)
        for name in names:
            options, settings = VARIANTS[name]
            saved = {k: getattr(A, k) for k in settings}
            for k, v in settings.items():
                setattr(A, k, v)
            try:
                curve = _curve(p, s, ref0, options)
            finally:
                for k, v in saved.items():
                    setattr(A, k, v)
            for end in ("s0", "0"):
                ratios[name][end].append([_nfe_at(curve[end], k[end][0]) / k[end][1] for k in peer])
    print("| variant | end | " + " | ".join(f"tol {t:g}: gm (max)" for t in K_TOLS) + " |\n|---|---|"
          + "---|" * len(K_TOLS))
    for name in names:
        for end in ("s0", "0"):
            r = np.array(ratios[name][end], dtype=float)
            r[~np.isfinite(r)] = np.nan
            cells = [f"{math.exp(np.nanmean(np.log(c))):.2f} ({np.nanmax(c):.2f})" for c in r.T]
            print(f"| {name} | {'σ_0' if end == 's0' else 'σ = 0'} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
