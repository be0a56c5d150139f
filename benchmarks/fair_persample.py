"""Per-sample errors of a few configurations on problems of benchmarks/FAIR.md: which samples decide a problem's
RMSE (e.g. one sample ending in another mixture component).

Run: `python benchmarks/fair_persample.py --problem 9001 --samples 256 --nfe 20
--configs "unipc_3|t^2/0.02,unipc_3|t^2.5/s0"` (probflow's methods on FAIR.md's grids by name,
`recipes.family_grid`; the problem's own evaluation noise and DOP853 reference, `heldout.setup`). Prints, per
configuration, the RMSE, the median, the number of samples that end in another mixture component than the
reference's, and the five largest per-sample RMS errors with their sample indices; over several problems
(`--problem 100-109`) and NFE (`--nfe 10,20,50`) also the number of such samples summed per configuration.

`--trace I` follows sample I along each configuration's grid instead: at every grid point its RMS error against
the exact trajectory (DOP853 at 1e-11 between the grid points) and, for a Gaussian mixture, the two largest
component posteriors p(k | x̄, σ) of the exact state and the solver's at those k and its own largest
(the mixtures' `posterior`): where a sample is sent into another component, and at which σ.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_fewstep as F  # noqa: E402

from probflow.bench import recipes as R  # noqa: E402
from probflow.bench.heldout import noise, setup  # noqa: E402
from probflow.field import DDIMField  # noqa: E402
from probflow.integrate import integrate  # noqa: E402
from probflow.schedules import linear  # noqa: E402
from probflow.solvers import get_method  # noqa: E402


def _ints(text: str) -> list[int]:
    """"9001", "100-109" or "100,105" -> the integers; ValueError otherwise."""
    lo, _, hi = text.partition("-")
    vals = list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in text.split(",")]
    if not vals:
        raise ValueError("empty")
    return vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", default="9001",
                    help="seeds of the family or of FAIR.md's outside problems: 9001, 100-109 or 100,105")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--nfe", default="20", help="NFE, or several: 10,20,50")
    ap.add_argument("--configs", default="unipc_3|t^2/0.02,unipc_3|t^2.5/s0")
    ap.add_argument("--trace", type=int, default=None, help="follow this sample along each grid (its index)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        problems = [F.problem_by_seed(seed) for seed in _ints(a.problem)]
    except ValueError as e:
        ap.exit(2, f"fair_persample: --problem: expected seeds such as 9001, 100-109 or 100,105 ({e})\n")
    try:  # a list, not a range: each NFE is a full run
        nfes = [int(n) for n in a.nfe.split(",")]
    except ValueError:
        nfes = []
    if a.samples < 1 or not nfes or min(nfes) < 1:
        ap.exit(2, "fair_persample: --samples, --nfe: expected positive integers (--nfe e.g. 20 or 10,20,50)\n")
    if a.trace is not None and not 0 <= a.trace < a.samples:
        ap.exit(2, f"fair_persample: --trace: expected a sample index in [0, {a.samples}), got {a.trace}\n")
    configs = []
    for cfg in a.configs.split(","):
        try:
            m, g = cfg.split("|")
            configs.append((cfg, m, R.family_grid(g)))
            get_method(m)
        except (ValueError, KeyError) as e:
            ap.exit(2, f"fair_persample: --configs: {cfg!r}: {e}\n")
    switched: dict[tuple[int, str], list[int]] = {}
    for p in problems:
        print(p.describe())
        if a.trace is not None:
            for nfe in nfes:
                for cfg, m, builder in configs:
                    trace(p, a.samples, a.trace, cfg, m, builder(linear(), get_method(m).steps_for_nfe(nfe)))
            continue
        s = setup(p, a.samples)
        ref_k = p.model.posterior(s.reference, 0.0).argmax(1)  # each sample's component at σ = 0
        for nfe in nfes:
            for cfg, m, builder in configs:
                n = _report(p, s, ref_k, cfg, m, builder(s.schedule, get_method(m).steps_for_nfe(nfe)), nfe)
                switched.setdefault((nfe, cfg), []).append(n)
    if len(problems) > 1 and switched:
        print("samples ending in another component than the reference's, summed over the problems (problems with any):")
        for (nfe, cfg), ns in switched.items():
            print(f"  NFE {nfe} {cfg}: {sum(ns)} ({sum(n > 0 for n in ns)} of {len(ns)})")
    return 0


def _report(p, s, ref_k: torch.Tensor, cfg: str, method: str, grid: torch.Tensor, nfe: int) -> int:
    """One configuration's per-sample errors on setup `s`; returns the number of samples that end in another mixture
    component than the reference's (`ref_k`: largest posterior at σ = 0)."""
    x = integrate(DDIMField(p.model), s.xbar, grid, method).x
    e = (x - s.reference).pow(2).flatten(1).mean(1).sqrt()
    v, i = e.sort(descending=True)
    worst = ", ".join(f"{float(a_):.2e} (sample {int(b)})" for a_, b in zip(v[:5], i[:5]))
    n = int((p.model.posterior(x, 0.0).argmax(1) != ref_k).sum())
    print(f"{cfg} at NFE {nfe}: RMSE {float(e.pow(2).mean().sqrt()):.2e}, median {float(e.median()):.1e}; "
          f"in another component: {n}; largest: {worst}")
    return n


def trace(p, n_samples: int, index: int, cfg: str, method: str, grid: torch.Tensor) -> None:
    """Sample `index` of the problem's evaluation noise along `grid`: its error against the exact trajectory at each
    grid point and, for a mixture, the two largest component posteriors (exact | solver)."""
    sch = linear()
    xb = noise(n_samples, (p.dim,), p.seed + 1)[index:index + 1] * math.sqrt(1.0 + sch.sigma_max**2)
    exact = integrate(p.model, xb, grid, "scipy_dop853", rtol=1e-11, atol=1e-11, trajectory=True).trajectory
    path = integrate(DDIMField(p.model), xb, grid, method, trajectory=True).trajectory
    print(f"{cfg}, sample {index}:")
    for s_, xe, xs in zip(grid.tolist(), exact, path):
        line = f"  σ {s_:9.4f}  error {float((xs - xe).pow(2).mean().sqrt()):.2e}"
        if hasattr(p.model, "posterior"):
            pe, ps = (p.model.posterior(x, s_)[0] for x in (xe, xs))
            top = pe.argsort(descending=True)[:2].tolist()
            line += (f"  p(k) exact {', '.join(f'{k}: {float(pe[k]):.3f}' for k in top)}"
                     f" | solver {', '.join(f'{k}: {float(ps[k]):.3f}' for k in top)}"
                     f" (its largest {int(ps.argmax())}: {float(ps.max()):.3f})")
        print(line)


if __name__ == "__main__":
    sys.exit(main())
