"""The markdown report of `digits_quality.py` (its `quality` result → DIGITS.md)."""

from __future__ import annotations

import math

__all__ = ["markdown", "key"]


def key(r: dict) -> str:
    """A run's name in the results: "family:method/grid"."""
    return f"{r['family']}:{r['method']}/{r['grid']}"


def _f(v, spec=".3f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _name(k: str) -> str:
    fam, _, rest = k.partition(":")
    return f"{'probflow' if fam == 'probflow' else 'diffusers'} `{rest}`"


def _by_key(rows: list[dict]) -> dict:
    return {key(r): r for r in rows if "error" not in r}


def _fd(r: dict) -> str:
    return f"{_f(r['fd'])} [{_f(r['fd_lo'])}, {_f(r['fd_hi'])}]"


def _headline(res: dict) -> list[str]:
    lines = ["| NFE | probflow | FD [interval] | best peer by FD | its FD [interval] | FD probflow − best peer "
             "[paired interval] | no worse? | RMSE probflow | best peer by RMSE | its RMSE | "
             "RMSE ratio [interval] | lower? | RMSE ÷ DDIM's |", "|" + "---|" * 13]
    for k, blk in res["nfe"].items():
        rows, s = _by_key(blk["rows"]), blk["summary"]
        bf, br = rows[s["best_peer_fd"]], rows[s["best_peer_rmse"]]
        for c in s["compare"]:
            o = rows[c["ours"]]
            lines.append(
                f"| {k} | {_name(c['ours'])} | {_fd(o)} | {_name(s['best_peer_fd'])} | {_fd(bf)} | "
                f"{_f(c['fd_diff'], '+.3f')} [{_f(c['fd_diff_lo'], '+.3f')}, {_f(c['fd_diff_hi'], '+.3f')}] | "
                f"{'yes' if c['fd_no_worse'] else '**no**'} | {_f(o['rmse'], '.2e')} | {_name(s['best_peer_rmse'])} | "
                f"{_f(br['rmse'], '.2e')} | {_f(c['rmse_ratio'], '.2f')} [{_f(c['rmse_ratio_lo'], '.2f')}, "
                f"{_f(c['rmse_ratio_hi'], '.2f')}] | {'yes' if c['rmse_lower'] else '**no**'} | "
                f"{_f(c['rmse_vs_ddim'], '.2f')} |")
    return lines


def _full_table(res: dict) -> list[str]:
    lines = ["| NFE | family | method | grid | NFE used | FD [interval] | mean confidence | RMSE | median "
             "per-sample RMS | wall s |", "|" + "---|" * 10]
    for k, blk in res["nfe"].items():
        for r in sorted((r for r in blk["rows"] if "fd" in r), key=lambda r: r["fd"]):
            lines.append(f"| {k} | {'probflow' if r['family'] == 'probflow' else 'diffusers'} | `{r['method']}` | "
                         f"{r['grid']} | {r['nfe']} | {_fd(r)} | {_f(r['confidence'])} | {_f(r['rmse'], '.2e')} | "
                         f"{_f(r['median'], '.2e')} | {_f(r['wall_s'], '.0f')} |")
    return lines


def _screen_table(res: dict) -> list[str]:
    lines = [f"| NFE | family | method | grid | NFE used | RMSE | median per-sample RMS | FD of the first "
             f"{res['screen']} samples |", "|" + "---|" * 8]
    for k, blk in res["nfe"].items():
        for r in blk["rows"]:
            fam = "probflow" if r["family"] == "probflow" else "diffusers"
            if "error" in r:
                lines.append(f"| {k} | {fam} | `{r['method']}` | {r['grid']} | — | failed: {r['error']} | | |")
                continue
            lines.append(f"| {k} | {fam} | `{r['method']}` | {r['grid']} | {r['nfe']} | {_f(r['rmse'], '.2e')} | "
                         f"{_f(r['median'], '.2e')} | {_f(r.get('screen_fd'))} |")
    return lines


def _setting(res: dict) -> list[str]:
    ref, n, lv = res["reference"], res["n"], f"{res['level']:.0%}"
    return [
        f"{n} samples per run from `probflow.noise({n}, (1, 8, 8), seed={res['seed']})`, the same noise for every "
        "run (float64 state, the network in float32), σ_max (t = 999) → σ = 0.",
        "",
        "**Fréchet distance (FD)**: `probflow.digits.metrics.frechet_distance` between Gaussians fitted to the **64 "
        "raw pixels** (in [−1, 1]; no Inception or other learned features — the project's own definition) of the "
        f"samples and of the held-out **test split** ({res['test_images']} images). Its floor, the training split "
        f"against the test split, is {res['frechet_floor_train_vs_test']:.3f}. **Intervals** ({lv}): bootstrap over "
        f"{res['resamples']} resamples of the generated samples with replacement (the test split held fixed), one "
        "index set per replicate shared by all runs, so the interval of a difference is *paired*. Shown: the basic "
        "bootstrap interval (2·estimate − the replicates' quantiles), which removes the resampling's own upward bias "
        "of a Fréchet distance to first order; the plain percentile interval (kept in the JSON) is shifted by that "
        "bias and under-covers (`tests/test_digits_quality.py` shows both on simulated Gaussians). "
        "\"No worse\" = the interval of FD(probflow) − FD(best peer) reaches 0 or below. The interval of one run's "
        "FD is for the FD of the sampler's distribution; the estimate from n samples overestimates it (the "
        "covariance estimate's noise), so that interval lies below the estimate. Differences between runs on the "
        "same noise carry almost none of that bias.",
        "",
        f"**RMSE** of x_0 against an adaptive reference on the first {res['screen']} samples: `adaptive_exp` at rtol = "
        f"atol = {ref['rtol']:g} ({ref['nfe']} NFE); the same solve at rtol = atol = {ref['check_rtol']:g} "
        f"({ref['check_nfe']} NFE) differs from it by RMS {ref['check_rmse']:.1e} "
        f"(max {ref['check_max_abs_diff']:.1e}), an upper estimate of the reference's own error. Its interval: a "
        "percentile bootstrap over those samples "
        f"({res['resamples']} resamples, paired). **Mean confidence**: a logistic regression trained on the training "
        f"split (test accuracy {res['classifier_test_accuracy']:.3f}; real test digits score "
        f"{res['test_split_mean_confidence']:.3f}).",
        "",
        f"**Peers**: {', '.join(res['peers'])} (diffusers, `probflow.bench.peers`), each on every grid it supports, "
        f"at the step count whose model calls come closest to the NFE, all first on the {res['screen']} reference "
        f"samples (last table); the {res['finalists']} with the smallest FD there, the {res['finalists']} with the "
        f"smallest RMSE, and DDIM (= euler, trailing) were completed to all {n} samples of the same noise (an FD of "
        f"{res['screen']} samples ranks runs only roughly, hence both criteria). The best peer by FD is picked among "
        "those on the evaluation samples themselves, the best by RMSE among all peers: picking the best of many on "
        "the evaluation samples favours the peers, so the comparison is conservative for probflow. "
        "probflow's rows were not chosen on digits: the solver and grid per NFE are the README's recommendation, "
        "made on the Gaussian-mixture tuning set (benchmarks/HELDOUT.md)."]


def _calibration(res: dict) -> list[str]:
    cal = res.get("calibration")
    if not cal:
        return []
    cost = ", ".join(f"NFE {k}: {v} batch model calls" for k, v in cal["nfe"].items())
    return ["", f"**Calibrated rows**: `probflow.calibrate.calibrated` (start: log-SNR uniform to 3σ_0), fitted per "
            f"NFE on {cal['samples']} samples of calibration noise `probflow.noise({cal['samples']}, (1, 8, 8), "
            f"seed={cal['seed']})` — not the evaluation noise — against their own reference ({cal['ref']}, "
            f"{cal['ref_nfe']} NFE), at most {cal['max_evals']} candidate grids ({cost} on those {cal['samples']} "
            "samples; a one-off cost per model and NFE)."]


def _verdict(res: dict) -> list[str]:
    out = []
    for k, blk in res["nfe"].items():
        for s in blk["summary"]["compare"]:
            fd = ("no worse than the best peer's within the interval" if s["fd_no_worse"] else
                  "worse than the best peer's beyond the interval")
            rm = "lower than" if s["rmse_lower"] else "not lower than"
            met = "met" if s["fd_no_worse"] and s["rmse_lower"] else "**missed**"
            out.append(f"- NFE {k}, {_name(s['ours'])}: target {met}. FD {fd} (difference {s['fd_diff']:+.3f}, "
                       f"interval [{s['fd_diff_lo']:+.3f}, {s['fd_diff_hi']:+.3f}]); RMSE {rm} the best peer's "
                       f"({s['rmse_ratio']:.2f}×, interval [{s['rmse_ratio_lo']:.2f}, {s['rmse_ratio_hi']:.2f}]; "
                       f"median per-sample RMS error {s['median_ours']:.2e} against {s['median_best_peer_rmse']:.2e}).")
    return out


def markdown(res: dict, command: str | None = None, heading: str = "#") -> str:
    """The report of a `quality` result (`command`: the line that produced it, shown with the wall time)."""
    run = [f"Command: `{command}`; wall time {res['wall_s']:.0f} s (one thread).", ""] if command else []
    lines = [f"{heading} Digits: sample quality of the recommended few-step solvers", "", *run, *_setting(res),
             *_calibration(res), "", f"{heading}# Recommended solver against the best peer", "", *_headline(res), "",
             *_verdict(res), "", f"{heading}# Runs on all {res['n']} samples", "", *_full_table(res), "",
             f"{heading}# Every run on the first {res['screen']} samples (screening)", "",
             f"A Fréchet distance of {res['screen']} samples is far above that of {res['n']} (the covariance "
             "estimate's bias); it only ranks peers for completion.", "", *_screen_table(res), ""]
    return "\n".join(lines)
