"""`benchmarks/digits_quality.py` (a study script, not part of the package): the bootstrap against independent
computations (scipy's matrix square root, scipy.stats.bootstrap, simulated Gaussians with a known Fréchet distance),
and the quick study on the digits network: its numbers reproduced by independent code, the table made from them, and
properties that can fail (the reference tighter than the errors it measures, the recommended solver more accurate
than DDIM)."""

import importlib
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from probflow import grids
from probflow.digits import metrics
from probflow.digits.data import load_split
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.models import load

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
dq = importlib.import_module("digits_quality")


def _fd_scipy(x, y):
    """Fréchet distance of Gaussians fitted to the rows of x and y, with scipy's sqrtm (no probflow code)."""
    m1, m2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():  # the test split has constant pixels: singular covariances are expected
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        cross = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(cross))


def test_weighted_fit_is_the_fit_of_the_resampled_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 5))
    idx = rng.integers(0, 50, 50)
    mu, cov = dq.fit_rows(x, np.bincount(idx, minlength=50))
    assert np.allclose(mu, x[idx].mean(0), atol=1e-13)
    assert np.allclose(cov, np.cov(x[idx], rowvar=False), atol=1e-13)


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    a, b = np.array([0.5, 2.0, 1.0]), np.array([1.5, 0.5, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)


def test_paired_bootstrap_matches_an_independent_loop():
    rng = np.random.default_rng(1)
    test = rng.standard_normal((40, 4))
    a = rng.standard_normal((60, 4))
    b = a * 0.8 + 0.1 * rng.standard_normal((60, 4))
    boot = dq.bootstrap_fd({"a": a, "b": b}, test, 30, seed=7)
    draws = np.random.default_rng(7)  # the same index sets, resampled rows, scipy's sqrtm
    for i in range(30):
        idx = draws.integers(0, 60, 60)
        assert boot["a"][i] == pytest.approx(_fd_scipy(a[idx], test), rel=1e-7, abs=1e-9)
        assert boot["b"][i] == pytest.approx(_fd_scipy(b[idx], test), rel=1e-7, abs=1e-9)


def test_basic_interval_of_a_difference_agrees_with_scipy_stats_bootstrap():
    rng = np.random.default_rng(2)
    test = rng.standard_normal((80, 3))
    a = rng.standard_normal((150, 3))
    b = 1.1 * a + 0.2 * rng.standard_normal((150, 3)) + 0.1

    def diff(i):
        i = np.asarray(i, dtype=int)
        return _fd_scipy(a[i], test) - _fd_scipy(b[i], test)

    point = diff(np.arange(150))
    boot = dq.bootstrap_fd({"a": a, "b": b}, test, 2000, seed=0)
    lo, hi = dq.interval(boot["a"] - boot["b"], point=point)
    ref = scipy.stats.bootstrap((np.arange(150),), diff, vectorized=False, n_resamples=2000, method="basic",
                                confidence_level=0.95, random_state=np.random.default_rng(3)).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.15 * width and abs(hi - ref.high) < 0.15 * width


def test_basic_interval_covers_the_true_distance_where_the_percentile_interval_does_not():
    """Gaussians with known parameters (D = 8, n = 128, a fixed test set of 90): the Fréchet distance of the
    true generators to the test set's fit is known exactly; the basic interval covers it (and the true paired
    difference) in most repeats, the percentile interval, shifted by the estimate's bias, far less often."""
    rng = np.random.default_rng(4)
    d, n = 8, 128
    lt = np.linalg.cholesky(0.3 * np.cov(rng.standard_normal((3 * d, d)), rowvar=False) + 0.05 * np.eye(d))
    test = rng.standard_normal((90, d)) @ lt.T
    mu_t, cov_t = metrics.gaussian_fit(test)
    lb, mub = 0.9 * lt, np.full(d, 0.05)
    fa = metrics.frechet_distance(np.zeros(d), lt @ lt.T, mu_t, cov_t)
    fb = metrics.frechet_distance(mub, lb @ lb.T, mu_t, cov_t)
    hits = {"basic": 0, "percentile": 0, "basic diff": 0}
    repeats = 30
    for r in range(repeats):
        z = rng.standard_normal((n, d))
        xa, xb = z @ lt.T, z @ lb.T + mub  # paired: the same z
        ea, eb = (metrics.frechet_distance(*metrics.gaussian_fit(x), mu_t, cov_t) for x in (xa, xb))
        boot = dq.bootstrap_fd({"a": xa, "b": xb}, test, 200, seed=r)
        lo, hi = dq.interval(boot["a"], point=ea)
        hits["basic"] += lo <= fa <= hi
        lo, hi = dq.interval(boot["a"])
        hits["percentile"] += lo <= fa <= hi
        lo, hi = dq.interval(boot["a"] - boot["b"], point=ea - eb)
        hits["basic diff"] += lo <= fa - fb <= hi
    assert hits["basic"] >= 0.8 * repeats and hits["basic diff"] >= 0.8 * repeats, hits
    assert hits["percentile"] < hits["basic"] - 0.3 * repeats, hits


def test_recommended_grids_are_the_readme_recommendation():
    sch = load("digits").schedule
    assert dq.RECOMMENDED == {10: ("unipc", "log_snr_tuned"), 20: ("unipc_3", "tuned")}
    assert torch.equal(dq.recommended_grid(sch, "unipc", "log_snr_tuned", 10), grids.log_snr_tuned(sch, 10))
    expect = grids.log_uniform(sch.sigma_max, 2 * sch.sigma_min, 20)  # "log-SNR uniform to 2σ₀"
    assert torch.allclose(dq.recommended_grid(sch, "unipc_3", "tuned", 20), expect, rtol=1e-14, atol=0)


@pytest.fixture(scope="module")
def quick():
    torch.set_num_threads(1)
    return dq.quality(**dq.QUICK, progress=False)


def _row(res, family, method, grid, nfe=10):
    return next(r for r in res["nfe"][nfe]["rows"] if (r["family"], r["method"], r["grid"]) == (family, method, grid))


def test_quick_study_reference_is_far_tighter_than_the_errors_it_measures(quick):
    ddim = _row(quick, "peer", "ddim", "trailing")
    assert quick["reference"]["check_rmse"] < 0.2 * ddim["rmse"]


def test_quick_study_recommended_solver_beats_ddim_at_equal_nfe(quick):
    ours = _row(quick, "probflow", "unipc", "log_snr_tuned")
    ddim = _row(quick, "peer", "ddim", "trailing")
    assert ours["nfe"] == ddim["nfe"] == 10
    assert ours["rmse"] < 0.7 * ddim["rmse"]
    assert quick["nfe"][10]["summary"]["compare"][0]["rmse_vs_ddim"] == pytest.approx(ours["rmse"] / ddim["rmse"])


def test_quick_study_numbers_are_reproduced_by_independent_code(quick):
    """DDIM's RMSE from probflow's euler (DDIM = Euler on Eq. 12) against a fresh reference; the recommended
    row's Fréchet distance from its samples and scipy's sqrtm."""
    model = load("digits")
    sch, q = model.schedule, dq.QUICK
    z = noise(q["n"], (1, 8, 8), quick["seed"])
    xb = z * math.sqrt(1 + sch.sigma_max**2)
    f = DDIMField(model, model_dtype=torch.float32)
    k = quick["screen"]
    ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    ref = integrate(f, xb[:k], ends, "adaptive_exp", rtol=q["ref_tol"], atol=q["ref_tol"]).x
    euler = integrate(f, xb[:k], grids.ddim(sch, 10), "euler").x
    rmse = float((euler - ref).pow(2).mean().sqrt())
    assert _row(quick, "peer", "ddim", "trailing")["rmse"] == pytest.approx(rmse, rel=1e-4)
    ours = integrate(f, xb, grids.log_snr_tuned(sch, 10), "unipc").x.reshape(len(z), -1).numpy()
    test = load_split()["x_test"].reshape(-1, 64).double().numpy()
    assert _row(quick, "probflow", "unipc", "log_snr_tuned")["fd"] == pytest.approx(_fd_scipy(ours, test), rel=1e-6)


def test_quick_study_report_is_made_from_the_measured_numbers(quick):
    text = dq.markdown(quick, "CMD")
    s = quick["nfe"][10]["summary"]
    c = s["compare"][0]
    line = next(ln for ln in text.splitlines() if ln.startswith("| 10 | probflow `unipc/log_snr_tuned`"))
    ours = _row(quick, "probflow", "unipc", "log_snr_tuned")
    cells = [x.strip() for x in line.split("|")]
    assert cells[3] == f"{ours['fd']:.3f} [{ours['fd_lo']:.3f}, {ours['fd_hi']:.3f}]"
    assert cells[6] == f"{c['fd_diff']:+.3f} [{c['fd_diff_lo']:+.3f}, {c['fd_diff_hi']:+.3f}]"
    assert cells[7] == ("yes" if c["fd_no_worse"] else "**no**")
    assert cells[8] == f"{ours['rmse']:.2e}"
    assert cells[9] == f"diffusers `{s['best_peer_rmse'].split(':')[1]}`"
    assert c["fd_no_worse"] == (c["fd_diff_lo"] <= 0) and c["fd_diff_lo"] <= c["fd_diff_hi"]
    peers_run = [r for r in quick["nfe"][10]["rows"] if r["family"] == "peer"]
    assert len(peers_run) == 1 + 5  # ddim on its one grid, unipc on all five
    assert re.search(r"wall time \d+ s", text) and "CMD" in text


@pytest.mark.parametrize("args, words", [
    (["--samples", "1"], "--samples: expected an integer >= 2"),
    (["--nfe", "7"], "--nfe: expected some of [10, 20]"),
    (["--nfe", "x"], "--nfe: expected comma-separated integers"),
    (["--samples", "abc"], "--samples: invalid int value"),
    (["--resamples", "0"], "--resamples: expected an integer >= 1"),
    (["--cal-samples", "-1"], "--cal-samples: expected an integer >= 0"),
])
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        dq.main(["--out", str(tmp_path / "D.md"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err
    assert not list(tmp_path.iterdir())


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    (tmp_path / "D.md").write_text("old")
    with pytest.raises(SystemExit) as e:
        dq.main(["--out", str(tmp_path / "D.md")])
    assert e.value.code == 2
    assert "exists; pass --force" in capsys.readouterr().err and (tmp_path / "D.md").read_text() == "old"
