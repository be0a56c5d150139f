"""Samples that end in another mode: why a few-step solver can trail the best peer on a held-out problem.

At a small NFE a sample whose exact path passes near the boundary between two mixture components, in the σ range
where the components separate (σ ≈ 2 … 0.2 on the family of `probflow.bench.heldout`), can be tipped into the
other component by one step's truncation error; its final error is then 0.4–0.8 while the others' are ≲ 0.03.
`outlier_study` measures this on the TUNING problems only, on fresh noise (seed + 11: neither calibration,
validation nor evaluation noise), for `calibrate.calibrated_select` and every peer configuration;
`flip_summary` counts those samples, how many peer configurations send the same sample off too, and the blocks
of 8 samples (the benchmark's evaluation size) where ours is worse than the best peer chosen per block.

`python benchmarks/heldout_outliers.py --samples 192` prints the table.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from heldout_study import PEERS, say, steps_for

from probflow import calibrate as _calibrate
from probflow.bench import peers as _peers
from probflow.bench.heldout import REF_TOL, TUNING_SEEDS, family
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.schedules import linear

__all__ = ["outlier_study", "flip_summary", "main"]


def _fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.2f}"


def outlier_study(seeds=TUNING_SEEDS, nfe: int = 10, n: int = 192, flip: float = 0.1) -> list[dict]:
    """What makes a few samples end far off at `nfe` (tuning problems only): per problem, `calibrated_select` as in
    `calibrated_all`, every peer configuration and the chosen grid on `n` fresh samples (seed + 11, neither the
    calibration, validation nor evaluation noise). Rows {problem, err (ours, per sample), peers {config: per-sample
    error}, method}; a sample with error > `flip` (`flip_summary`) has gone to another mode."""
    rows = []
    sch = linear()
    for p in family(seeds):
        z = noise(n, (p.dim,), p.seed + 11)
        xb = z * math.sqrt(1.0 + sch.sigma_max**2)
        ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
        ref = integrate(p.model, xb, ends, "scipy_dop853", rtol=REF_TOL, atol=REF_TOL, options={"group": n}).x
        sel = _calibrate.calibrated_select(p.model, noise(16, (p.dim,), p.seed + 7), noise(16, (p.dim,), p.seed + 8),
                                           sch.sigma_max, 3.0 * sch.sigma_min, steps_for("unipc", nfe))
        per = (integrate(p.model, xb, sel.grid, sel.method).x - ref).pow(2).flatten(1).mean(1).sqrt()
        peers = {}
        for name in PEERS:
            for g in _peers.peer_grids(name):
                try:
                    r = _peers.run_peer(name, p.model, z, sch, _peers.steps_for_nfe(name, nfe), g)
                except (FloatingPointError, RuntimeError, ValueError):
                    continue
                if r.nfe <= nfe:
                    peers[(name, g)] = (r.x.double() - ref).pow(2).flatten(1).mean(1).sqrt()
        rows.append({"problem": p.seed, "method": sel.method, "err": per, "peers": peers, "flip": flip})
        say(f"  outliers {p.describe()}: {int((per > flip).sum())} of {n} samples beyond {flip}")
    return rows


def flip_summary(rows: list[dict], block: int = 8) -> str:
    """`outlier_study` as markdown: per problem, our samples beyond the flip threshold, how many peer configurations
    send the same sample off too, and blocks of `block` samples (the benchmark's evaluation size) where ours is
    worse than the best peer chosen per block (as the benchmark chooses it, per problem on its own samples)."""
    out = ["| problem | method | our samples off (peer configs also off, each) | best peer on all: its samples off "
           "| ratio on all | blocks > 1.0× | of them with one of our samples off | worst block |",
           "|---|---|---|---|---|---|---|---|"]
    tot = [0, 0, 0, 0, 0]
    for r in rows:
        e, f = r["err"], r["flip"]
        pk = torch.stack(list(r["peers"].values()))
        best = int(pk.pow(2).mean(1).argmin())
        off = (e > f).nonzero().flatten().tolist()
        also = ", ".join(f"{int((pk[:, i] > f).sum())}/{len(pk)}" for i in off) or "—"
        blocks = [(float(e[i:i + block].pow(2).mean().sqrt() / pk[:, i:i + block].pow(2).mean(1).min().sqrt()),
                   bool((e[i:i + block] > f).any())) for i in range(0, len(e) - block + 1, block)]
        bad = [b for b in blocks if b[0] > 1.0]
        ratio = float(e.pow(2).mean().sqrt() / pk[best].pow(2).mean().sqrt())
        out.append(f"| {r['problem']} | {r['method']} | {len(off)} ({also}) | {int((pk[best] > f).sum())} | "
                   f"{_fmt(ratio)} | {len(bad)}/{len(blocks)} | {sum(b[1] for b in bad)} | "
                   f"{_fmt(max(b[0] for b in blocks))} |")
        for k, v in enumerate((len(off), int((pk[best] > f).sum()), len(bad), sum(b[1] for b in bad), len(blocks))):
            tot[k] += v
    n = sum(len(r["err"]) for r in rows)
    out += ["", f"Total: ours {tot[0]}/{n} samples off, the best peer configuration (per problem) {tot[1]}/{n}; "
            f"{tot[2]}/{tot[4]} blocks of {block} worse than the per-block best peer, {tot[3]} of them containing "
            "one of our samples that went off."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/heldout_outliers.py", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=192, help="fresh samples per tuning problem, a multiple of 8")
    p.add_argument("--tuning", type=int, default=len(TUNING_SEEDS), help="first N tuning problems")
    a = p.parse_args(argv)
    if a.samples < 8 or a.samples % 8:
        p.exit(2, f"--samples: expected a positive multiple of 8 samples, got {a.samples}\n")
    if not 1 <= a.tuning <= len(TUNING_SEEDS):
        p.exit(2, f"--tuning: expected 1 … {len(TUNING_SEEDS)}, got {a.tuning}\n")
    torch.set_num_threads(1)
    print(flip_summary(outlier_study(TUNING_SEEDS[:a.tuning], n=a.samples)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
