"""The held-out study's computations: what is chosen on the tuning problems and evaluated on the held-out ones.

The family, its split and each problem's reference are `probflow.bench.heldout`. Here: probflow's methods on
the grids of `GRIDS` at NFE 5, 10, 20, 50, 100 and every diffusers scheduler of `PEERS` on every grid it supports
(`probflow.bench.peers.peer_grids`); the ratio of a problem at an NFE = probflow's error / the best peer's
error on that problem (best over peers and their grids, chosen per problem: an oracle for the peer). probflow's
entry is the configuration chosen per NFE on the tuning set ("chosen", the honest number) or its best per problem
("oracle"). Also: `pilot_select` (per model, one of a few method × grid-end candidates picked on the model's own
calibration noise), the calibrated grid (`calibrated_study`, `calibrated_all`: `probflow.calibrate` on the
model's calibration noise seed + 7, the method chosen on its validation noise seed + 8) and `tune` (the `tuned`
grid's (ρ, end) per method and NFE, fitted on the tuning problems).

Every NFE budget becomes steps by the one rule, `Method.steps_for_nfe`; a configuration whose counted NFE
exceeds its budget is dropped. The report and command are `heldout.py` beside this file.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from torch import Tensor

from probflow import calibrate as _calibrate
from probflow import grids as _grids
from probflow.bench import peers as _peers
from probflow.bench.heldout import Setup, make_problem, rmse, setup
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.schedules import Schedule
from probflow.solvers import get_method

NFE = (5, 10, 20, 50, 100)
METHODS = ("dpmpp_2m", "unipc", "unipc_3")
# diffusers peers compared (first-order Euler/DDIM never won a tuning problem at any NFE and are left out for time)
PEERS = ("dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3", "heun_d", "lms_d")

# The `tuned` grid: σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_end^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then 0,
# with σ_end = end·σ_0 of the table and ρ = inf meaning log-uniform; (ρ, end) per NFE fitted on TUNING_SEEDS
# by `tune` for each method (median over the tuning problems of log RMSE) — copied from the output of
# `python benchmarks/heldout.py --tune`.
# (tuning: 10 problems × 8 samples, 192 s)
TUNED: dict[tuple[str, int], tuple[float, float]] = {
    ('dpmpp_2m', 5): (math.inf, 8.0),
    ('dpmpp_2m', 10): (math.inf, 4.0),
    ('dpmpp_2m', 20): (math.inf, 2.0),
    ('dpmpp_2m', 50): (math.inf, 1.0),
    ('dpmpp_2m', 100): (math.inf, 1.0),
    ('unipc', 5): (math.inf, 8.0),
    ('unipc', 10): (math.inf, 2.0),
    ('unipc', 20): (math.inf, 2.0),
    ('unipc', 50): (math.inf, 1.0),
    ('unipc', 100): (math.inf, 1.0),
    ('unipc_3', 5): (math.inf, 8.0),
    ('unipc_3', 10): (math.inf, 8.0),
    ('unipc_3', 20): (math.inf, 2.0),
    ('unipc_3', 50): (math.inf, 1.0),
    ('unipc_3', 100): (12.0, 1.0),
}


# ------------------------------------------------------------------------------------------------ grids


def power_grid(schedule: Schedule, steps: int, rho: float, end: float) -> Tensor:
    """Karras-type grid with exponent ρ (ρ = inf: log-uniform) from σ_max to end·σ_0, then 0."""
    s_end = end * schedule.sigma_min
    if math.isinf(rho):
        return _grids.log_uniform(schedule.sigma_max, s_end, steps)
    return _grids.karras(schedule.sigma_max, s_end, steps, rho)


def tuned_grid(schedule: Schedule, steps: int, method: str, nfe: int) -> Tensor:
    """The `tuned` grid of `method` at `nfe` (its (ρ, end) from TUNED; log-SNR to 3σ_0 if untuned)."""
    if (method, nfe) not in TUNED:
        return _grids.log_snr_tuned(schedule, steps)
    rho, end = TUNED[(method, nfe)]
    return power_grid(schedule, steps, rho, end)


GRIDS = {  # (uniform-in-t and Karras grids never won a tuning problem at NFE ≥ 10 and are left out for time)
    "quadratic": lambda s, n: _grids.ddim(s, n, "quadratic"),
    "logsnr": lambda s, n: _grids.log_uniform(s.sigma_max, s.sigma_min, n),
    "log_snr_tuned": lambda s, n: _grids.log_snr_tuned(s, n),
    "tuned": None,  # per method and NFE: `tuned_grid`
}


# ------------------------------------------------------------------------------------------------ problems


def say(msg: str) -> None:
    """Progress, on stderr."""
    print(msg, file=sys.stderr, flush=True)


def make_setups(seeds, n_samples: int) -> list[Setup]:
    """The problems of `seeds` with their evaluation noise and reference (`probflow.bench.heldout.setup`)."""
    out = []
    for seed in seeds:
        t0 = time.perf_counter()
        out.append(setup(make_problem(int(seed)), n_samples))
        say(f"  reference {out[-1].problem.describe()}: {out[-1].ref_nfe} NFE, {time.perf_counter() - t0:.1f} s")
    return out


# ------------------------------------------------------------------------------------------------ running


def steps_for(method: str, nfe: int) -> int:
    """The registered method's steps for an NFE budget (`Method.steps_for_nfe`, the one rule)."""
    return get_method(method).steps_for_nfe(nfe)


def run_probflow(s: Setup, method: str, grid: str, nfe: int) -> tuple[float, int]:
    steps = steps_for(method, nfe)
    sig = tuned_grid(s.schedule, steps, method, nfe) if grid == "tuned" else GRIDS[grid](s.schedule, steps)
    sol = integrate(DDIMField(s.problem.model), s.xbar, sig, method)
    return rmse(sol.x, s.reference), sol.nfe


def run_peer(s: Setup, name: str, grid: str, nfe: int) -> tuple[float, int]:
    r = _peers.run_peer(name, s.problem.model, s.z, s.schedule, _peers.steps_for_nfe(name, nfe), grid)
    return rmse(r.x, s.reference), r.nfe


PILOT_METHODS = ("unipc", "unipc_3")
PILOT_ENDS = (1.0, 2.0, 4.0, 8.0)
PILOT_SAMPLES = 8


def pilot_select(model, schedule: Schedule, dim: int, seed: int, nfe: int, ref: Tensor | None = None,
                 methods=PILOT_METHODS, ends=PILOT_ENDS, n_cal: int = PILOT_SAMPLES) -> tuple[str, float, Tensor]:
    """A per-model choice among few candidates, made on the model's own calibration noise (never the noise
    it is evaluated on): `probflow.noise(n_cal, (dim,), seed + 7)`, reference `adaptive_exp` at 1e-7; the
    candidates are `methods` × log-SNR grids from σ_max to end·σ_0 (`ends`), then 0; the smallest RMSE wins.
    One knob of four values per method (not a free-form grid) so that it cannot fit the calibration noise.
    Returns (method, end, the reference, for reuse). Cost: the reference (≈ 400 NFE on n_cal samples) once
    per model, plus len(methods)·len(ends) solves of `nfe` NFE on n_cal samples per NFE."""
    z = noise(n_cal, (dim,), seed + 7)
    xb = z * math.sqrt(1.0 + schedule.sigma_max**2)
    if ref is None:
        ends_ = torch.tensor([schedule.sigma_max, 0.0], dtype=torch.float64)
        ref = integrate(model, xb, ends_, "adaptive_exp", rtol=1e-7, atol=1e-7).x
    best = None
    for m in methods:
        for end in ends:
            g = power_grid(schedule, steps_for(m, nfe), math.inf, end)
            err = rmse(integrate(model, xb, g, m).x, ref)
            if best is None or err < best[0]:
                best = (err, m, end)
    return best[1], best[2], ref


def run_pilot(s: Setup, nfe: int, ref: Tensor | None = None) -> tuple[float, str, Tensor]:
    """The pilot's choice for this problem at `nfe`, evaluated on the problem's own noise."""
    p = s.problem
    m, end, ref = pilot_select(p.model, s.schedule, p.dim, p.seed, nfe, ref)
    g = power_grid(s.schedule, steps_for(m, nfe), math.inf, end)
    return rmse(integrate(p.model, s.xbar, g, m).x, s.reference), f"{m}/end {end:g}", ref


def run_problem(s: Setup, nfe=NFE, methods=METHODS, grids=tuple(GRIDS), peers=None, pilot: bool = True) -> dict:
    """{"pf": {(method, grid, nfe): rmse}, "peer": {(name, grid, nfe): rmse}} for one problem; with `pilot`,
    also pf[("pilot", "pilot", nfe)] (`pilot_select`'s choice, recorded in "pilot_choice")."""
    peers = PEERS if peers is None else list(peers)
    pf, pe, picks, ref = {}, {}, {}, None
    for n in nfe:
        if pilot:
            pf[("pilot", "pilot", n)], picks[n], ref = run_pilot(s, n, ref)
        for m in methods:
            for g in grids:
                err, used = run_probflow(s, m, g, n)
                if used <= n:
                    pf[(m, g, n)] = err
        for name in peers:
            for g in _peers.peer_grids(name):
                try:
                    err, used = run_peer(s, name, g, n)
                except (FloatingPointError, RuntimeError, ValueError):
                    continue
                if used <= n:
                    pe[(name, g, n)] = err
    return {"pf": pf, "peer": pe, "pilot_choice": picks}


def best(table: dict, n: int) -> tuple[float, tuple]:
    cands = [(v, k) for k, v in table.items() if k[2] == n and math.isfinite(v)]
    return min(cands) if cands else (math.inf, ())


def choose(tuning: list[dict], n: int) -> tuple[str, str]:
    """The (method, grid) with the smallest median over tuning problems of log(error / best peer's error)."""
    keys = {k[:2] for r in tuning for k in r["pf"] if k[2] == n}
    best_peer = [best(r["peer"], n)[0] for r in tuning]

    def score(k):
        return float(np.median([math.log(r["pf"].get((*k, n), math.inf) / bp) for r, bp in zip(tuning, best_peer)]))

    return min(sorted(keys), key=score)


def ratios(results: list[dict], n: int, config: tuple[str, str] | None) -> list[float]:
    """Per problem: error of `config` (None: probflow's best on that problem) / the best peer's error."""
    out = []
    for r in results:
        mine = best(r["pf"], n)[0] if config is None else r["pf"].get((*config, n), math.inf)
        out.append(mine / best(r["peer"], n)[0])
    return out


# ------------------------------------------------------------------------------------------------ tuning


TUNE_RHOS = (3.0, 5.0, 7.0, 12.0, math.inf)
TUNE_ENDS = (1.0, 2.0, 4.0, 8.0)


def tune(setups: list[Setup], methods=METHODS, nfe=NFE) -> dict[tuple[str, int], tuple[float, float]]:
    """(ρ, end) per method and NFE minimising the median over the tuning problems of log RMSE."""
    out = {}
    for method, n in ((m, n) for m in methods for n in nfe):
        steps = steps_for(method, n)
        best = None
        for rho in TUNE_RHOS:
            for end in TUNE_ENDS:
                errs = []
                for s in setups:
                    sol = integrate(DDIMField(s.problem.model), s.xbar, power_grid(s.schedule, steps, rho, end), method)
                    errs.append(math.log(rmse(sol.x, s.reference)))
                score = float(np.median(errs))
                if best is None or score < best[0]:
                    best = (score, rho, end)
        out[(method, n)] = (best[1], best[2])
    return out


# ------------------------------------------------------------------------------------------------ calibrated grids


def calibrated_study(setups: list[Setup], nfe=(10, 20), method: str = "unipc_3", n_cal: int = 16,
                     max_evals: int = 100) -> list[dict]:
    """The calibrated grid (`probflow.calibrate.calibrated`, `n_cal` calibration samples drawn with seed + 7, its own
    reference, at most `max_evals` solves) against `log_snr_tuned` and `tuned`, per problem and NFE (RMSE)."""
    rows = []
    for s in setups:
        cal_z = noise(n_cal, (s.problem.dim,), s.problem.seed + 7)
        for n in nfe:
            steps = steps_for(method, n)
            g = _calibrate.calibrated(s.problem.model, cal_z, s.schedule.sigma_max, 3.0 * s.schedule.sigma_min, steps,
                                  method, max_evals=max_evals)
            row = {"problem": s.problem.seed, "nfe": n,
                   "calibrated": rmse(integrate(s.problem.model, s.xbar, g, method).x, s.reference)}
            for name in ("log_snr_tuned", "tuned"):
                row[name] = run_probflow(s, method, name, n)[0]
            rows.append(row)
    return rows


CALIBRATED_NFE = (10, 20, 50)
# the previous recipe's fixed method per NFE (from the tuning problems), reported beside the selection
CALIBRATED_FIXED = {10: "unipc", 20: "unipc_3", 50: "unipc_3"}


def calibrated_all(seeds, n_samples: int, nfe=CALIBRATED_NFE, methods=_calibrate.SELECT_METHODS, n_cal: int = 16,
                   n_val: int = 16, max_evals: int = 100) -> list[dict]:
    """Per problem and NFE: `probflow.calibrate.calibrated_select` (a grid calibrated for each of `methods` on
    `n_cal` samples of the model's own calibration noise, seed + 7; the method chosen on `n_val` validation
    samples, seed + 8; never the evaluation noise), evaluated like every other configuration. Rows {problem,
    nfe, method (the choice), rmse, cal_nfe (model calls spent calibrating and choosing, on batches of n_cal /
    n_val samples), val (validation RMSE per candidate), cand_rmse (evaluation RMSE per candidate, for the
    fixed-method comparison only)}."""
    rows = []
    for s in make_setups(seeds, n_samples):
        p = s.problem
        cal_z, val_z = noise(n_cal, (p.dim,), p.seed + 7), noise(n_val, (p.dim,), p.seed + 8)
        for n in nfe:
            f = DDIMField(p.model)
            steps = {steps_for(m, n) for m in methods}
            if len(steps) != 1:
                raise ValueError(f"methods: expected equal steps at NFE {n}, got {methods!r}")
            sel = _calibrate.calibrated_select(f, cal_z, val_z, s.schedule.sigma_max, 3.0 * s.schedule.sigma_min,
                                               steps.pop(), methods, max_evals=max_evals)
            cand = {m: rmse(integrate(p.model, s.xbar, g, m).x, s.reference) for m, g in sel.grids.items()}
            rows.append({"problem": p.seed, "nfe": n, "method": sel.method, "cal_nfe": f.nfe, "val": sel.val_rmse,
                         "rmse": cand[sel.method], "cand_rmse": cand})
        say(f"  calibrated {p.describe()}: {[(r['nfe'], r['method']) for r in rows[-len(nfe):]]}")
    return rows
