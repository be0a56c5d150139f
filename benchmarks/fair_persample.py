"""Per-sample errors of a few configurations on one problem of benchmarks/FAIR.md: which samples decide its RMSE
(e.g. one sample ending in another mixture component).

Run: `python benchmarks/fair_persample.py --problem 9001 --samples 256 --nfe 20
--configs "unipc_3|t^2/0.02,unipc_3|t^2.5/s0"` (probflow's methods on FAIR.md's grids by name,
`recipes.family_grid`; the problem's own evaluation noise and DOP853 reference, `heldout.setup`). Prints, per
configuration, the RMSE, the median and the five largest per-sample RMS errors with their sample indices.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_fewstep as F  # noqa: E402

from probflow.bench import recipes as R  # noqa: E402
from probflow.bench.heldout import setup  # noqa: E402
from probflow.field import DDIMField  # noqa: E402
from probflow.integrate import integrate  # noqa: E402
from probflow.solvers import get_method  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", type=int, default=9001, help="a seed of the family or of FAIR.md's outside problems")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--configs", default="unipc_3|t^2/0.02,unipc_3|t^2.5/s0")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        p = F.problem_by_seed(a.problem)
    except ValueError as e:
        ap.exit(2, f"fair_persample: --problem: {e}\n")
    if a.samples < 1 or a.nfe < 1:
        ap.exit(2, "fair_persample: --samples, --nfe: expected positive integers\n")
    s = setup(p, a.samples)
    print(p.describe())
    for cfg in a.configs.split(","):
        try:
            m, g = cfg.split("|")
            grid = R.family_grid(g)(s.schedule, get_method(m).steps_for_nfe(a.nfe))
        except (ValueError, KeyError) as e:
            ap.exit(2, f"fair_persample: --configs: {cfg!r}: {e}\n")
        x = integrate(DDIMField(p.model), s.xbar, grid, m).x
        e = (x - s.reference).pow(2).flatten(1).mean(1).sqrt()
        v, i = e.sort(descending=True)
        worst = ", ".join(f"{float(a_):.2e} (sample {int(b)})" for a_, b in zip(v[:5], i[:5]))
        print(f"{cfg} at NFE {a.nfe}: RMSE {float(e.pow(2).mean().sqrt()):.2e}, median {float(e.median()):.1e}; "
              f"largest: {worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
