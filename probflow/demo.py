"""`probflow demo`: DDIM is Euler on Eq. 12, shown on the built-in 2-D Gaussian mixture.

Samples the same noise with DDIM (Euler on the trailing DDIM grid of the DDPM linear schedule) at several
step counts, with rk4, and with dopri5 at several tolerances; measures each x_0 against the DOP853
reference (docs/MATH.md §7); prints a table (method, NFE, error) and writes a PNG (trajectories, error vs NFE).
"""

from __future__ import annotations

import warnings

import torch

import probflow
from probflow import grids, schedules
from probflow.files.atomic import atomic_write
from probflow.method import MethodCaution
from probflow.models import default_mixture

EULER_STEPS = (5, 10, 20, 50, 100)
RK4_STEPS = (5, 10, 25)
DOPRI5_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def run_demo_study(n: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """Every run of the demo, measured against the reference: {"rows": [...], "reference": Solution, ...}."""
    from tqdm.auto import tqdm

    model, sch = default_mixture(), schedules.linear()
    x_T = probflow.noise(n, (2,), seed=seed)
    g_ref = grids.ddim(sch, 250)  # dense, so the reference paths plot as curves (DOP853 steps are its own)
    runs = [("euler", f"DDIM (euler) {s} steps", grids.ddim(sch, s), {}) for s in EULER_STEPS]
    runs += [("rk4", f"rk4 {s} steps", grids.ddim(sch, s), {}) for s in RK4_STEPS]
    runs += [("dopri5", f"dopri5 rtol=atol={t:g}", g_ref[[0, -1]], {"rtol": t, "atol": t}) for t in DOPRI5_TOLS]
    bar = tqdm(total=len(runs) + 1, desc="probflow demo", disable=not progress)
    bar.set_postfix_str("DOP853 reference")
    ref = probflow.sample(model, x_T, g_ref, "scipy_dop853", rtol=1e-10, atol=1e-10, trajectory=True,
                          options={"group": 64})
    bar.update()
    rows, paths = [], {}
    for method, label, g, tol in runs:
        bar.set_postfix_str(label)
        with warnings.catch_warnings():  # the demo shows dopri5's error at loose tolerances: no caution about it
            warnings.simplefilter("ignore", MethodCaution)
            sol = probflow.sample(model, x_T, g, method, trajectory=True, **tol)
        err = (sol.x - ref.x).norm(dim=1)
        rows.append({"method": method, "label": label, "nfe": sol.nfe,
                     "rmse": err.pow(2).mean().sqrt().item(), "median": err.median().item()})
        paths[label] = sol
        bar.update()
    bar.close()
    return {"rows": rows, "reference": ref, "paths": paths, "model": model, "x_T": x_T}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<28} {'NFE':>5} {'RMSE of x_0':>12} {'median':>10}", "-" * 58]
    lines += [f"{r['label']:<28} {r['nfe']:>5d} {r['rmse']:>12.3e} {r['median']:>10.3e}" for r in rows]
    return "\n".join(lines)


def plot(study: dict, path: str, force: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, ref = study["model"], study["reference"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 5.2))
    u = torch.linspace(-1.5, 1.5, 200, dtype=torch.float64)
    xx, yy = torch.meshgrid(u, u, indexing="xy")
    dens = model.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1), 0.0).exp().reshape(xx.shape)
    ax0.contourf(xx, yy, dens, levels=30, cmap="Greys")
    ddim10 = study["paths"]["DDIM (euler) 10 steps"].trajectory
    for i in range(min(24, ref.x.shape[0])):  # at most 24 paths, fewer when n is smaller
        ax0.plot(ref.trajectory[:, i, 0], ref.trajectory[:, i, 1], color="tab:blue", lw=1, alpha=0.8,
                 label="exact ODE (DOP853)" if i == 0 else None)
        ax0.plot(ddim10[:, i, 0], ddim10[:, i, 1], "o--", color="tab:orange", ms=2.5, lw=0.8,
                 label="DDIM = Euler, 10 steps" if i == 0 else None)
    ax0.scatter(ref.x[:, 0], ref.x[:, 1], s=3, color="tab:blue", alpha=0.4)
    ax0.set(xlim=(-1.5, 1.5), ylim=(-1.5, 1.5), aspect="equal", title="Paths of x from x_T to x_0 (2-D mixture)")
    ax0.legend(loc="lower left", fontsize=8)
    for method, style in (("euler", "o-"), ("rk4", "s-"), ("dopri5", "^-")):
        rows = [r for r in study["rows"] if r["method"] == method]
        ax1.loglog([r["nfe"] for r in rows], [r["rmse"] for r in rows], style,
                   label="DDIM (euler)" if method == "euler" else method)
    ax1.set(xlabel="NFE (model evaluations)", ylabel="RMSE of x_0 vs DOP853 reference", title="Error vs NFE")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), force=force)
    plt.close(fig)
