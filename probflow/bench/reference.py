"""The benchmark's reference x_0: a tight adaptive solve of Eq. 12 from σ_max to 0, checked against a looser one.

Every error in the benchmark is measured against x_0 = this solve from the same x_T (docs/MATH.md §7). The check
solve at a looser tolerance bounds how far the reference itself may be from the exact flow: its max |Δx_0| and
RMS difference are recorded beside the reference, so a reader sees whether the reference is tight enough for the
errors it is used to measure (it must be far below them).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.integrate import integrate
from probflow.schedules import Schedule

__all__ = ["REFERENCE", "ANALYTIC_REF", "NETWORK_REF", "reference", "default_reference"]

# scipy's DOP853 in float64, per sample: the reference for models with exact ε (it is excluded from the benchmarked
# methods for that reason).
REFERENCE = "scipy_dop853"
# (method, tolerance, check tolerance): closed-form models afford DOP853 at 1e-12; a network pays per call and its
# float32 ε has rounding noise near 1e-7, so dopri5 at 1e-5 (checked at 1e-4) is the tightest affordable solve.
ANALYTIC_REF = (REFERENCE, 1e-12, 1e-10)
NETWORK_REF = ("dopri5", 1e-5, 1e-4)


def default_reference(model) -> tuple[str, float, float]:
    """`NETWORK_REF` for a model that wraps a network (has `net`), else `ANALYTIC_REF`."""
    return NETWORK_REF if hasattr(model, "net") else ANALYTIC_REF


def reference(model, xbar: Tensor, schedule: Schedule, method: str, tol: float, check_tol: float,
              model_dtype: torch.dtype | None = None, options: dict | None = None,
              error_tol: float | None = None) -> tuple[Tensor, dict]:
    """x_0 from `method` at rtol = atol = `tol` in float64 from x̄_T = `xbar` at σ_max to σ = 0, and its
    convergence check: the max |difference| and RMS difference to a second solve at `check_tol` (> tol).
    error_tol (< tol, usually tol/10): a third solve there measures the reference's own error as its difference
    to that solve ("error_rmse", "error_max_abs", "error_nfe", "error_wall_s")."""
    if not (0 < tol < check_tol):
        raise ValueError(f"tolerances: expected 0 < reference tolerance < check tolerance, got {tol} and {check_tol}")
    if error_tol is not None and not (0 < error_tol < tol):
        raise ValueError(f"error_tol: expected 0 < error_tol < the reference tolerance {tol}, got {error_tol}")
    end = torch.tensor([schedule.sigma_max, 0.0], dtype=torch.float64)
    out = {}
    solves = (("tight", tol), ("check", check_tol)) + ((("error", error_tol),) if error_tol is not None else ())
    for key, t in solves:
        f = DDIMField(model, model_dtype=model_dtype)
        t0 = time.perf_counter()
        sol = integrate(f, xbar, end, method, rtol=t, atol=t, options=options)
        out[key] = (sol.x, sol.nfe, time.perf_counter() - t0)
    x, nfe, wall = out["tight"]
    diff = (x - out["check"][0]).abs()
    info = {"method": method, "rtol": tol, "atol": tol, "options": options or {}, "nfe": nfe, "wall_s": wall,
            "check_rtol": check_tol, "check_nfe": out["check"][1], "check_wall_s": out["check"][2],
            "check_max_abs_diff": float(diff.max()), "check_rmse": float(diff.pow(2).mean().sqrt())}
    if error_tol is not None:
        e = (x - out["error"][0]).abs()
        info.update({"error_tol": error_tol, "error_rmse": float(e.pow(2).mean().sqrt()),
                     "error_max_abs": float(e.max()), "error_nfe": out["error"][1], "error_wall_s": out["error"][2]})
    return x, info
