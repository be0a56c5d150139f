"""Fair few-step table: probflow's methods and every peer on the same grid family, each side's configuration
chosen on the tuning problems by the same rule, judged on held-out problems (issue 26).

Grid family (the same for every solver, `grid_family`): DDIM trailing uniform and quadratic, and for ρ ∈ {3, 5, 7, ∞}
(∞: log-SNR uniform) × σ_min ∈ {σ_0, 0.03, 0.05, 0.1} the grid σ_max → σ_min with exponent ρ, then one last
step to σ = 0 (18 grids, family "base"; σ_0 = 0.01 is the DDPM table's smallest σ); family "tpow": the power-in-t
grids `probflow.grids.t_power` with q ∈ {2, 2.5, 3} × σ_min ∈ {σ_0, 0.02, 0.03, 0.05, 0.1}, then one step to 0 (15).

Sides.  probflow: `dpmpp_2m`, `dpmpp_3m`, `unipc`, `unipc_3` (probflow.integrate).  Peers: k-diffusion's
DPM++(2M), DPM++(3M) (eta = 0), LMS (order 4), Heun, DPM++(2S) (eta = 0) (`probflow.bench.kdiffusion`) and
diffusers' DPM-Solver++(3M) and UniPC (orders 2 and 3) on every grid of the family (`peers.run_peer(sigmas=…)`),
and with `--native` diffusers' Euler, Heun and LMS on their own grids (`peers.peer_grids`).

Choice (the same rule for both sides): per NFE, the configuration (solver, grid) with the smallest MAXIMUM over
the tuning problems of log(error / the best error of any configuration of either side on that problem) (minimax
regret: a configuration that is far behind on one tuning problem is not chosen; the previous rule, the median,
is shown beside it). "chosen" = that configuration on each held-out problem; "oracle" = the side's best
configuration per held-out problem. Error = RMSE of x_0 against DOP853 at rtol = atol = 1e-10
(`probflow.bench.heldout.setup`).

Problems. Tuning: `heldout.TUNING_SEEDS`; held-out: `heldout.HELDOUT_SEEDS` and the "outside" mixtures
(`outside_problem`: D ∈ {16, 64, 256}, rotated anisotropic and diagonal, K = 8; never used for a choice).

Calibrated row (`--fit`, opt-in per model): `probflow.fit.fit_recipe` per held-out problem and NFE: on 32
calibration samples of the model's own noise (seed + 7), unipc/unipc_3 × the start grids
`fit.candidate_grids` (power-in-t and log-SNR, ends σ_0 … 0.1), the best then warped by Nelder–Mead (end
point and step density on 12 bins, ≤ 400 solves), kept only if better on 32 validation samples (seed + 8,
`--fit-val`; with `--fit-jump J`, opt-in, also no validation sample sent into another component by the fitted grid
alone, `fit_recipe`'s `jump`); then on that grid UniPC's per-interval factors on the higher-order parts of its
predictor and corrector (`probflow.coefficients`: Adam on the calibration batch, `--fit-coef-iters` solves, default
200, with the model's backward pass; 0: the grid alone), kept by the same validation rule; judged on the evaluation
noise (seed + 1). Its cost in model calls is reported, with the calls of the factors' fit (each also a backward
pass), and the fitted grid alone beside it. Adaptive study (`--adaptive N`):
`adaptive_exp` against k-diffusion's `dpm_adaptive` at equal error, ending at σ_0 and at σ = 0, and torchdiffeq's
adaptive methods' error ÷ tolerance.

Run: `python benchmarks/fair_fewstep.py --out benchmarks/FAIR.md [--tuning N --heldout N --outside N --samples S
--fit --adaptive N]` (per-problem results cached under --cache, so that a run resumes; a cached problem that lacks a
method of PF_METHODS, K_PEERS or D_CUSTOM gets that method's rows computed and added, and rows of methods not
among them are left out of the report; `--only` computes one phase;
`--only fit --fit-nfe 10,20,50` the calibrated recipe against FAIR.md's chosen peer configuration without the sweep).
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

from probflow import fit as C
from probflow import grids as G
from probflow.bench import kdiffusion as kd
from probflow.bench import peers as P
from probflow.bench import recipes as R
from probflow.bench.heldout import (
    DESIGN_SEEDS,
    HELDOUT_SEEDS,
    TUNING_SEEDS,
    Problem,
    make_problem,
    mixture,
    rmse,
    setup,
)
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the held-out study beside this script
from heldout_study import steps_for  # noqa: E402

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
    model = mixture(g, kind, w, mu, std)
    return Problem(seed, kind, dim, k, float(std.min()), float(std.max()), model)


def problem_by_seed(seed: int) -> Problem:
    """The problem of `seed`: one of the OUTSIDE mixtures, else the family's (`heldout.make_problem`)."""
    out = {o[0]: o for o in OUTSIDE}
    return outside_problem(*out[seed]) if seed in out else make_problem(seed)


def tuning_seeds(text: str) -> list[int]:
    """Seeds from "100-104" or "100,103", tuning or design seeds only (`heldout.TUNING_SEEDS`, `DESIGN_SEEDS`: the
    design scripts never look at held-out problems); ValueError naming what was expected otherwise."""
    lo, _, hi = text.partition("-")
    try:
        seeds = list(range(int(lo), int(hi) + 1)) if hi else [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"expected e.g. 100-104 or 100,103, got {text!r}") from None
    if not seeds or not set(seeds) <= set(TUNING_SEEDS) | set(DESIGN_SEEDS):
        raise ValueError("expected tuning seeds only (heldout.TUNING_SEEDS, DESIGN_SEEDS)")
    return seeds


def _end(schedule, end) -> float:
    return schedule.sigma_min if end == "s0" else float(end)


def grid_name(rho: float, end) -> str:
    return f"{'logsnr' if math.isinf(rho) else f'karras{rho:g}'}/{end}"


T_POWERS = (2.0, 2.5, 3.0)
T_ENDS = ("s0", 0.02, 0.03, 0.05, 0.1)


def grid_family(schedule, steps: int, family: str = "base") -> dict[str, torch.Tensor]:
    """Every grid of the family with `steps` steps (the last into σ = 0); "tpow": the power-in-t grids
    (`probflow.grids.t_power`, q ∈ T_POWERS × σ_min ∈ T_ENDS)."""
    if family == "tpow":
        return {f"t^{q:g}/{e if e == 's0' else f'{e:g}'}": G.t_power(schedule, steps, q, _end(schedule, e))
                for q in T_POWERS for e in T_ENDS}
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


def run_problem(s, nfe=NFE, native: bool = False, family: str = "base", only: set[str] | None = None) -> dict:
    """{"pf": {"method|grid|nfe": rmse}, "peer": {...}} on one problem (`only`: just these methods, named as in
    the keys: "unipc_4", "k_lms", "d_unipc_4")."""
    sch, model, pf, pe = s.schedule, s.problem.model, {}, {}

    def want(name: str) -> bool:
        return only is None or name in only

    fam_cache: dict[int, dict] = {}

    def fam(n):
        return fam_cache.setdefault(n, grid_family(sch, n, family))

    for n in nfe:
        for m in filter(want, PF_METHODS):
            for g, sig in fam(steps_for(m, n)).items():
                sol = _try(integrate, DDIMField(model), s.xbar, sig, m)
                if sol is not None and sol.nfe <= n and torch.isfinite(sol.x).all():
                    pf[f"{m}|{g}|{n}"] = rmse(sol.x, s.reference)
        for m in filter(want, K_PEERS):
            for g, sig in fam(kd.steps_for_nfe(m, n)).items():
                r = _try(kd.run_kpeer, m, model, s.z, sig)
                if r is not None and r.nfe <= n:
                    pe[f"{m}|{g}|{n}"] = rmse(r.x, s.reference)
        for m in (m for m in D_CUSTOM if want(f"d_{m}")):
            for g, sig in fam(n).items():
                r = _try(P.run_peer, m, model, s.z, sch, n, sigmas=sig)
                if r is not None and r.nfe <= n:
                    pe[f"d_{m}|{g}|{n}"] = rmse(r.x, s.reference)
        for m in D_NATIVE if native and family == "base" and only is None else ():
            for g in P.peer_grids(m):
                r = _try(P.run_peer, m, model, s.z, sch, P.steps_for_nfe(m, n), g)
                if r is not None and r.nfe <= n:
                    pe[f"d_{m}|native_{g}|{n}"] = rmse(r.x, s.reference)
    return {"pf": pf, "peer": pe}


# ------------------------------------------------------------------------------------------------ calibrated

CAL_SAMPLES = 32  # calibration batch of `fit_recipe` (noise seed seed + 7)
VAL_SAMPLES = 32  # validation batch (seed + 8); --fit-val


def fit_run(s, nfe=NFE, n_cal: int = CAL_SAMPLES, n_val: int = VAL_SAMPLES, **fit_kw) -> dict:
    """Per NFE: `probflow.fit.fit_recipe` (keywords `fit_kw`) on the model's own calibration noise (seed + 7)
    and validation noise (seed + 8), never the evaluation noise (seed + 1), then evaluated on the problem's
    evaluation noise. Records the method, start grid, RMSE and the model calls spent (the two references once per
    model, then per NFE)."""
    p, sch, out = s.problem, s.schedule, {}
    field = DDIMField(p.model)
    x, xv = noise(n_cal, (p.dim,), p.seed + 7), noise(n_val, (p.dim,), p.seed + 8)
    ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    scale = math.sqrt(1.0 + sch.sigma_max**2)
    refs = tuple(integrate(field, b * scale, ends, "scipy_dop853", rtol=1e-10, atol=1e-10,
                           options={"group": len(b)}).x for b in (x, xv))
    ref_calls = field.nfe
    for n in nfe:
        t0 = time.perf_counter()
        f = C.fit_recipe(p.model, x, xv, sch, n, references=refs, **fit_kw)
        xe = integrate(DDIMField(p.model), s.xbar, f.grid, f.method, state=f.state).x
        xg = xe if f.scales is None else integrate(DDIMField(p.model), s.xbar, f.grid, f.method).x
        out[str(n)] = {"method": f.method, "start": f.start, "rmse": rmse(xe, s.reference), "ref_calls": ref_calls,
                       "fit_calls": f.calls, "kept": f.kept, "grid": f.grid.tolist(),
                       "rmse_grid": rmse(xg, s.reference), "scales": f.scales, "backward": f.backward,
                       "seconds": time.perf_counter() - t0}
    return out


def peer_chosen(s, n: int) -> float:
    """RMSE on the problem's evaluation noise of the peers' configuration chosen on the tuning problems in
    benchmarks/FAIR.md (`recipes.FAIR_CHOSEN["peer"]`, the nearest NFE's entry for an NFE it does not list)."""
    from probflow.bench.fair import _peer_steps

    name, builder = R.recipe_for(R.FAIR_CHOSEN["peer"], n)
    lib, peer = R.peer_library(name)
    steps = _peer_steps(name, n)
    sig = builder(s.schedule, steps)
    r = (kd.run_kpeer(peer, s.problem.model, s.z, sig) if lib == "kdiffusion"
         else P.run_peer(peer, s.problem.model, s.z, s.schedule, steps, sigmas=sig))
    return rmse(r.x, s.reference)


def fit_only_table(held_p: list[Problem], fits: list[dict], peers: list[dict], nfe) -> str:
    """`--only fit`: the fitted recipe ÷ FAIR.md's chosen peer configuration (`peer_chosen`) per held-out problem."""
    lines = ["| NFE | peer configuration (FAIR.md) | fitted ÷ peer chosen: median / worst "
             "| fitted grid alone ÷ peer chosen: median / worst | worst problem "
             "| fitted grid kept | factors kept | fit model calls, median (of them with a backward pass) "
             "| fit seconds (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for n in nfe:
        rc = [f[str(n)]["rmse"] / q[str(n)] for f, q in zip(fits, peers)]
        rg = [f[str(n)].get("rmse_grid", f[str(n)]["rmse"]) / q[str(n)] for f, q in zip(fits, peers)]
        w = int(np.argmax(rc))
        m, g = R.recipe_for(R.FAIR_CHOSEN["peer"], n)
        lines.append(f"| {n} | {_cell(m + '|' + g.__name__)} | {_mw(rc)} | {_mw(rg)} "
                     f"| {held_p[w].describe()}: {fits[w][str(n)]['rmse']:.1e} vs {peers[w][str(n)]:.1e} "
                     f"| {sum(f[str(n)]['kept'] for f in fits)} of {len(fits)} "
                     f"| {sum(f[str(n)].get('scales') is not None for f in fits)} of {len(fits)} "
                     f"| {np.median([f[str(n)]['fit_calls'] for f in fits]):.0f} "
                     f"({np.median([f[str(n)].get('backward', 0) for f in fits]):.0f}) "
                     f"| {np.median([f[str(n)].get('seconds', math.nan) for f in fits]):.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ adaptive

ADAPTIVE_TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
TORCHDIFFEQ = ("dopri5", "bosh3", "fehlberg2", "adaptive_heun")


def adaptive_run(s) -> dict:
    """adaptive_exp and k-diffusion's dpm_adaptive at ADAPTIVE_TOLS (rtol = atol), ending at σ_0 and at σ = 0
    (dpm_adaptive: to σ_0, then its samplers' last step x_0 = D(x̄, σ_0)); torchdiffeq's adaptive methods to
    σ = 0. RMSE of x̄ against DOP853 at 1e-10 (at σ_0: its own reference), model calls."""
    p, sch = s.problem, s.schedule
    s0 = sch.sigma_min
    to_s0 = torch.tensor([sch.sigma_max, s0], dtype=torch.float64)
    ref0 = integrate(p.model, s.xbar, to_s0, "scipy_dop853", rtol=1e-10, atol=1e-10,
                     options={"group": s.xbar.shape[0]}).x
    out: dict = {"adaptive_exp": [], "dpm_adaptive": [], "torchdiffeq": []}
    full = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    for tol in ADAPTIVE_TOLS:
        f0, f1 = DDIMField(p.model), DDIMField(p.model)
        a0 = integrate(f0, s.xbar, to_s0, "adaptive_exp", rtol=tol, atol=tol)
        a1 = integrate(f1, s.xbar, full, "adaptive_exp", rtol=tol, atol=tol)
        out["adaptive_exp"].append({"tol": tol, "err_s0": rmse(a0.x, ref0), "nfe_s0": a0.nfe,
                                    "err_0": rmse(a1.x, s.reference), "nfe_0": a1.nfe})
        k0 = kd.run_dpm_adaptive(p.model, s.z, sch.sigma_max, s0, tol, tol)
        k1 = kd.run_dpm_adaptive(p.model, s.z, sch.sigma_max, s0, tol, tol, to_zero=True)
        out["dpm_adaptive"].append({"tol": tol, "err_s0": rmse(k0.x * math.sqrt(1 + s0**2), ref0), "nfe_s0": k0.nfe,
                                    "err_0": rmse(k1.x, s.reference), "nfe_0": k1.nfe})
        for m in TORCHDIFFEQ if tol in (1e-3, 1e-4) else ():
            sol = _try(integrate, p.model, s.xbar, full, m, rtol=tol, atol=tol)
            if sol is not None:
                out["torchdiffeq"].append({"method": m, "tol": tol, "err_0": rmse(sol.x, s.reference), "nfe": sol.nfe})
    return out


def _nfe_at(curve: list[tuple[float, float]], err: float) -> float:
    """NFE at `err` on a (err, nfe) curve by log-log interpolation (inf outside its range)."""
    pts = sorted(curve)
    for (e0, n0), (e1, n1) in zip(pts, pts[1:]):
        if e0 <= err <= e1 and e1 > e0:
            w = math.log(err / e0) / math.log(e1 / e0)
            return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
    return math.inf


def adaptive_table(runs: list[dict], names: list[str]) -> str:
    lines = ["| problem | end | tol | dpm_adaptive: RMSE, calls | adaptive_exp: calls at that RMSE (ratio) |",
             "|---|---|---|---|---|"]
    for r, name in zip(runs, names):
        for end in ("s0", "0"):
            curve = [(x[f"err_{end}"], x[f"nfe_{end}"]) for x in r["adaptive_exp"]]
            for k in r["dpm_adaptive"]:
                n = _nfe_at(curve, k[f"err_{end}"])
                ratio = f"{n:.0f} ({n / k[f'nfe_{end}']:.2f})" if math.isfinite(n) else "outside its range"
                lines.append(f"| {name} | {'σ_0' if end == 's0' else 'σ = 0'} | {k['tol']:g} | "
                             f"{k[f'err_{end}']:.1e}, {k[f'nfe_{end}']} | {ratio} |")
    lines += ["", "adaptive_exp itself (RMSE / calls at σ = 0):", "",
              "| problem | " + " | ".join(f"tol {t:g}" for t in ADAPTIVE_TOLS) + " |",
              "|---|" + "---|" * len(ADAPTIVE_TOLS)]
    for r, name in zip(runs, names):
        lines.append(f"| {name} | " + " | ".join(f"{x['err_0']:.1e} / {x['nfe_0']}" for x in r["adaptive_exp"]) + " |")
    lines += ["", "torchdiffeq's adaptive methods (σ_max → 0, probflow.integrate's default log σ split): "
              "RMSE ÷ tolerance, calls:", "", "| problem | method | tol | RMSE | RMSE ÷ tol | calls |",
              "|---|---|---|---|---|---|"]
    for r, name in zip(runs, names):
        for t in r["torchdiffeq"]:
            lines.append(f"| {name} | {t['method']} | {t['tol']:g} | {t['err_0']:.1e} | {t['err_0'] / t['tol']:.1f} "
                         f"| {t['nfe']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ choice


def _at(table: dict, n: int) -> dict[str, float]:
    return {k.rsplit("|", 1)[0]: v for k, v in table.items() if k.endswith(f"|{n}") and math.isfinite(v)}


def best_any(r: dict, n: int) -> float:
    return min(list(_at(r["pf"], n).values()) + list(_at(r["peer"], n).values()))


RULES = ("max", "median")


def choose(tuning: list[dict], n: int, side: str, rule: str = "max") -> str:
    """The configuration of `side` with the smallest max (rule "max": minimax regret) or median (rule "median") over
    tuning problems of log(error / best of any configuration of either side on that problem)."""
    keys = set.intersection(*[set(_at(r[side], n)) for r in tuning])
    ref = [best_any(r, n) for r in tuning]
    agg = {"max": max, "median": lambda v: float(np.median(v))}[rule]

    def score(k):
        return agg([math.log(_at(r[side], n)[k] / b) for r, b in zip(tuning, ref)])

    return min(sorted(keys), key=score)


def fit_table(held: list[dict], fits: list[dict], tuning: list[dict], nfe=NFE) -> str:
    """The fitted recipe (`fit_run`) ÷ the peer's configuration chosen on tuning, and ÷ the peer's oracle."""
    lines = ["| NFE | fitted ÷ peer chosen: median / worst | fitted ÷ peer oracle: median / worst "
             "| fitted grid alone ÷ peer chosen: median / worst "
             f"| model calls on batches of {CAL_SAMPLES}: references (once per model) + fit (of which with a backward "
             "pass) | fitted grid kept (validation) | factors kept (validation) | start grids |",
             "|---|---|---|---|---|---|---|---|"]
    for n in nfe:
        cq = choose(tuning, n, "peer")
        pr = [q[str(n)] for q in fits]
        rc = [x["rmse"] / _at(r["peer"], n).get(cq, math.inf) for x, r in zip(pr, held)]
        ro = [x["rmse"] / min(_at(r["peer"], n).values()) for x, r in zip(pr, held)]
        rg = [x.get("rmse_grid", x["rmse"]) / _at(r["peer"], n).get(cq, math.inf) for x, r in zip(pr, held)]
        cost = (f"{np.median([x['ref_calls'] for x in pr]):.0f} + {np.median([x['fit_calls'] for x in pr]):.0f} "
                f"({np.median([x.get('backward', 0) for x in pr]):.0f}) (medians)")
        starts = sorted({f"{x['method']}|{x['start']}" for x in pr})
        lines.append(f"| {n} | {np.median(rc):.2f} / {max(rc):.2f} | {np.median(ro):.2f} / {max(ro):.2f} "
                     f"| {np.median(rg):.2f} / {max(rg):.2f} | {cost} | {sum(x['kept'] for x in pr)} of {len(pr)} "
                     f"| {sum(x.get('scales') is not None for x in pr)} of {len(pr)} "
                     f"| {', '.join(map(_cell, starts))} |")
    return "\n".join(lines)


def _readme(n: int) -> str | None:
    """The README's recommended configuration at `n` (`recipes.RECOMMENDED`; `recipes.recipe_for`: the nearest
    NFE's entry for an NFE the table does not list, as the README says) as a key of the family, if it is one."""
    m, g = R.recipe_for(R.RECOMMENDED, n)
    return f"{m}|{g.__name__}"


def _ratios(held: list[dict], n: int, cp: str, cq: str) -> list[float]:
    return [_at(r["pf"], n).get(cp, math.inf) / _at(r["peer"], n).get(cq, math.inf) for r in held]


def _mw(v: list[float]) -> str:
    return f"{np.median(v):.2f} / {max(v):.2f}"


def _cell(key: str) -> str:
    """A configuration "method|grid" in a markdown table cell (its pipe escaped, as GFM tables need)."""
    return f"`{key}`".replace("|", "\\|")


def table(tuning: list[dict], held: list[dict], names: list[str], nfe=NFE) -> tuple[str, dict]:
    lines = ["| NFE | probflow chosen | peer chosen | chosen ÷ chosen: median / worst "
             "| pf chosen ÷ peer oracle: median / worst | oracle ÷ oracle: median / worst "
             "| README's recipe ÷ peer chosen: median / worst | median rule: chosen ÷ chosen (pf; peer) "
             "| worst problem (chosen÷chosen) |", "|---|---|---|---|---|---|---|---|---|"]
    data = {}
    for n in nfe:
        cp, cq = choose(tuning, n, "pf"), choose(tuning, n, "peer")
        rc = _ratios(held, n, cp, cq)
        ro = [_at(r["pf"], n).get(cp, math.inf) / min(_at(r["peer"], n).values()) for r in held]
        oo = [min(_at(r["pf"], n).values()) / min(_at(r["peer"], n).values()) for r in held]
        rk = _readme(n)
        readme = _mw(_ratios(held, n, rk, cq)) if rk and all(rk in _at(r["pf"], n) for r in held) else "—"
        mp, mq = choose(tuning, n, "pf", "median"), choose(tuning, n, "peer", "median")
        w = int(np.argmax(rc))
        wr = held[w]
        lines.append(f"| {n} | {_cell(cp)} | {_cell(cq)} | {_mw(rc)} | {_mw(ro)} | {_mw(oo)} | {readme} "
                     f"| {_mw(_ratios(held, n, mp, mq))} ({_cell(mp)}; {_cell(mq)}) | {names[w]}: "
                     f"{_at(wr['pf'], n).get(cp, math.inf):.1e} vs {_at(wr['peer'], n).get(cq, math.inf):.1e} |")
        data[n] = {"pf": cp, "peer": cq, "chosen": rc, "vs_oracle": ro, "oracle": oo}
    return "\n".join(lines), data


# ------------------------------------------------------------------------------------------------ command


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write(f: Path, out) -> None:
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, f)


def _cached(cache: Path, key: str, fn):
    f = cache / f"{key}.json"
    if f.exists():
        return json.loads(f.read_text())
    out = fn()
    _write(f, out)
    return out


def all_methods() -> list[str]:
    """Every method of a problem's rows, named as in its keys (probflow's, k-diffusion's, diffusers' `d_*`)."""
    return list(PF_METHODS) + list(K_PEERS) + [f"d_{m}" for m in D_CUSTOM]


def _methods_in(r: dict) -> set[str]:
    """The methods a cached problem result was computed for (`methods`, else those with a row)."""
    return set(r.get("methods") or {k.split("|")[0] for side in ("pf", "peer") for k in r[side]})


_SETUPS: dict[tuple[int, int], object] = {}


def _setup(p: Problem, samples: int):
    """`heldout.setup` once per problem and sample count in a run (its DOP853 reference is the costliest solve of a
    problem; the families, the fit and the adaptive study share it)."""
    key = (p.seed, samples)
    if key not in _SETUPS:
        _SETUPS[key] = setup(p, samples)
    return _SETUPS[key]


def _problem_run(p: Problem, samples: int, nfe, native: bool, family: str = "base",
                 only: set[str] | None = None) -> dict:
    t0 = time.perf_counter()
    s = _setup(p, samples)
    r = run_problem(s, nfe, native, family, only)
    r["ref_check"], r["seconds"] = s.ref_check, time.perf_counter() - t0
    r["methods"] = sorted(only if only is not None else all_methods())
    _say(f"  {p.describe()} [{family}]{'' if only is None else ' ' + ','.join(sorted(only))}: "
         f"{r['seconds']:.0f} s (ref check {s.ref_check:.1e})")
    return r


def _results(cache: Path, p: Problem, a, nfe) -> dict:
    """The problem's results over the grid families of --families (each cached on its own), merged."""
    out: dict = {"pf": {}, "peer": {}}
    for fam in a.families.split(","):
        key = f"p{p.seed}" + ("" if fam == "base" else f"_{fam}")
        r = _cached(cache, key, lambda fam=fam: _problem_run(p, a.samples, nfe, a.native, fam))
        missing = set(all_methods()) - _methods_in(r)
        if missing:  # a method added since this problem was cached: compute its rows only
            add = _problem_run(p, a.samples, nfe, a.native, fam, missing)
            r["pf"].update(add["pf"])
            r["peer"].update(add["peer"])
            r["methods"] = sorted(_methods_in(r) | missing)
            _write(cache / f"{key}.json", r)
        keep = set(all_methods())  # the configured pool only (a cache may hold more)
        out["pf"].update({k: v for k, v in r["pf"].items() if k.split("|")[0] in keep})
        out["peer"].update({k: v for k, v in r["peer"].items() if k.split("|")[0] in keep})
    return out


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
    ap.add_argument("--fit", action="store_true", help="also the calibrated recipe (`fit.fit_recipe`) per "
                    "held-out problem")
    ap.add_argument("--adaptive", type=int, default=0, help="adaptive study on the first N held-out problems")
    ap.add_argument("--families", default="base,tpow", help="grid families (base: DDIM/Karras/log-SNR; tpow)")
    ap.add_argument("--fit-nfe", help="NFEs of the calibrated recipe (default: --nfe)")
    ap.add_argument("--fit-val", type=int, default=VAL_SAMPLES, help="validation samples of the fit (seed + 8)")
    ap.add_argument("--fit-trust", type=float, help="fit_recipe's trust region (default: none)")
    ap.add_argument("--fit-jump", type=float, default=0.0, help="fit_recipe's jump (≤ 0: off, the default)")
    ap.add_argument("--fit-coef-iters", type=int, default=200,
                    help="fit_recipe's coef_iters: UniPC's fitted per-interval factors (0: the grid alone)")
    ap.add_argument("--only", choices=("tuning", "heldout", "extras", "fit"),
                    help="compute and cache one phase, no report (fit: the calibrated recipe on the held-out problems "
                    "÷ FAIR.md's chosen peer configuration, printed, without the grid sweep)")
    a = ap.parse_args(argv)
    try:
        nfe = tuple(int(v) for v in a.nfe.split(","))
    except ValueError:
        ap.exit(2, f"fair_fewstep: --nfe: expected comma-separated integers, got {a.nfe!r}\n")
    if a.fit_coef_iters < 0:
        ap.exit(2, f"fair_fewstep: --fit-coef-iters: expected a non-negative integer, got {a.fit_coef_iters}\n")
    if min(a.samples, a.tuning) < 1 or min(a.heldout, a.outside) < 0 or min(nfe) < 1:
        ap.exit(2, "fair_fewstep: --samples, --tuning, --heldout, --nfe: expected positive integers\n")
    if a.out and Path(a.out).exists() and not a.force:
        ap.exit(2, f"fair_fewstep: --out: {a.out} exists (use --force)\n")
    if not (kd.available() and P.available()):
        ap.exit(2, "fair_fewstep: k-diffusion and diffusers are needed (make installs both)\n")
    torch.set_num_threads(1)
    cache = Path(a.cache) / f"s{a.samples}_n{'-'.join(map(str, nfe))}{'_native' if a.native else ''}"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.only in ("heldout", "extras", "fit"):
        a.tuning = 0
    tun = [_results(cache, make_problem(s), a, nfe) for s in TUNING_SEEDS[:a.tuning]]
    if a.only == "tuning":
        return 0
    held_p = [outside_problem(*o) for o in OUTSIDE[:a.outside]] + [make_problem(s) for s in HELDOUT_SEEDS[:a.heldout]]
    held = [] if a.only in ("extras", "fit") else [_results(cache, p, a, nfe) for p in held_p]
    fit_nfe = tuple(int(v) for v in a.fit_nfe.split(",")) if a.fit_nfe else nfe
    fit_kw = {"trust": a.fit_trust, "jump": None if a.fit_jump <= 0 else a.fit_jump, "coef_iters": a.fit_coef_iters}
    fit_key = (f"fit_p{{}}_v{a.fit_val}_t{a.fit_trust}_j{fit_kw['jump']}_c{a.fit_coef_iters}"
               + ("" if fit_nfe == nfe else "_n" + "-".join(map(str, fit_nfe))))
    fits = ([_cached(cache, fit_key.format(p.seed), lambda p=p: fit_run(_setup(p, a.samples), fit_nfe,
                                                                        n_val=a.fit_val, **fit_kw)) for p in held_p]
            if a.fit or a.only == "fit" else None)
    if a.only == "fit":
        peers = [_cached(cache, "peer_chosen_p{}_n{}".format(p.seed, "-".join(map(str, fit_nfe))),
                         lambda p=p: {str(n): peer_chosen(_setup(p, a.samples), n) for n in fit_nfe}) for p in held_p]
        print(fit_only_table(held_p, fits, peers, fit_nfe))
        return 0
    ad = [_cached(cache, f"adaptive_p{p.seed}", lambda p=p: adaptive_run(_setup(p, a.samples)))
          for p in held_p[:a.adaptive]]
    if a.only:
        return 0
    md, data = table(tun, held, [p.describe() for p in held_p], nfe)
    if fits:
        md += ("\n\nCalibrated (opt-in, per model: `probflow.fit.fit_recipe` on the model's own noise, judged "
               "on the evaluation noise):\n\n" + fit_table(held, fits, tun, fit_nfe))
    if ad:
        md += "\n\n## Adaptive\n\n" + adaptive_table(ad, [p.describe() for p in held_p[:a.adaptive]])
    cmd = "python benchmarks/fair_fewstep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"# Fair few-step table\n\n`{cmd}`\n\n{len(tun)} tuning problems (seeds {TUNING_SEEDS[0]}…), {len(held)} "
            f"held-out ({a.heldout} of the family, seeds {HELDOUT_SEEDS[0]}…, + {min(a.outside, len(OUTSIDE))} "
            "outside: "
            f"{[o[1:] for o in OUTSIDE[:a.outside]]}), {a.samples} samples each, grid families {a.families}; "
            f"{time.perf_counter() - t0:.0f} s (cached phases not counted). Ratios are RMSE ÷ RMSE per held-out "
            "problem; < 1: probflow better.\n\n" + (__doc__ or "").split("\n\n", 1)[1].split("\nRun:")[0] + "\n\n")
    print(head + md)
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(head + md + "\n")
        os.replace(tmp, a.out)
    (cache / "table.json").write_text(json.dumps({str(k): v for k, v in data.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
