"""Plots of a benchmark run: error vs NFE and vs wall time per workload (one panel per grid), and the headline
(each method on its best grid). Written atomically (`atomic_write`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from probflow.bench.grids import DEFAULT_GRIDS
from probflow.files.atomic import atomic_write

__all__ = ["plot_workload", "plot_headline", "plot_names", "write_text", "HEADLINE"]

HEADLINE = "headline.png"


def plot_names(wname: str) -> list[str]:
    slug = wname.replace(" ", "_").replace("=", "").replace("/", "_").replace(":", "_")
    return [f"error_vs_nfe_{slug}.png", f"error_vs_wall_{slug}.png"]


_PEER_PANEL = {"trailing": "uniform", "karras": "karras", "karras_sigma": "karras", "exponential": "logsnr",
               "exponential_sigma": "logsnr"}


def plot_workload(wname: str, rows: Sequence[dict], out: Path) -> list[Path]:
    """Error vs NFE and error vs wall time, log-log: one panel per grid (peers dashed in the panel of the grid
    they share: trailing with uniform, karras with karras), one line per method+grid, adaptive methods in a
    panel of their own; a method has the same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["error"] is None and math.isfinite(r["rmse"]) and r["rmse"] > 0:
            series.setdefault((r["family"], r["method"], r["grid"]), []).append(r)
    panels: list[str] = []
    for fam, _, g in series:
        p = "adaptive" if fam == "adaptive" else (_PEER_PANEL.get(g, g) if fam == "peer" else g)
        if p not in panels:
            panels.append(p)
    panels.sort(key=lambda p: (p == "adaptive", p not in DEFAULT_GRIDS,
                               DEFAULT_GRIDS.index(p) if p in DEFAULT_GRIDS else 0, p))
    # one colour per method name: a diffusers peer of the same name as a probflow method shares its colour
    palette = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("Dark2").colors)
    color = {n: palette[i % len(palette)] for i, n in enumerate(sorted({k[1] for k in series}))}
    paths = []
    ncol = min(3, len(panels)) or 1
    nrow = max(1, math.ceil(len(panels) / ncol))
    names = plot_names(wname)
    for xkey, fname, xl in (("nfe", names[0], "NFE (model calls)"), ("wall_s", names[1], "wall time (s)")):
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol + 3.2, 4.2 * nrow), sharey=True, squeeze=False)
        handles: dict[str, Any] = {}
        for (fam, m, g), rs in sorted(series.items()):
            p = "adaptive" if fam == "adaptive" else (_PEER_PANEL.get(g, g) if fam == "peer" else g)
            ax = axes.flat[panels.index(p)]
            rs = sorted(rs, key=lambda r: r[xkey])
            label = f"diffusers {m}" + (" (σ)" if g.endswith("_sigma") else "") if fam == "peer" else m
            (line,) = ax.plot([r[xkey] for r in rs], [r["rmse"] for r in rs], "--" if fam == "peer" else "-",
                              marker="s" if g.endswith("_sigma") else "o", ms=3, lw=1.1,
                              color=color[m], label=label)
            handles.setdefault(label, line)
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.set_visible(False)
                continue
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"grid: {panels[i]}" if panels[i] != "adaptive" else "adaptive (rtol = atol = 1e-2 … 1e-7)",
                         fontsize=9)
            ax.set_xlabel(xl, fontsize=8)
            if i % ncol == 0:
                ax.set_ylabel("RMSE of x_0 vs reference", fontsize=8)
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7, frameon=False)
        fig.suptitle(f"{wname}: error vs {xl.split(' (')[0]} (solid probflow, dashed diffusers; "
                     "(σ): model at the scheduler's σ)", fontsize=10)
        # fixed margins (matplotlib's tight_layout measures every log tick label: seconds per figure)
        width, height = 5.2 * ncol + 3.2, 4.2 * nrow
        fig.subplots_adjust(left=0.7 / width, right=1 - 3.0 / width, bottom=0.6 / height, top=1 - 0.6 / height,
                            wspace=0.12, hspace=0.35)
        paths.append(out / fname)
        _atomic(paths[-1], lambda p, fig=fig: fig.savefig(p, dpi=100, format="png"))
        plt.close(fig)
    return paths


def plot_headline(wname: str, rows: Sequence[dict], path: Path) -> Path:
    """Per method (probflow solid, diffusers dashed) its best grid at each NFE: RMSE vs NFE, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    fams = {}
    for r in rows:
        if r["family"] in ("probflow", "peer") and r["error"] is None and math.isfinite(r["rmse"]) and r["rmse"] > 0:
            d = fams.setdefault((r["family"], r["method"]), {})
            if r["nfe_target"] not in d or r["rmse"] < d[r["nfe_target"]]["rmse"]:
                d[r["nfe_target"]] = r
    # every line distinct: its own colour (tab20 then Dark2, 28 in all), and probflow solid with circles,
    # diffusers dashed with squares; past 28 lines the dash pattern varies as well
    palette = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("Dark2").colors)
    dashes = {"probflow": ["-", "-.", ":"], "peer": ["--", (0, (5, 1, 1, 1)), (0, (1, 1))]}
    for i, ((fam, m), d) in enumerate(sorted(fams.items(), key=lambda kv: (kv[0][0] == "peer", kv[0][1]))):
        rs = [d[k] for k in sorted(d)]
        ax.plot([r["nfe"] for r in rs], [r["rmse"] for r in rs], linestyle=dashes[fam][(i // len(palette)) % 3],
                marker="s" if fam == "peer" else "o", ms=3, color=palette[i % len(palette)],
                label=f"{'diffusers ' if fam == 'peer' else ''}{m}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (model calls)")
    ax.set_ylabel("RMSE of x_0 (best grid per method)")
    ax.set_title(f"{wname}: error vs NFE, each method on its best grid")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)
    _atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    # Whether an existing output may be replaced is decided once, before the run (run_bench's --force check).
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write, force=True)


def write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(path, w)
