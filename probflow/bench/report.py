"""RESULTS.md from a results dict (as `probflow bench` writes results.json): the headline, per-workload tables
and the overhead table. Plain text from numbers: nothing here measures anything."""

from __future__ import annotations

import math
from collections.abc import Sequence

from probflow.bench import peers as _peers
from probflow.bench.fair import fair_rows, reference_error, resolved
from probflow.bench.grids import CALIBRATED, UNIFORM_STEP_GRID
from probflow.bench.overhead import overhead_ratios
from probflow.bench.runner import best_per_nfe
from probflow.schedules import linear

__all__ = ["markdown", "headline_rows", "HEADLINE_WORKLOAD", "fmt", "label"]

HEADLINE_WORKLOAD = "mixture D=64"
DDIM = ("euler", "uniform")  # DDIM = Euler on the trailing uniform grid (docs/MATH.md §3)


def fmt(v: float | None, spec: str = ".2e") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def ratio(v: float | None) -> str:
    """A ratio with two decimals, or two significant digits below 0.01 (0.0046 must not print as 0.00)."""
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.2f}" if v >= 0.01 else f"{v:.1e}"


def label(r: dict | None) -> str:
    return "—" if r is None else f"{r['method']}/{r['grid']}"


def _cell(r: dict | None, key: str) -> str:
    return "—" if r is None else f"{fmt(r[key])} `{label(r)}`"


def headline_rows(rows: Sequence[dict], key: str = "rmse") -> list[dict]:
    """Per target NFE: DDIM's row, probflow's best on the calibrated grid, its best on any other grid, the best
    diffusers peer (all with counted NFE ≤ target), and the ratios to the peer."""
    out = []
    for b in best_per_nfe(rows, key):
        n = b["nfe"]
        ddim = next((r for r in rows if r["family"] == "probflow" and (r["method"], r["grid"]) == DDIM
                     and r["nfe_target"] == n and r["error"] is None), None)
        cal_rows = [r for r in rows if r["grid"] == CALIBRATED or r["family"] != "probflow"]
        cal = next(iter(best_per_nfe([r for r in cal_rows if r["nfe_target"] == n], key)), None)
        c = cal["probflow"] if cal else None
        q = b["peer"]
        out.append({"nfe": n, "ddim": ddim, "calibrated": c, "uncalibrated": b["uncalibrated"], "peer": q,
                    "ratio_calibrated": c[key] / q[key] if c and q and q[key] > 0 else None,
                    "ratio_uncalibrated": b["ratio_uncalibrated"]})
    return out


def _headline(results: dict) -> list[str]:
    w = results["workloads"].get(HEADLINE_WORKLOAD)
    if not w:
        return []
    out = ["## Headline: probflow vs the best diffusers peer\n",
           f"{w['description']} Each cell: the error and the solver/grid that reached it with counted NFE ≤ the "
           "target. *Calibrated*: probflow's best on the `calibrated` grid (fitted to this model on separate "
           "calibration noise; its one-off cost is below, not in the NFE); *uncalibrated*: probflow's best on "
           "any grid that does not depend on the model; *diffusers best*: the best peer on any of its grids. "
           "Ratios are probflow / diffusers (below 1: probflow more accurate).\n"]
    for key, what in (("rmse", "RMSE of x_0"), ("median", "median over samples of the per-sample RMS error")):
        out += [f"By {what}:\n",
                "| NFE | DDIM (euler, trailing) | probflow, calibrated grid | probflow, uncalibrated | diffusers best "
                "| ratio calibrated | ratio uncalibrated |", "|---|---|---|---|---|---|---|"]
        for h in headline_rows(w["rows"], key):
            out.append(f"| {h['nfe']} | {fmt(h['ddim'] and h['ddim'][key])} | {_cell(h['calibrated'], key)} | "
                       f"{_cell(h['uncalibrated'], key)} | {_cell(h['peer'], key)} | "
                       f"{ratio(h['ratio_calibrated'])} | {ratio(h['ratio_uncalibrated'])} |")
        out.append("")
    return out


def _peer_last_steps(results: dict) -> list[str]:
    """A sentence on the Euler-type peers' last step (from σ of their last trailing timestep straight to 0)."""
    peers = results.get("config", {}).get("peers") or []
    names = [p for p in ("euler_d", "heun_d", "lms_d") if p in peers]
    if not names or not _peers.available():
        return []
    sch = linear()
    nfe = results["config"]["nfe"]
    parts = []
    for n in nfe:
        steps = _peers.steps_for_nfe(names[0], n)
        parts.append(f"{_peers.last_sigma_before_zero(names[0], sch, steps, 'karras'):.3g} at {steps} steps")
    return [f"diffusers' Euler-type samplers ({', '.join(names)}) on their Karras and exponential grids jump from "
            "the σ of their last trailing timestep straight to σ = 0 in one step, on the linear table: σ = "
            + ", ".join(parts) + f" (σ_0 = {sch.sigma_min:.3g}); DPM-Solver++ and UniPC end those grids at σ_0 and "
            "take a first-order last step into 0. Both are diffusers' methods, run as they are.\n"]


def _calibration(results: dict) -> list[str]:
    out = []
    for wname, wres in results["workloads"].items():
        c = wres.get("extra", {}).get("calibration")
        if c and c["per_steps"]:
            per = ", ".join(f"{k} steps {v['nfe']} NFE / {v['wall_s']:.1f} s" for k, v in c["per_steps"].items())
            opts = "".join(f", {k}={v!r}" for k, v in c["options"].items())
            out.append(f"Calibration ({wname}): the `calibrated` grid (`calibrated_builder(model, shape, "
                       f"\"{c['method']}\"{opts})`, its own calibration noise, seed 1234, independent of the "
                       f"benchmark's) cost {c['cost_nfe']} NFE (batch model calls) and {c['wall_s']:.1f} s in all "
                       f"({per}; the first includes the calibration batch's reference solve): a one-off cost per "
                       f"model and step count, not counted in the rows' per-sample NFE. Used by "
                       f"{', '.join(c['methods'])}" + (f" at NFE {', '.join(map(str, c['nfe']))}" if c["nfe"] else "")
                       + ".\n")
    return out


def _best_table(rows: Sequence[dict], key: str) -> list[str]:
    what = "RMSE" if key == "rmse" else "median per-sample RMS error"
    out = [f"Best per NFE by {what} (runs with measured NFE ≤ target; uncalibrated = every grid but `calibrated`):\n",
           "| NFE | probflow best | NFE | RMSE | median | probflow uncalibrated | RMSE | median | diffusers best | NFE "
           "| RMSE | median | ratio | ratio uncalibrated |", "|---" * 14 + "|"]
    for b in best_per_nfe(rows, key):
        p, u, q = b["probflow"], b["uncalibrated"], b["peer"]
        out.append(f"| {b['nfe']} | {label(p)} | {p['nfe'] if p else '—'} | {fmt(p and p['rmse'])} | "
                   f"{fmt(p and p['median'])} | {label(u)} | {fmt(u and u['rmse'])} | {fmt(u and u['median'])} | "
                   f"{label(q)} | {q['nfe'] if q else '—'} | {fmt(q and q['rmse'])} | {fmt(q and q['median'])} | "
                   f"{ratio(b['ratio'])} | {ratio(b['ratio_uncalibrated'])} |")
    return out + [""]


def _vs_best(rows: Sequence[dict], ref_err: float) -> dict[int, str]:
    """Per row (by id): "best" for the best row of its NFE target (counted NFE ≤ target, any family), "resolved"
    when its RMSE exceeds the best's by more than 2·ε_ref (`fair.resolved`), "unresolved" otherwise."""
    out: dict[int, str] = {}
    for n in {r["nfe_target"] for r in rows if r["nfe_target"] is not None}:
        at = [r for r in rows if r["nfe_target"] == n and r["error"] is None and r["nfe"] is not None
              and r["nfe"] <= n and math.isfinite(r["rmse"])]
        if not at:
            continue
        best = min(at, key=lambda r: r["rmse"])
        for r in at:
            out[id(r)] = "best" if r is best else ("resolved" if resolved(r["rmse"], best["rmse"], ref_err)
                                                   else "unresolved")
    return out


def _all_runs(rows: Sequence[dict], ref_err: float | None = None) -> list[str]:
    vs = _vs_best(rows, ref_err) if ref_err is not None else {}
    out = ["<details><summary>All runs</summary>\n",
           "| family | method | grid | role | NFE target | steps / tol | NFE | RMSE | median | max | vs best at NFE "
           "| wall s | note |", "|---" * 13 + "|"]
    for r in rows:
        st = r["steps"] if r["tol"] is None else f"{r['tol']:g}"
        note = (r["error"] or "; ".join(r["notes"]))[:80]
        out.append(f"| {r['family']} | {r['method']} | {r['grid']} | {r.get('role') or ''} | {r['nfe_target'] or ''} "
                   f"| {st} | {r['nfe'] if r['nfe'] is not None else '—'} | {fmt(r['rmse'])} | {fmt(r['median'])} | "
                   f"{fmt(r['max'])} | {vs.get(id(r), '—')} | {fmt(r['wall_s'], '.3f')} | {note} |")
    return out + ["\n</details>\n"]


def _fair(rows: Sequence[dict], ref_err: float) -> list[str]:
    """The fair table: both sides' chosen and oracle rows per NFE, the README's recommended row, the ratios to the
    peers' rows and whether each difference is resolved by the reference (`fair.resolved`)."""
    fr = fair_rows(rows)
    if not fr:
        return []
    out = [f"Fair table (RMSE with counted NFE ≤ target). *Recommended*: the README's configuration "
           "(`probflow.bench.recipes.RECOMMENDED`); *chosen*: benchmarks/FAIR.md's configuration chosen on its tuning "
           "problems (`recipes.FAIR_CHOSEN`); *oracle*: the side's best row here (peers: k-diffusion's and diffusers' "
           "samplers on every grid probflow's methods get, and diffusers' schedulers on their own grids). A ratio is "
           f"marked (unresolved) when the two RMSEs differ by at most 2ε_ref = {2 * ref_err:.1e} (the reference's "
           "measured RMS error ε_ref, twice: each RMSE may be off by ε_ref), so that ranking is not measured.\n",
           "| NFE | probflow recommended | probflow chosen | probflow oracle | peer chosen | peer oracle "
           "| recommended ÷ peer chosen | recommended ÷ peer oracle | chosen ÷ chosen | oracle ÷ oracle |",
           "|---" * 10 + "|"]

    def q(a: dict | None, b: dict | None) -> str:
        if a is None or b is None or not b["rmse"] > 0:
            return "—"
        return ratio(a["rmse"] / b["rmse"]) + ("" if resolved(a["rmse"], b["rmse"], ref_err) else " (unresolved)")

    for f in fr:
        rec, ch, po, qc, qo = (f[k] for k in ("recommended", "chosen", "oracle", "peer_chosen", "peer_oracle"))
        out.append(f"| {f['nfe']} | {_cell(rec, 'rmse')} | {_cell(ch, 'rmse')} | {_cell(po, 'rmse')} | "
                   f"{_cell(qc, 'rmse')} | {_cell(qo, 'rmse')} | {q(rec, qc)} | {q(rec, qo)} | {q(ch, qc)} | "
                   f"{q(po, qo)} |")
    return out + [""]


def _workload(wname: str, wres: dict) -> list[str]:
    ref = wres["reference"]
    out = [f"### {wname}\n", f"{wres['description']}\n",
           f"Reference: {ref['method']} rtol = atol = {ref['rtol']:g} ({ref['nfe']} NFE, {ref['wall_s']:.1f} s); "
           f"convergence check against rtol = atol = {ref['check_rtol']:g}: max |Δx_0| = "
           f"{ref['check_max_abs_diff']:.2e}, RMS {ref['check_rmse']:.2e}.\n"]
    if ref.get("error_rmse") is not None:
        out.append(f"Reference error, measured against the same solver at rtol = atol = {ref['error_tol']:g} "
                   f"({ref['error_nfe']} NFE): RMS ε_ref = {ref['error_rmse']:.2e}, max {ref['error_max_abs']:.2e}; "
                   f"two rows' RMSEs rank their solvers only where they differ by more than 2ε_ref = "
                   f"{2 * ref['error_rmse']:.1e} (column \"vs best at NFE\").\n")
    ref_err = reference_error(ref)
    errs = [r["rmse"] for r in wres["rows"] if r["error"] is None and math.isfinite(r["rmse"]) and r["rmse"] > 0]
    if errs and ref_err >= 0.1 * min(errs):
        out.append(f"**Caution**: the reference's uncertainty (RMS {ref_err:.1e}) is not far below the smallest "
                   f"errors reported ({min(errs):.1e}): errors below ~{10 * ref_err:.0e} (10× it) rank solvers only "
                   "roughly; the column \"vs best at NFE\" says which are resolved. Tighten it with --ref-tol.\n")
    if "float32_field_diff" in ref:
        out.append(f"Reference network in {ref['network_dtype']}; the solvers' network differs from it by max |Δε| = "
                   f"{ref['float32_field_diff']:.1e} (at σ = σ_max, 1, 0.01 near the flow).\n")
    out += _fair(wres["rows"], ref_err)
    for key in ("rmse", "median"):
        if best_per_nfe(wres["rows"], key):
            out += _best_table(wres["rows"], key)
    return out + _all_runs(wres["rows"], ref_err)


def _overhead(ov: dict) -> list[str]:
    out = [f"### Solver overhead\n\nNear-free model ε = 0.1·x on a {'×'.join(map(str, ov['shape']))} {ov['dtype']} "
           f"batch, {ov['steps']} steps, {ov['threads']} torch thread(s), median of {ov['repeats']} interleaved runs; "
           f"model call {ov['model_s'] * 1e3:.3f} ms. Ratio = time per step / the bare torchdiffeq Euler loop's, "
           f"same run" + (f"; probflow euler: {ov['euler_ratio']:.3f}" if ov.get("euler_ratio") else "") + ".\n",
           "| solver | NFE/step | ms/step | overhead ms/step | ratio |", "|---|---|---|---|---|"]
    for r in ov["rows"]:
        out.append(f"| {r['solver']} | {r['nfe_per_step']:.2f} | {r['step_s'] * 1e3:.3f} | "
                   f"{r['overhead_s'] * 1e3:.3f} | {r['ratio']:.2f} |")
    return out + [""]


def header(results: dict) -> list[str]:
    v, m = results["versions"], results["machine"]
    walls = ", ".join(f"{k} {t:.0f} s" for k, t in results.get("suite_wall_s", {}).items())
    out = ["# probflow benchmark results", "", "Generated by `probflow bench`; do not edit by hand. Regenerate with:",
           "", f"    {results['command']}", "",
           f"Started {results['started_utc']} UTC, wall time {results['wall_s']:.0f} s ({walls}). Versions: "
           + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
           f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}.",
           ""]
    if results.get("quick"):
        out += ["**Smoke run (`--quick`)**: tiny sample counts and few methods, to check that everything runs; its "
                "numbers are not results.", ""]
    if results["skipped"]:
        out += ["Skipped: " + "; ".join(results["skipped"]), ""]
    out += [METHOD_NOTE, ""]
    return out


METHOD_NOTE = (
    "Every solver starts from the same x_T at σ_max (t = T−1) and ends at σ = 0; errors are of x_0 against the "
    "reference. RMSE is over all samples and coordinates; median is the median over samples of the per-sample RMS "
    "error. probflow rows are float64 state and call `probflow.integrate`; diffusers peers are driven as their "
    "pipelines drive them, with the float64 tables swapped in (`probflow/bench/peers.py` lists the traps handled). "
    "NFE is counted (model calls, rejected adaptive steps included), never assumed. Fixed-grid methods run at "
    "steps = round((NFE target − extra calls) / stages), from each method's declared `Method.stages` and "
    "`Method.extra_calls` (dpmpp_3m and reversible_heun: one call for their start; explicit Adams: 6 start-up "
    "calls); best-per-NFE tables only count runs with measured NFE ≤ target. Grids: uniform/quadratic = DDIM "
    "trailing timesteps uniform/quadratic in t; logsnr = uniform in log σ from σ_max to σ_0; karras = ρ = 7 from "
    "σ_max to σ_0; log_snr_tuned = `grids.log_snr_tuned` (log-SNR uniform to 3σ_0); calibrated = "
    "`calibrated_builder` (a grid optimised per step count on a separate calibration batch); all then 0. "
    f"torchdiffeq's Adams methods assume equal steps in σ and run on `{UNIFORM_STEP_GRID}` instead. Peers: DDIM, "
    "DPM-Solver++ 2M and 3M, UniPC order 2 and order 3 (bh2, corrector on), Euler, Heun, LMS. Peer grids: "
    "trailing = DDIM trailing timesteps; karras = diffusers' `use_karras_sigmas` with the network at the "
    "pipeline's (rounded) timestep; karras_sigma = the same grid with the model at the scheduler's own σ; "
    "exponential / exponential_sigma = `use_exponential_sigmas` (log-SNR uniform), the same two ways. Sample quality "
    "is not judged here: earlier runs drew a digits verdict from a Fréchet distance on 16 samples, where the "
    "estimate's bias dominates (the exact ODE solution scored worst); ≥ 1,000 samples with a bootstrap interval did "
    "not fit this run's time budget, so the Fréchet column and the verdict were dropped and the digits suite ranks "
    "solvers by their distance to the reference solution only.")


def markdown(results: dict) -> str:
    """RESULTS.md: header, headline, notes on peers and calibration, every workload, the overhead, and any extra
    sections other suites put in results["sections"] ([{"title", "markdown"}])."""
    out = header(results) + _headline(results) + _peer_last_steps(results) + _calibration(results)
    ratios = overhead_ratios(results.get("overhead"))
    if ratios:
        out.append("Solver overhead at the same order (time per step with a near-free model, from the overhead "
                   "suite below): " + "; ".join(f"{a} / {b} = {r:.2f}" for a, b, r in ratios) + ".\n")
    for note in results.get("notes", []):
        out.append(note + "\n")
    for p in results.get("plots", []):
        if p == "headline.png" or "D64" in p:
            out += [f"![{p}]({p})", ""]
    for wname, wres in results["workloads"].items():
        out += _workload(wname, wres)
    for sec in results.get("sections", []):
        out += [f"## {sec['title']}\n", sec["markdown"], ""]
    if results.get("overhead"):
        out += _overhead(results["overhead"])
    return "\n".join(out) + "\n"
