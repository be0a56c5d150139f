"""Sample quality of the README's recommended few-step solvers on the digits network, against diffusers.

For each NFE (default 10 and 20), from one shared noise batch `probflow.noise(n, (1, 8, 8), seed)`:

- probflow's recommended solver as the README states it (`RECOMMENDED`: NFE 10 `unipc` on `log_snr_tuned`,
  NFE 20 `unipc_3` on log-SNR uniform to 2σ_0 = `heldout_study.tuned_grid`), chosen on the Gaussian-mixture tuning
  set, never on digits; and, as a second row, the same method on a per-model calibrated grid
  (`probflow.calibrate.calibrated`, fitted on `cal_samples` samples of separate calibration noise, seed
  `CAL_SEED`, never the evaluation noise);
- every diffusers peer (`peers.peer_names`) on every grid it supports (`peers.peer_grids`), driven as its
  pipeline drives it, at the step count whose model calls come closest to the NFE (`peers.steps_for_nfe`);
  DDIM (= euler on the trailing grid) is the baseline.

Measured per run: the Fréchet distance to the held-out **test split** (360 images) in the project's feature
space — Gaussians fitted to the 64 raw pixels in [−1, 1] (`probflow.digits.metrics.frechet_distance`, no
Inception network) — with a percentile bootstrap interval (the generated samples resampled with replacement;
one index set per replicate, shared by all runs, so differences between runs are *paired*); the RMSE of x_0
against an adaptive reference (`adaptive_exp` at `ref_tol`, checked against a looser solve at `check_tol`); the
mean confidence of a logistic-regression digits classifier (`metrics.fit_classifier`, trained on the
training split).

Cost. A network call costs about 1.3 ms per sample on one CPU thread, so not every peer × grid fits at
n ≥ 1,000 in ten minutes. Two stages, on the same noise: every peer × grid runs on the first `screen`
samples (where the reference is computed, so its RMSE is exact for every run), then the `finalists` peers with
the smallest screening Fréchet distance and the `finalists` with the smallest RMSE (+ DDIM) are completed to all
n samples. "Best peer" by Fréchet distance = the finalist with the smallest distance on all n samples, picked on
the evaluation samples themselves: that favours the peers (conservative for probflow). `screen >= n` runs
everything on all n.

Run: `python benchmarks/digits_quality.py --out benchmarks/DIGITS.md [--force] [--samples N]` (writes the
numbers as JSON beside it; the report names its command). `QUICK` is the tests' small variant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import heldout_study
import numpy as np
import torch
from digits_quality_report import key as _rkey
from digits_quality_report import markdown
from torch import Tensor

from probflow import calibrate as _calibrate
from probflow import grids as _grids
from probflow.bench import peers as _peers
from probflow.bench.reference import reference as _reference
from probflow.digits import metrics as _metrics
from probflow.digits.data import load_split
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.io.atomic import atomic_write, check_writable

__all__ = ["RECOMMENDED", "CAL_METHODS", "SEED", "CAL_SEED", "recommended_grid", "fit_rows", "bootstrap_fd",
           "interval", "quality", "markdown", "QUICK", "main"]

# The README's recommendation per NFE ("Recommendation, from the held-out numbers"): method and grid name.
RECOMMENDED = {10: ("unipc", "log_snr_tuned"), 20: ("unipc_3", "tuned")}
CAL_METHODS = {10: "unipc", 20: "unipc_3"}  # "calibrate once per NFE (`unipc` at 10, `unipc_3` at 20 and 50)"
SEED = 5  # evaluation noise; no digits run of the project uses it (the card and `bench` use 0)
CAL_SEED = 1234  # calibration noise (`calibrate.calibrated_builder`'s default), never evaluated on
LEVEL = 0.95


# ------------------------------------------------------------------------------------------------ statistics


def fit_rows(x: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of the rows of x (n, D), each row taken `counts[i]` times (a bootstrap
    resample given by its counts; None: once each) — the same as `metrics.gaussian_fit(x[idx])`."""
    x = np.asarray(x, np.float64)
    if counts is None:
        return _metrics.gaussian_fit(x)
    w = np.asarray(counts, np.float64)
    m = w.sum()
    mu = w @ x / m
    d = x - mu
    return mu, (d.T * w) @ d / (m - 1)


def bootstrap_fd(samples: dict[str, np.ndarray], test: np.ndarray, resamples: int, seed: int = 0
                 ) -> dict[str, np.ndarray]:
    """Fréchet distance to `test` of every run in `samples` (name → (n, D), the same n, row i of every run from
    the same noise) on `resamples` bootstrap resamples of the rows: one index set per replicate, shared by all
    runs (paired). Returns name → (resamples,) distances; the test split is held fixed."""
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples: expected a positive integer, got {resamples!r}")
    ns = {len(v) for v in samples.values()}
    if len(ns) != 1:
        raise ValueError(f"samples: expected runs of one sample count, got {sorted(ns)}")
    n = ns.pop()
    mu_t, cov_t = _metrics.gaussian_fit(test)
    rng = np.random.default_rng(seed)
    out = {k: np.empty(resamples) for k in samples}
    for b in range(resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        for k, x in samples.items():
            out[k][b] = _metrics.frechet_distance(*fit_rows(x, counts), mu_t, cov_t)
    return out


def interval(values: np.ndarray, level: float = LEVEL, point: float | None = None) -> tuple[float, float]:
    """A bootstrap interval from replicates `values`: the percentile interval (their (1 − level)/2 and
    (1 + level)/2 quantiles q_lo, q_hi), or with the estimate `point` the basic one, (2·point − q_hi,
    2·point − q_lo), which removes the bootstrap's own bias to first order (a Fréchet distance of resampled
    rows is biased upwards, like the estimate itself: the replicates sit above it)."""
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(values, np.float64), [a, 1.0 - a])
    if point is None:
        return float(lo), float(hi)
    return float(2 * point - hi), float(2 * point - lo)


def _rmse_ratio_interval(e_a: np.ndarray, e_b: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile interval of RMSE_a / RMSE_b over samples resampled with replacement (paired; e: per-sample
    mean squared errors)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(e_a), (resamples, len(e_a)))
    return interval(np.sqrt(e_a[idx].mean(1) / e_b[idx].mean(1)))


# ------------------------------------------------------------------------------------------------ solving


def recommended_grid(schedule, method: str, grid: str, nfe: int) -> Tensor:
    """The σ grid of a recommended (method, grid name) at `nfe`: "tuned" is `heldout_study.tuned_grid` (at NFE 20 for
    unipc_3: log-SNR uniform from σ_max to 2σ_0), other names are `probflow.grids.NAMED`."""
    steps = heldout_study.steps_for(method, nfe)
    if grid == "tuned":
        return heldout_study.tuned_grid(schedule, steps, method, nfe)
    return _grids.named(grid, schedule, steps)


def _float32_eps(model):
    """The network in its own dtype inside a float64 state (as `probflow.bench.runner` drives peers)."""
    dtype = getattr(model, "model_dtype", None)
    if dtype is None:
        return model

    def eps(x: Tensor, sigma: Tensor) -> Tensor:
        return model(x.to(dtype), sigma.to(dtype)).to(x.dtype)

    return eps


class _Ctx:
    """The model, its schedule, the shared noise and the reference subset."""

    def __init__(self, model, z: Tensor, screen: int) -> None:
        self.model, self.z, self.screen = model, z, screen
        self.schedule = model.schedule
        self.dtype = getattr(model, "model_dtype", None)
        self.scale = math.sqrt(1.0 + self.schedule.sigma_max ** 2)

    def field(self) -> DDIMField:
        return DDIMField(self.model, model_dtype=self.dtype)

    def ours(self, method: str, sig: Tensor, z: Tensor) -> tuple[Tensor, int]:
        sol = integrate(self.field(), z * self.scale, sig, method)
        return sol.x, sol.nfe

    def peer(self, name: str, grid: str, nfe: int, z: Tensor) -> tuple[Tensor, int]:
        r = _peers.run_peer(name, _float32_eps(self.model), z, self.schedule, _peers.steps_for_nfe(name, nfe), grid)
        return r.x, r.nfe


def _calibrated_grids(c: _Ctx, nfes, n_cal: int, ref_tol: float, max_evals: int, say) -> dict:
    """Per NFE: `calibrate.calibrated` for CAL_METHODS[nfe] on `n_cal` samples of noise seed CAL_SEED (its own
    reference: adaptive_exp at `ref_tol`), start grid log_snr_tuned's (σ_max … 3σ_0)."""
    zc = noise(n_cal, tuple(c.z.shape[1:]), CAL_SEED)
    ends = torch.tensor([c.schedule.sigma_max, 0.0], dtype=torch.float64)
    t0 = time.perf_counter()
    f = c.field()
    ref = integrate(f, zc * c.scale, ends, "adaptive_exp", rtol=ref_tol, atol=ref_tol).x
    out = {"samples": n_cal, "seed": CAL_SEED, "ref": f"adaptive_exp rtol = atol = {ref_tol:g}", "ref_nfe": f.nfe,
           "max_evals": max_evals, "grids": {}, "nfe": {}, "wall_s": {}}
    out["wall_s"]["reference"] = time.perf_counter() - t0
    for n in nfes:
        m = CAL_METHODS[n]
        f, t0 = c.field(), time.perf_counter()
        g = _calibrate.calibrated(f, zc, c.schedule.sigma_max, 3.0 * c.schedule.sigma_min,
                                  heldout_study.steps_for(m, n), m, max_evals=max_evals, reference=ref)
        out["grids"][n], out["nfe"][n], out["wall_s"][n] = g, f.nfe, time.perf_counter() - t0
        say(f"calibrated grid for {m} at NFE {n}: {f.nfe} batch calls on {n_cal} samples, "
            f"{out['wall_s'][n]:.0f} s")
    return out


def _row(family: str, method: str, grid: str, nfe_target: int, x: Tensor, nfe: int, ref: Tensor, wall: float
         ) -> dict:
    k = len(ref)
    per = (x[:k].double() - ref.double()).reshape(k, -1).pow(2).mean(1)
    return {"family": family, "method": method, "grid": grid, "nfe_target": nfe_target, "nfe": int(nfe),
            "rmse": float(per.mean().sqrt()), "median": float(per.sqrt().median()), "_per": per.numpy(),
            "_x": x.reshape(len(x), -1).double().numpy(), "wall_s": wall}


def _screen_peers(c: _Ctx, nfe: int, ref: Tensor, peers, fd_of, say) -> list[dict]:
    """Every peer × grid on the first `screen` samples; rows with RMSE and the screening Fréchet distance."""
    rows = []
    for name in peers:
        for g in _peers.peer_grids(name):
            t0 = time.perf_counter()
            try:
                x, used = c.peer(name, g, nfe, c.z[:c.screen])
            except (FloatingPointError, RuntimeError, ValueError) as e:
                rows.append({"family": "peer", "method": name, "grid": g, "nfe_target": nfe, "error": str(e)})
                continue
            r = _row("peer", name, g, nfe, x, used, ref, time.perf_counter() - t0)
            r["screen_fd"] = fd_of(r["_x"])
            rows.append(r)
            say(f"  screen NFE {nfe} {name}/{g}: NFE {used}, RMSE {r['rmse']:.3e}, FD({c.screen}) "
                f"{r['screen_fd']:.3f}")
    return rows


def _finalists(rows: list[dict], k: int) -> list[dict]:
    """DDIM, the k smallest screening Fréchet distances and the k smallest RMSEs (runs that finished, NFE ≤
    target)."""
    ok = [r for r in rows if "error" not in r and r["nfe"] <= r["nfe_target"]]
    pick = [r for r in ok if r["method"] == "ddim"]
    pick += sorted(ok, key=lambda r: r["screen_fd"])[:k] + sorted(ok, key=lambda r: r["rmse"])[:k]
    out, seen = [], set()
    for r in pick:
        if id(r) not in seen:
            seen.add(id(r))
            out.append(r)
    return out


# ------------------------------------------------------------------------------------------------ the study


def _ours(c: _Ctx, nfe: int, ref: Tensor, cal: dict | None) -> list[dict]:
    rows = []
    method, grid = RECOMMENDED[nfe]
    variants = [(method, grid, recommended_grid(c.schedule, method, grid, nfe))]
    if cal is not None:
        variants.append((CAL_METHODS[nfe], "calibrated", cal["grids"][nfe]))
    for m, g, sig in variants:
        t0 = time.perf_counter()
        x, used = c.ours(m, sig, c.z)
        rows.append(_row("probflow", m, g, nfe, x, used, ref, time.perf_counter() - t0))
        rows[-1]["sigmas"] = [float(s) for s in sig]
    return rows


def _complete(c: _Ctx, r: dict) -> None:
    """Run a screened peer on the remaining samples (the same noise) and append them to its x."""
    t0 = time.perf_counter()
    x, _ = c.peer(r["method"], r["grid"], r["nfe_target"], c.z[c.screen:])
    r["_x"] = np.concatenate([r["_x"], x.reshape(len(x), -1).double().numpy()])
    r["wall_s"] += time.perf_counter() - t0


def _summarise(rows: list[dict], full: list[dict], boot: dict, clf, resamples: int, seed: int) -> dict:
    """Per NFE: each full-n run's FD (basic and percentile intervals), confidence; best peers; the paired
    differences."""
    for r in full:
        r["fd"] = r["_fd"]
        r["fd_lo"], r["fd_hi"] = interval(boot[id(r)], point=r["fd"])
        r["fd_pct_lo"], r["fd_pct_hi"] = interval(boot[id(r)])
        r["confidence"] = float(_metrics.confidence(clf, r["_x"]).mean())
    ours = [r for r in full if r["family"] == "probflow"]
    peers_full = [r for r in full if r["family"] == "peer"]
    peers_all = [r for r in rows if r["family"] == "peer" and "error" not in r and r["nfe"] <= r["nfe_target"]]
    best_fd = min(peers_full, key=lambda r: r["fd"])
    best_rmse = min(peers_all, key=lambda r: r["rmse"])
    ddim = next(r for r in peers_all if r["method"] == "ddim")
    out = {"best_peer_fd": _rkey(best_fd), "best_peer_rmse": _rkey(best_rmse), "ddim": _rkey(ddim), "compare": []}
    for r in ours:
        d, diff = boot[id(r)] - boot[id(best_fd)], r["fd"] - best_fd["fd"]
        (lo, hi), (plo, phi) = interval(d, point=diff), interval(d)
        rr = _rmse_ratio_interval(r["_per"], best_rmse["_per"], resamples, seed + 1)
        out["compare"].append({"ours": _rkey(r), "fd_diff": diff, "fd_diff_lo": lo, "fd_diff_hi": hi,
                               "fd_diff_pct_lo": plo, "fd_diff_pct_hi": phi, "fd_no_worse": lo <= 0.0,
                               "fd_no_worse_percentile": plo <= 0.0, "rmse_ratio": r["rmse"] / best_rmse["rmse"],
                               "rmse_ratio_lo": rr[0], "rmse_ratio_hi": rr[1],
                               "rmse_lower": r["rmse"] < best_rmse["rmse"], "median_ours": r["median"],
                               "median_best_peer_rmse": best_rmse["median"], "rmse_vs_ddim": r["rmse"] / ddim["rmse"]})
    return out


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


def _check_args(nfe, n: int, screen: int, finalists: int, resamples: int, cal_samples: int) -> None:
    for name, v, lo in (("n", n, 2), ("screen", screen, 2), ("finalists", finalists, 1), ("resamples", resamples, 1),
                        ("cal_samples", cal_samples, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    bad = [k for k in nfe if k not in RECOMMENDED]
    if bad or not nfe:
        raise ValueError(f"nfe: expected some of {sorted(RECOMMENDED)} (the README's recommendations), got {list(nfe)}")


def quality(model=None, nfe=(10, 20), n: int = 1024, seed: int = SEED, *, screen: int = 128, finalists: int = 3,
            resamples: int = 1000, ref_tol: float = 1e-4, check_tol: float = 3e-4, cal_samples: int = 16,
            cal_max_evals: int = 100, peers=None, progress: bool = True) -> dict:
    """The study of the module doc on `model` (default: the shipped digits network); see there for every knob.
    Returns a JSON-able dict: settings, the reference and its check, the calibration, and per NFE the rows (every
    run's RMSE on the first `screen` samples; full-n runs also FD, its interval and mean confidence) and a
    summary (best peers, the paired FD difference and RMSE ratio of each probflow row against them)."""
    _check_args(tuple(nfe), n, screen, finalists, resamples, cal_samples)
    if not 0 < ref_tol < check_tol:
        raise ValueError(f"ref_tol, check_tol: expected 0 < ref_tol < check_tol, got {ref_tol}, {check_tol}")
    t_start = time.perf_counter()
    say = (lambda m: print(f"digits_quality: {m}", file=sys.stderr, flush=True)) if progress else (lambda m: None)
    if model is None:
        from probflow.models import load

        model = load("digits")
    peers = _peers.peer_names() if peers is None else list(peers)
    screen = min(screen, n)
    split = load_split()
    test = split["x_test"].reshape(len(split["x_test"]), -1).double().numpy()
    clf, acc = _metrics.fit_classifier(split)
    mu_t, cov_t = _metrics.gaussian_fit(test)

    def fd_of(x):
        return _metrics.frechet_distance(*_metrics.gaussian_fit(x), mu_t, cov_t)

    c = _Ctx(model, noise(n, tuple(getattr(model, "sample_shape", None) or (1, 8, 8)), seed), screen)
    say(f"reference: adaptive_exp at {ref_tol:g} on the first {screen} samples, checked at {check_tol:g} …")
    ref, ref_info = _reference(model, c.z[:screen] * c.scale, c.schedule, "adaptive_exp", ref_tol, check_tol,
                               c.dtype)
    say(f"reference: {ref_info['nfe']} NFE, check RMS {ref_info['check_rmse']:.2e}")
    cal = _calibrated_grids(c, nfe, cal_samples, ref_tol, cal_max_evals, say) if cal_samples else None
    out = {"n": n, "seed": seed, "screen": screen, "finalists": finalists, "resamples": resamples, "level": LEVEL,
           "peers": peers, "reference": ref_info, "frechet_floor_train_vs_test": fd_of(
               split["x_train"].reshape(len(split["x_train"]), -1).double().numpy()),
           "test_images": len(test), "classifier_test_accuracy": acc,
           "test_split_mean_confidence": float(_metrics.confidence(clf, test).mean()),
           "model_fingerprint": getattr(model, "fingerprint", None), "nfe": {}}
    if cal is not None:
        out["calibration"] = {**{k: v for k, v in cal.items() if k != "grids"},
                              "grids": {k: [float(s) for s in g] for k, g in cal["grids"].items()}}
    for k in nfe:
        say(f"NFE {k}: probflow rows on all {n} samples …")
        ours = _ours(c, k, ref, cal)
        rows = _screen_peers(c, k, ref, peers, fd_of, say)
        full = _finalists(rows, finalists)
        for r in full:
            say(f"  completing {r['method']}/{r['grid']} to {n} samples …")
            if screen < n:
                _complete(c, r)
        for r in ours + full:
            r["_fd"] = fd_of(r["_x"])
            r["screen_fd"] = r.get("screen_fd", fd_of(r["_x"][:screen]))
        boot = bootstrap_fd({id(r): r["_x"] for r in ours + full}, test, resamples, seed)
        summary = _summarise(rows, ours + full, boot, clf, resamples, seed)
        out["nfe"][k] = {"rows": [_public(r) for r in ours + rows], "summary": summary}
        say(f"NFE {k}: " + "; ".join(f"{s['ours']} FD diff {s['fd_diff']:+.4f} [{s['fd_diff_lo']:+.4f}, "
                                    f"{s['fd_diff_hi']:+.4f}], RMSE ratio {s['rmse_ratio']:.2f}"
                                    for s in summary["compare"]))
    out["wall_s"] = time.perf_counter() - t_start
    return out


# The quick variant (tests): 64 samples, NFE 10, DDIM and UniPC peers, 200 resamples, a loose reference, no
# calibration.
QUICK = {"nfe": (10,), "n": 64, "screen": 16, "finalists": 1, "resamples": 200, "ref_tol": 1e-3, "check_tol": 1e-2,
         "cal_samples": 0, "peers": ("ddim", "unipc")}


# ------------------------------------------------------------------------------------------------ command


_CLI_NAMES = {"n": "--samples", "nfe": "--nfe", "screen": "--screen", "finalists": "--finalists",
              "resamples": "--resamples", "cal_samples": "--cal-samples"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _to_json(res: dict) -> str:
    def conv(o):
        if isinstance(o, dict):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        if isinstance(o, np.bool_):
            return bool(o)
        return o

    return json.dumps(conv(res), indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="benchmarks/digits_quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the markdown report (written atomically)")
    p.add_argument("--json", default=None, help="the numbers as JSON (default: digits_quality.json beside --out)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--samples", type=int, default=1024, help="samples per run (default 1024)")
    p.add_argument("--seed", type=int, default=SEED, help=f"evaluation noise seed (default {SEED})")
    p.add_argument("--screen", type=int, default=128, help="samples with a reference; every peer runs on them")
    p.add_argument("--finalists", type=int, default=3, help="peers by screening FD (and RMSE) run on all samples")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--cal-samples", type=int, default=16, help="calibration samples (0: no calibrated rows)")
    p.add_argument("--nfe", default="10,20", help="comma-separated NFE among 10, 20")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        nfe = tuple(int(v) for v in a.nfe.split(","))
    except ValueError:
        p.error(f"--nfe: expected comma-separated integers, got {a.nfe!r}")
    jpath = Path(a.json) if a.json else Path(a.out).with_name("digits_quality.json")
    try:
        _check_args(nfe, a.samples, a.screen, a.finalists, a.resamples, a.cal_samples)
        for path, name in ((a.out, "--out"), (jpath, "--json")):
            check_writable(path, a.force, name)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        msg, _, rest = str(e).partition(": ")
        p.error(f"{_CLI_NAMES.get(msg, msg)}: {rest}")
    res = quality(nfe=nfe, n=a.samples, seed=a.seed, screen=a.screen, finalists=a.finalists, resamples=a.resamples,
                  cal_samples=a.cal_samples)
    cmd = "python benchmarks/digits_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(res, cmd)
    atomic_write(jpath, lambda tmp: Path(tmp).write_text(_to_json(res), encoding="utf-8"), a.force, "--json")
    atomic_write(a.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), a.force, "--out")
    print(f"wrote {a.out} and {jpath} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
