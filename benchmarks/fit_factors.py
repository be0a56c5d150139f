"""What UniPC's fitted factors (`probflow.coefficients`) do per sample on benchmarks/FAIR.md's held-out problems: from
the fits that `fair_fewstep.py --fit` cached, each problem's evaluation noise solved on the fitted grid with and
without the factors; per problem the RMSE, the median per-sample RMS error and the largest, with ÷ without.

Run (after `python benchmarks/fair_fewstep.py ... --fit --only fit --cache DIR`): `python benchmarks/fit_factors.py
--cache DIR/s256_n5-10-20-50-100 --nfe 20,50`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fair_fewstep import OUTSIDE, outside_problem  # noqa: E402

from probflow.bench.heldout import HELDOUT_SEEDS, make_problem, setup  # noqa: E402
from probflow.coefficients import scales_state  # noqa: E402
from probflow.field import DDIMField  # noqa: E402
from probflow.integrate import integrate  # noqa: E402


def per_problem(p, fits: dict, nfes: list[str], samples: int) -> dict[str, tuple[float, float, float] | None]:
    """{nfe: (RMSE, median, largest per-sample error), each with ÷ without the factors; None without factors}."""
    s, out = setup(p, samples), {}
    for n in nfes:
        f = fits[n]
        if f.get("scales") is None:
            out[n] = None
            continue
        grid = torch.tensor(f["grid"], dtype=torch.float64)
        e = []
        for state in (None, scales_state(f["scales"], grid)):
            x = integrate(DDIMField(p.model), s.xbar, grid, f["method"], state=state).x
            e.append((x - s.reference).pow(2).flatten(1).mean(1))
        out[n] = (float(e[1].mean().sqrt() / e[0].mean().sqrt()), float((e[1].median() / e[0].median()).sqrt()),
                  float((e[1].max() / e[0].max()).sqrt()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="fair_fewstep's cache folder holding fit_p*.json")
    ap.add_argument("--nfe", default="20,50")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=10, help="held-out family problems, as fair_fewstep's --heldout")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    nfes = a.nfe.split(",")
    probs = [outside_problem(*o) for o in OUTSIDE] + [make_problem(s) for s in HELDOUT_SEEDS[:a.heldout]]
    rows = {n: [] for n in nfes}
    for p in probs:
        files = sorted(Path(a.cache).glob(f"fit_p{p.seed}_*.json"))
        if len(files) != 1:
            ap.exit(2, f"fit_factors: --cache: expected one fit_p{p.seed}_*.json in {a.cache}, found {len(files)}\n")
        fits = json.loads(files[0].read_text())
        if any(n not in fits for n in nfes):
            ap.exit(2, f"fit_factors: --nfe: {files[0].name} holds NFE {', '.join(fits)}, not all of {a.nfe}\n")
        for n, r in per_problem(p, fits, nfes, a.samples).items():
            print(f"NFE {n} {p.describe()}: " + ("no factors kept" if r is None else
                  "with ÷ without: RMSE {:.3g}, median sample {:.3g}, largest sample {:.3g}".format(*r)), flush=True)
            rows[n].append(r or (1.0, 1.0, 1.0))
    for n, r in rows.items():
        gm = math.exp(statistics.fmean(math.log(x[0]) for x in r))
        print(f"NFE {n}, {len(r)} problems, with ÷ without: RMSE median {statistics.median(x[0] for x in r):.3g} "
              f"(geometric mean {gm:.3g}, {min(x[0] for x in r):.3g}–{max(x[0] for x in r):.3g}); median sample "
              f"median {statistics.median(x[1] for x in r):.3g} ({min(x[1] for x in r):.3g}–"
              f"{max(x[1] for x in r):.3g}); largest sample median {statistics.median(x[2] for x in r):.3g} "
              f"({min(x[2] for x in r):.3g}–{max(x[2] for x in r):.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
