"""Fair few-step table: probflow's methods and every peer on the same grid family, each side's configuration
chosen on the tuning problems by the same rule, judged on held-out problems (issue 26).

Grid family (the same for every solver, `grid_family`): DDIM trailing uniform and quadratic, and for ρ ∈ {3, 5, 7, ∞}
(∞: log-SNR uniform) × σ_min ∈ {σ_0, 0.03, 0.05, 0.1} the grid σ_max → σ_min with exponent ρ, then one last
step to σ = 0 (18 grids; σ_0 = 0.01 is the DDPM table's smallest σ).

Sides.  probflow: `dpmpp_2m`, `dpmpp_3m`, `unipc`, `unipc_3` (probflow.integrate).  Peers: k-diffusion's
DPM++(2M), DPM++(3M) (eta = 0), LMS (order 4), Heun, DPM++(2S) (eta = 0) (`probflow.bench.kdiffusion`) and
diffusers' DPM-Solver++(3M) and UniPC (orders 2 and 3) on every grid of the family (`peers.run_peer(sigmas=…)`),
and with `--native` diffusers' Euler, Heun and LMS on their own grids (`peers.peer_grids`).

Choice (the same rule for both sides): per NFE, the configuration (solver, grid) with the smallest median over
the TUNING problems of log(error / the best error of any configuration of either side on that problem).
"chosen" = that configuration on each held-out problem; "oracle" = the side's best configuration per held-out
problem. Error = RMSE of x_0 against DOP853 at rtol = atol = 1e-10 (`probflow.bench.heldout.setup`).

Problems. Tuning: `heldout.TUNING_SEEDS`; held-out: `heldout.HELDOUT_SEEDS` and the "outside" mixtures
(`outside_problem`: D ∈ {16, 64, 256}, rotated anisotropic and diagonal, K = 8; never used for a choice).

Run: `python benchmarks/fair_fewstep.py --out benchmarks/FAIR.md [--tuning N --heldout N --samples S]`
(per-problem results cached under --cache, so that a run resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from probflow import grids as G
from probflow.bench import kdiffusion as kd
from probflow.bench import peers as P
from probflow.bench.heldout import (
    HELDOUT_SEEDS,
    TUNING_SEEDS,
    DiagonalMixture,
    Problem,
    make_problem,
    rmse,
    setup,
    steps_for,
)
from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.models import GaussianMixture

NFE = (5, 10, 20, 50, 100)
RHOS = (3.0, 5.0, 7.0, math.inf)
ENDS = ("s0", 0.03, 0.05, 0.1)
PF_METHODS = ("dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3")
K_PEERS = ("k_dpmpp_2m", "k_dpmpp_3m", "k_lms", "k_heun", "k_dpmpp_2s")
OUTSIDE = ((9001, 256, "rotated"), (9003, 64, "rotated"), (9002, 256, "diagonal"), (9004, 16, "rotated"))
# diffusers schedulers run on every grid of the family; DPM-Solver++(2M) is left out because it equals k-diffusion's
# DPM++(2M) on the same grid to diffusers' float32 floor (tests/test_kdiffusion.py)
D_CUSTOM = ("dpmpp_3m", "unipc", "unipc_3")
# diffusers schedulers on their own grids (`--native`); on the x-variable ones these grids are in the family already
D_NATIVE = ("euler_d", "heun_d", "lms_d")


def outside_problem(seed: int, dim: int, kind: str, k: int = 8) -> Problem:
    """A mixture outside the family's ranges: K components, dimension `dim`, the family's other distributions."""
    g = np.random.default_rng(seed)
    s_min = math.exp(g.uniform(math.log(0.02), math.log(0.2)))
    s_max = s_min * g.uniform(3.0, 10.0)
    w = g.uniform(0.5, 1.5, k)
    mu = np.clip(0.6 * g.standard_normal((k, dim)), -1, 1)
    std = np.exp(g.uniform(math.log(s_min), math.log(s_max), (k, dim)))
    if kind == "rotated":
        q, r = np.linalg.qr(g.standard_normal((k, dim, dim)))
        q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
        cov = q @ (std[:, :, None] ** 2 * np.swapaxes(q, 1, 2))
        model = GaussianMixture(torch.from_numpy(w), torch.from_numpy(mu),
                                torch.from_numpy(0.5 * (cov + np.swapaxes(cov, 1, 2))))
    else:
        model = DiagonalMixture(torch.from_numpy(w), torch.from_numpy(mu), torch.from_numpy(std**2))
    return Problem(seed, kind, dim, k, float(std.min()), float(std.max()), model)


def _end(schedule, end) -> float:
    return schedule.sigma_min if end == "s0" else float(end)


def grid_name(rho: float, end) -> str:
    return f"{'logsnr' if math.isinf(rho) else f'karras{rho:g}'}/{end}"


def grid_family(schedule, steps: int) -> dict[str, torch.Tensor]:
    """Every grid of the family with `steps` steps (the last into σ = 0)."""
    out = {"uniform": G.ddim(schedule, steps, "uniform"), "quadratic": G.ddim(schedule, steps, "quadratic")}
    for rho in RHOS:
        for end in ENDS:
            lo = _end(schedule, end)
            out[grid_name(rho, end)] = (G.log_uniform(schedule.sigma_max, lo, steps) if math.isinf(rho)
                                        else G.karras(schedule.sigma_max, lo, steps, rho))
    return out


def _try(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except (FloatingPointError, RuntimeError, ValueError):
        return None


def run_problem(s, nfe=NFE, native: bool = False) -> dict:
    """{"pf": {"method|grid|nfe": rmse}, "peer": {...}} on one problem."""
    sch, model, pf, pe = s.schedule, s.problem.model, {}, {}
    fam_cache: dict[int, dict] = {}

    def fam(n):
        return fam_cache.setdefault(n, grid_family(sch, n))

    for n in nfe:
        for m in PF_METHODS:
            for g, sig in fam(steps_for(m, n)).items():
                sol = _try(integrate, DDIMField(model), s.xbar, sig, m)
                if sol is not None and sol.nfe <= n and torch.isfinite(sol.x).all():
                    pf[f"{m}|{g}|{n}"] = rmse(sol.x, s.reference)
        for m in K_PEERS:
            for g, sig in fam(kd.steps_for_nfe(m, n)).items():
                r = _try(kd.run_kpeer, m, model, s.z, sig)
                if r is not None and r.nfe <= n:
                    pe[f"{m}|{g}|{n}"] = rmse(r.x, s.reference)
        for m in D_CUSTOM:
            for g, sig in fam(n).items():
                r = _try(P.run_peer, m, model, s.z, sch, n, sigmas=sig)
                if r is not None and r.nfe <= n:
                    pe[f"d_{m}|{g}|{n}"] = rmse(r.x, s.reference)
        for m in D_NATIVE if native else ():
            for g in P.peer_grids(m):
                r = _try(P.run_peer, m, model, s.z, sch, P.steps_for_nfe(m, n), g)
                if r is not None and r.nfe <= n:
                    pe[f"d_{m}|native_{g}|{n}"] = rmse(r.x, s.reference)
    return {"pf": pf, "peer": pe}


# ------------------------------------------------------------------------------------------------ choice


def _at(table: dict, n: int) -> dict[str, float]:
    return {k.rsplit("|", 1)[0]: v for k, v in table.items() if k.endswith(f"|{n}") and math.isfinite(v)}


def best_any(r: dict, n: int) -> float:
    return min(list(_at(r["pf"], n).values()) + list(_at(r["peer"], n).values()))


def choose(tuning: list[dict], n: int, side: str) -> str:
    """The configuration of `side` with the smallest median over tuning problems of log(error / best of any)."""
    keys = set.intersection(*[set(_at(r[side], n)) for r in tuning])
    ref = [best_any(r, n) for r in tuning]

    def score(k):
        return float(np.median([math.log(_at(r[side], n)[k] / b) for r, b in zip(tuning, ref)]))

    return min(sorted(keys), key=score)


def table(tuning: list[dict], held: list[dict], names: list[str], nfe=NFE) -> tuple[str, dict]:
    lines = ["| NFE | probflow chosen | peer chosen | chosen ÷ chosen: median / worst "
             "| pf chosen ÷ peer oracle: median / worst | oracle ÷ oracle: median / worst "
             "| worst problem (chosen÷chosen) |",
             "|---|---|---|---|---|---|---|"]
    data = {}
    for n in nfe:
        cp, cq = choose(tuning, n, "pf"), choose(tuning, n, "peer")
        rc = [_at(r["pf"], n).get(cp, math.inf) / _at(r["peer"], n).get(cq, math.inf) for r in held]
        ro = [_at(r["pf"], n).get(cp, math.inf) / min(_at(r["peer"], n).values()) for r in held]
        oo = [min(_at(r["pf"], n).values()) / min(_at(r["peer"], n).values()) for r in held]
        w = int(np.argmax(rc))
        wr = held[w]
        lines.append(f"| {n} | `{cp}` | `{cq}` | {np.median(rc):.2f} / {max(rc):.2f} | {np.median(ro):.2f} / "
                     f"{max(ro):.2f} | {np.median(oo):.2f} / {max(oo):.2f} | {names[w]}: "
                     f"{_at(wr['pf'], n).get(cp, math.inf):.1e} vs {_at(wr['peer'], n).get(cq, math.inf):.1e} |")
        data[n] = {"pf": cp, "peer": cq, "chosen": rc, "vs_oracle": ro, "oracle": oo}
    return "\n".join(lines), data


# ------------------------------------------------------------------------------------------------ command


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cached(cache: Path, key: str, fn):
    f = cache / f"{key}.json"
    if f.exists():
        return json.loads(f.read_text())
    out = fn()
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, f)
    return out


def _problem_run(p: Problem, samples: int, nfe, native: bool) -> dict:
    t0 = time.perf_counter()
    s = setup(p, samples)
    r = run_problem(s, nfe, native)
    r["ref_check"], r["seconds"] = s.ref_check, time.perf_counter() - t0
    _say(f"  {p.describe()}: {r['seconds']:.0f} s (ref check {s.ref_check:.1e})")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="markdown report (written atomically; refuses to overwrite without --force)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tuning", type=int, default=len(TUNING_SEEDS))
    ap.add_argument("--heldout", type=int, default=len(HELDOUT_SEEDS))
    ap.add_argument("--outside", type=int, default=len(OUTSIDE))
    ap.add_argument("--nfe", default=",".join(map(str, NFE)))
    ap.add_argument("--cache", default="out/fair_cache")
    ap.add_argument("--native", action="store_true", help="also diffusers' Euler/Heun/LMS on their own grids")
    ap.add_argument("--only", choices=("tuning", "heldout"), help="compute (and cache) one phase only, no report")
    a = ap.parse_args(argv)
    try:
        nfe = tuple(int(v) for v in a.nfe.split(","))
    except ValueError:
        ap.exit(2, f"fair_fewstep: --nfe: expected comma-separated integers, got {a.nfe!r}\n")
    if min(a.samples, a.tuning, a.heldout) < 1 or a.outside < 0 or min(nfe) < 1:
        ap.exit(2, "fair_fewstep: --samples, --tuning, --heldout, --nfe: expected positive integers\n")
    if a.out and Path(a.out).exists() and not a.force:
        ap.exit(2, f"fair_fewstep: --out: {a.out} exists (use --force)\n")
    if not (kd.available() and P.available()):
        ap.exit(2, "fair_fewstep: k-diffusion and diffusers are needed (make installs both)\n")
    torch.set_num_threads(1)
    cache = Path(a.cache) / f"s{a.samples}_n{'-'.join(map(str, nfe))}{'_native' if a.native else ''}"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.only == "heldout":
        a.tuning = 0
    tun = [_cached(cache, f"p{s}", lambda s=s: _problem_run(make_problem(s), a.samples, nfe, a.native))
           for s in TUNING_SEEDS[:a.tuning]]
    if a.only == "tuning":
        return 0
    held_p = [outside_problem(*o) for o in OUTSIDE[:a.outside]] + [make_problem(s) for s in HELDOUT_SEEDS[:a.heldout]]
    held = [_cached(cache, f"p{p.seed}", lambda p=p: _problem_run(p, a.samples, nfe, a.native)) for p in held_p]
    if a.only:
        return 0
    md, data = table(tun, held, [p.describe() for p in held_p], nfe)
    head = (f"# Fair few-step table\n\n{len(tun)} tuning problems (seeds {TUNING_SEEDS[0]}…), {len(held)} held-out "
            f"({a.heldout} of the family + {min(a.outside, len(OUTSIDE))} outside), {a.samples} samples each; "
            f"{time.perf_counter() - t0:.0f} s (cached phases not counted).\n\n")
    print(head + md)
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(head + md + "\n")
        os.replace(tmp, a.out)
    (cache / "table.json").write_text(json.dumps({str(k): v for k, v in data.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
