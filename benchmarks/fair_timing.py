"""Where the time of `benchmarks/fair_fewstep.py` goes, per problem: the reference (`heldout.setup`), and the grid
sweep (`run_problem`) split by side (probflow's methods, k-diffusion's samplers, diffusers' schedulers) and grid
family, at given sample counts and NFEs, so that a full run can be extrapolated (issue 26).

Run: `python benchmarks/fair_timing.py --seeds 100,9001 --samples 32,256 --nfe 10,50`  (prints one JSON line per
measurement; CPU seconds of this process, single-threaded torch: on a shared machine wall-clock seconds measure the
other jobs too)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fair_fewstep as F  # noqa: E402

from probflow.bench.heldout import setup  # noqa: E402

GROUPS = {"pf": ("PF_METHODS", F.PF_METHODS), "k": ("K_PEERS", F.K_PEERS), "d": ("D_CUSTOM", F.D_CUSTOM)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="100")
    ap.add_argument("--samples", default="32,256")
    ap.add_argument("--nfe", default="10,50")
    ap.add_argument("--families", default="base,tpow")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for seed in map(int, a.seeds.split(",")):
        p = F.problem_by_seed(seed)
        for n_s in map(int, a.samples.split(",")):
            t0 = time.process_time()
            s = setup(p, n_s)
            row = {"problem": p.describe(), "samples": n_s, "setup_s": round(time.process_time() - t0, 2),
                   "ref_nfe": s.ref_nfe}
            for n in map(int, a.nfe.split(",")):
                for fam in a.families.split(","):
                    for g, (_attr, val) in GROUPS.items():
                        saved = {k: getattr(F, v[0]) for k, v in GROUPS.items()}
                        for k, (at, _) in GROUPS.items():
                            setattr(F, at, val if k == g else ())
                        t0 = time.process_time()
                        r = F.run_problem(s, (n,), False, fam)
                        row[f"{g}_{fam}_n{n}"] = round(time.process_time() - t0, 2)
                        row[f"{g}_{fam}_n{n}_configs"] = len(r["pf"]) + len(r["peer"])
                        for k, (at, _) in GROUPS.items():
                            setattr(F, at, saved[k])
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
