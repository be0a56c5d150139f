"""Adaptive solving, measured: tolerance proportionality and error vs NFE beside DPM-Solver's adaptive recipe.

`dpm_solver_adaptive` is an independent implementation, written here from the paper and not imported, of
DPM-Solver's adaptive step-size algorithm (Lu et al. 2022, "DPM-Solver", §3.4/Appendix, Algorithm
"DPM-Solver-12/23 (adaptive)"), in its own variables: the VP state x (the model's variable), α_t = 1/sqrt(1+σ²),
σ_t = σ/sqrt(1+σ²), λ = log(α_t/σ_t) = −log σ, noise prediction ε. With h = λ_t − λ_s:

    DPM-Solver-1:  x_t = (α_t/α_s) x_s − σ_t (e^h − 1) ε_s
    DPM-Solver-2 (r1):  u = (α_{s1}/α_s) x_s − σ_{s1}(e^{r1 h} − 1) ε_s,  λ_{s1} = λ_s + r1 h
                   x_t = (α_t/α_s) x_s − σ_t (e^h − 1) ε_s − σ_t/(2 r1) (e^h − 1) (ε(u, s1) − ε_s)
    DPM-Solver-3 (r1 = 1/3, r2 = 2/3):  u1 as u above, D1 = ε(u1, s1) − ε_s,
                   u2 = (α_{s2}/α_s) x_s − σ_{s2}(e^{r2 h} − 1) ε_s − σ_{s2} (r2/r1)((e^{r2 h} − 1)/(r2 h) − 1) D1,
                   D2 = ε(u2, s2) − ε_s,
                   x_t = (α_t/α_s) x_s − σ_t (e^h − 1) ε_s − (σ_t/r2)((e^h − 1)/h − 1) D2

Pairs: 12 = (DPM-Solver-1, DPM-Solver-2 with r1 = 1/2), 23 = (DPM-Solver-2 with r1 = 1/3, DPM-Solver-3), sharing
stages. Controller: from λ_T with h = 0.05; δ = max(atol, rtol·max(|x_lower|, |x_prev|)); E = max over samples
of RMS((x_higher − x_lower)/δ); accept if E ≤ 1 (x ← x_higher, x_prev ← x_lower); h ← min(0.9 h E^{−1/k},
λ_end − λ_s), k the higher order. It ends at σ_end = the table's σ_0 (t_0 = 1/N for a discrete model) and then,
as the recipe's `denoise_to_zero`, x_0 = (x − σ_t ε)/α_t at σ_end (one more NFE). One generosity: ε at the start of
a step is kept across rejections (counted once).

The study (`tolerance_study`, run by `python benchmarks/heldout.py`, reported in HELDOUT.md): on problems of the
held-out family (`probflow.bench.heldout`), for rtol = atol =
1e-2 … 1e-8: achieved RMSE of x_0 against DOP853 at 1e-12, NFE, for torchdiffeq's dopri5 in log σ (integrate's
default) and in σ, probflow's `adaptive_exp` (its default 3(4) pair, and the 4(5) pair `adaptive_exp_o4`),
and the recipe (pair 23; ending at σ_0 and at 1e-3), and DDIM
(Euler) at the same NFE on its best of two grids (trailing uniform, log-SNR uniform).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.grids import ddim, log_uniform
from probflow.integrate import integrate

__all__ = ["dpm_solver_adaptive", "TOLERANCES", "tolerance_study", "nfe_at_equal_error", "tolerance_tables"]

TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
SOLVERS = ("dopri5", "dopri5_sigma", "adaptive_exp", "adaptive_exp_o4", "dpm23", "dpm23_deep")


def _vp(sigma: float) -> tuple[float, float]:
    """(α_t, σ_t) of the VP form at the σ of Eq. 12."""
    a = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return a, sigma * a


def dpm_solver_adaptive(model, x: Tensor, sigma_max: float, sigma_end: float, rtol: float, atol: float,
                        order: int = 3, h_init: float = 0.05, theta: float = 0.9,
                        denoise_to_zero: bool = True) -> tuple[Tensor, int]:
    """DPM-Solver-12 (order 2) or -23 (order 3) adaptive from σ_max to σ_end (then x_0 by denoising);
    x: x_T in the model's variable. Returns (x_0 or x at σ_end, NFE)."""
    if order not in (2, 3):
        raise ValueError(f"order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23), got {order}")
    nfe = 0

    def eps(xx: Tensor, lam: float) -> Tensor:
        nonlocal nfe
        nfe += 1
        return model(xx, torch.tensor(math.exp(-lam), dtype=xx.dtype))

    def sig(lam: float) -> tuple[float, float]:
        return _vp(math.exp(-lam))

    lam_s, lam_end = -math.log(sigma_max), -math.log(sigma_end)
    h, x_prev, e_s = h_init, x, None
    while lam_s < lam_end - 1e-5:
        if e_s is None:
            e_s = eps(x, lam_s)
        lam_t = lam_s + h
        (a_s, _), (a_t, s_t) = sig(lam_s), sig(lam_t)
        r1 = 0.5 if order == 2 else 1.0 / 3.0
        a1, s1 = sig(lam_s + r1 * h)
        u1 = (a1 / a_s) * x - s1 * math.expm1(r1 * h) * e_s
        d1 = eps(u1, lam_s + r1 * h) - e_s
        first = (a_t / a_s) * x - s_t * math.expm1(h) * e_s
        if order == 2:
            x_low, x_high = first, first - s_t / (2 * r1) * math.expm1(h) * d1
        else:
            r2 = 2.0 / 3.0
            a2, s2 = sig(lam_s + r2 * h)
            u2 = ((a2 / a_s) * x - s2 * math.expm1(r2 * h) * e_s
                  - s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0) * d1)
            d2 = eps(u2, lam_s + r2 * h) - e_s
            x_low = first - s_t / (2 * r1) * math.expm1(h) * d1
            x_high = first - (s_t / r2) * (math.expm1(h) / h - 1.0) * d2
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        err = float(((x_high - x_low) / delta).reshape(len(x), -1).pow(2).mean(1).sqrt().max())
        if err <= 1.0:
            x, x_prev, lam_s, e_s = x_high, x_low, lam_t, None
        h = min(theta * h * max(err, 1e-10) ** (-1.0 / order), lam_end - lam_s)
    if denoise_to_zero:
        a, s = sig(lam_s)
        x = (x - s * eps(x, lam_s)) / a
    return x, nfe


def _ddim_best(model, xbar: Tensor, schedule, nfe: int, reference: Tensor) -> float:
    """DDIM (Euler on Eq. 12) with `nfe` steps: the smaller RMSE of the log-SNR and (nfe ≤ T) trailing grids."""
    errs = []
    grids = [log_uniform(schedule.sigma_max, schedule.sigma_min, nfe)]
    if nfe <= schedule.T:  # DDIM's trailing grid has at most T steps
        grids.append(ddim(schedule, nfe))
    for g in grids:
        x = integrate(model, xbar, g, "euler").x
        errs.append(float((x - reference).pow(2).mean().sqrt()))
    return min(errs)


def _solve(name: str, model, z: Tensor, schedule, tol: float) -> tuple[Tensor, int]:
    xb = z * math.sqrt(1.0 + schedule.sigma_max**2)
    ends = torch.tensor([schedule.sigma_max, 0.0], dtype=torch.float64)
    if name.startswith("dpm23"):
        end = 1e-3 if name.endswith("deep") else schedule.sigma_min
        return dpm_solver_adaptive(model, z, schedule.sigma_max, end, tol, tol, order=3)
    if name == "adaptive_exp_o4":  # the 4(5) pair: options={"order": 4}
        sol = integrate(DDIMField(model), xb, ends, "adaptive_exp", rtol=tol, atol=tol, options={"order": 4})
        return sol.x, sol.nfe
    method, variable = ("dopri5", "sigma") if name == "dopri5_sigma" else (name, "log_sigma")
    sol = integrate(DDIMField(model), xb, ends, method, rtol=tol, atol=tol, variable=variable)
    return sol.x, sol.nfe


def tolerance_study(setups, tolerances=TOLERANCES, solvers=SOLVERS) -> list[dict]:
    """Rows {problem, solver, tol, nfe, rmse, ddim_rmse (DDIM at the same NFE, best grid)} per setup."""
    rows = []
    for s in setups:
        xb = s.xbar
        for name in solvers:
            for tol in tolerances:
                x, nfe = _solve(name, s.problem.model, s.z, s.schedule, tol)
                err = float((x - s.reference).pow(2).mean().sqrt())
                rows.append({"problem": s.problem.seed, "solver": name, "tol": tol, "nfe": nfe, "rmse": err,
                             "ddim_rmse": _ddim_best(s.problem.model, xb, s.schedule, nfe, s.reference)})
    return rows


def nfe_at_equal_error(rows: list[dict], solver: str, err: float) -> float:
    """NFE of `solver` at RMSE `err`, log–log interpolation over its tolerance sweep (nan outside it)."""
    pts = sorted((r["rmse"], r["nfe"]) for r in rows if r["solver"] == solver)
    e = np.log([p[0] for p in pts])
    n = np.log([p[1] for p in pts])
    le = math.log(err)
    if not (e.min() <= le <= e.max()):
        return math.nan
    # NFE as a function of error: the cheapest NFE reaching at most `err` (monotone envelope), interpolated
    order = np.argsort(e)
    e, n = e[order], np.minimum.accumulate(n[order])
    return float(math.exp(np.interp(le, e, n)))


def _g(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.2g}"


def tolerance_tables(rows: list[dict], solvers=SOLVERS) -> str:
    """Markdown: per solver and tolerance, median over problems of RMSE/tol, NFE and RMSE/DDIM-at-same-NFE
    (with the worst problem); then the NFE ratio to the recipe at the recipe's own errors."""
    tols = sorted({r["tol"] for r in rows}, reverse=True)
    probs = sorted({r["problem"] for r in rows})
    out = ["| solver | " + " | ".join(f"tol {t:.0e}" for t in tols) + " |", "|---|" + "---|" * len(tols)]
    for name in solvers:
        cells = []
        for t in tols:
            rs = [r for r in rows if r["solver"] == name and r["tol"] == t]
            if not rs:
                cells.append("—")
                continue
            ratio = [r["rmse"] / t for r in rs]
            cells.append(f"{_g(float(np.median(ratio)))} [{_g(min(ratio))}–{_g(max(ratio))}], "
                         f"NFE {int(np.median([r['nfe'] for r in rs]))}, "
                         f"÷DDIM {_g(max(r['rmse'] / r['ddim_rmse'] for r in rs))}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    lines = ["Cells: median achieved RMSE / tol [min–max over problems], median NFE, worst RMSE ÷ DDIM's RMSE "
             "at the same NFE (best of trailing and log-SNR grids; < 1 means better than DDIM).", "", *out, ""]
    lines += ["NFE at equal error, ratio to the recipe (DPM-Solver-23 adaptive, better of its two ends) at the "
              "recipe's achieved errors, median [worst] over problems and tolerances:", "",
              "| solver | NFE ÷ recipe, median | worst | points |", "|---|---|---|---|"]
    for name in solvers:
        if name.startswith("dpm23"):
            continue
        rat = []
        for p in probs:
            pr = [r for r in rows if r["problem"] == p]
            for r in pr:
                if r["solver"].startswith("dpm23"):
                    # the cheaper end that reaches this error (an end that cannot reach it gives nan and is
                    # skipped: a plain min() would return the nan when it comes first and drop the point)
                    ends = [nfe_at_equal_error(pr, v, r["rmse"]) for v in ("dpm23", "dpm23_deep")]
                    best = min((v for v in ends if math.isfinite(v)), default=math.nan)
                    mine = nfe_at_equal_error(pr, name, r["rmse"])
                    if math.isfinite(mine) and math.isfinite(best):
                        rat.append(mine / best)
        med = _g(float(np.median(rat))) if rat else "—"
        lines.append(f"| {name} | {med} | {_g(max(rat)) if rat else '—'} | {len(rat)} |")
    return "\n".join(lines) + "\n"
