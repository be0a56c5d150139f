"""`probflow.fit.fit_recipe` / `optimise_grid` / `warped`: the per-model fitted grid lowers the error on
fresh noise (never fitted on) against its start grid on an analytic mixture (exact ε), the warp is a monotone
reparametrisation of the start grid, and the fit counts its model calls."""

import math

import pytest
import torch

from probflow import fit as C
from probflow.bench.heldout import DiagonalMixture
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.schedules import linear


def _mixture():
    """Three sharp anisotropic components (std 0.03–0.15) with means 2 apart: far enough that no sample ends in
    another component than its exact solution, so the RMSE measures the grid, not which samples switch mode."""
    g = torch.Generator().manual_seed(3)
    k, d = 3, 8
    means = 2.0 * torch.eye(k, d, dtype=torch.float64)
    std = 0.03 * torch.exp(torch.rand(k, d, generator=g, dtype=torch.float64) * math.log(5.0))
    return DiagonalMixture(torch.ones(k, dtype=torch.float64), means, std**2)


def _rmse(model, sch, grid, method, z):
    xb = z * math.sqrt(1 + sch.sigma_max**2)
    ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    ref = integrate(model, xb, ends, "scipy_dop853", rtol=1e-11, atol=1e-11, options={"group": len(z)}).x
    return float((integrate(DDIMField(model), xb, grid, method).x - ref).pow(2).mean().sqrt())


def test_warped_is_the_start_at_zero_and_monotone_with_its_end_clipped():
    sch = linear()
    start = C.candidate_grids(sch, 12)["t^2.5/0.03"]
    assert torch.allclose(C.warped(start, [0.0] * 5, sch.sigma_min), start, rtol=1e-12, atol=0)
    g = C.warped(start, [1.5, 2.0, -1.0, 0.5, -3.0], sch.sigma_min)
    assert len(g) == len(start) and float(g[0]) == float(start[0]) and float(g[-1]) == 0.0
    assert (g[1:] < g[:-1]).all() and float(g[-2]) == pytest.approx(0.03 * math.exp(1.5), rel=1e-9)
    low = C.warped(start, [-10.0, 0.0, 0.0], sch.sigma_min)  # the end never goes below the floor σ_0
    assert float(low[-2]) == pytest.approx(sch.sigma_min, rel=1e-9)


def test_fitted_grid_beats_its_start_grid_on_fresh_noise():
    torch.set_num_threads(1)
    sch, model = linear(), _mixture()
    x, xv = noise(16, (8,), 11), noise(16, (8,), 12)
    f = C.fit_recipe(model, x, xv, sch, 10, max_evals=80)
    start = C.candidate_grids(sch, 10)[f.start]
    assert f.method in C.FIT_METHODS and len(f.grid) == 11 and float(f.grid[-1]) == 0.0
    assert f.cal_rmse[1] <= f.cal_rmse[0] and f.kept  # kept on validation
    fresh = noise(64, (8,), 99)  # neither batch it was fitted or validated on
    e_fit, e_start = _rmse(model, sch, f.grid, f.method, fresh), _rmse(model, sch, start, f.method, fresh)
    assert e_fit < 0.8 * e_start, (e_fit, e_start)  # measured 0.53
    # cost: two references + 2 methods × 20 candidates + the optimiser's ≤ 80 + 1 solves + 2 validations, × 10
    assert 10 * (40 + 2) < f.calls <= 10 * (40 + 81 + 2) + 20_000


def test_fit_recipe_refuses_bad_batches_and_methods():
    sch, model = linear(), _mixture()
    with pytest.raises(ValueError, match="x_val"):
        C.fit_recipe(model, noise(4, (8,), 1), noise(4, (7,), 2), sch, 10)
    with pytest.raises(ValueError, match="methods"):
        C.fit_recipe(model, noise(4, (8,), 1), noise(4, (8,), 2), sch, 10, methods=("unipc", "dpmpp_3m"))
    with pytest.raises(ValueError, match="bins"):
        C.optimise_grid(model, noise(4, (8,), 1), noise(4, (8,), 1), C.candidate_grids(sch, 5)["logsnr/0.03"],
                        "unipc", sigma_floor=sch.sigma_min, bins=0)


def test_error_leaves_out_the_worst_samples_only():
    sch, model = linear(), _mixture()
    xb = noise(4, (8,), 5) * math.sqrt(1 + sch.sigma_max**2)
    grid = C.candidate_grids(sch, 6)["logsnr/0.03"]
    out = integrate(DDIMField(model), xb, grid, "unipc").x
    ref = out.clone()
    ref[2] += 1.0  # one sample 1.0 off in every coordinate
    ref[0] += 0.1  # another 0.1 off, the others exact
    field = DDIMField(model)
    assert C._solve_error(field, xb, grid, "unipc", ref) == pytest.approx(math.sqrt(1.01 / 4), rel=1e-9)
    assert C._solve_error(field, xb, grid, "unipc", ref, 1) == pytest.approx(math.sqrt(0.01 / 3), rel=1e-9)
    assert C._solve_error(field, xb, grid, "unipc", ref, 2) == pytest.approx(0.0, abs=1e-12)
    for bad in (4, -1, 0.5, True):
        with pytest.raises(ValueError, match="drop_worst"):
            C.fit_recipe(model, noise(4, (8,), 1), noise(4, (8,), 2), sch, 10, drop_worst=bad)
    for bad in (1.0, 0, True, "10"):
        with pytest.raises(ValueError, match="jump"):
            C.fit_recipe(model, noise(4, (8,), 1), noise(4, (8,), 2), sch, 10, jump=bad)


def _sq(values):
    return torch.tensor([v * v for v in values], dtype=torch.float64)


def test_validation_rejects_a_fit_that_hides_one_jumped_sample():
    # start: every sample at 1e-3; fit: 31 samples twice as good, sample 7 sent into another mode (error 0.5)
    start = _sq([1e-3] * 32)
    fit = _sq([5e-4] * 7 + [0.5] + [5e-4] * 24)
    assert C._confirmed(start, fit, 1, jump=None)  # the trimmed RMSE leaves the jump out: the old rule keeps it
    assert not C._confirmed(start, fit, 1, jump=10.0)
    # a sample that the start grid switches too (same noise) is no new jump: the fit's gain elsewhere counts
    start_j = _sq([1e-3] * 7 + [0.4] + [1e-3] * 24)
    assert C._confirmed(start_j, fit, 1, jump=10.0)
    # ... but the same jump on another sample than the start's is one
    assert not C._confirmed(_sq([1e-3] * 8 + [0.4] + [1e-3] * 23), fit, 1, jump=10.0)
    # a fit better on every sample is confirmed; one worse on the trimmed RMSE is not
    assert C._confirmed(start, _sq([5e-4] * 31 + [9e-4]), 1, jump=10.0)
    assert not C._confirmed(start, _sq([2e-3] * 32), 1, jump=10.0)
    # a failed solve is never confirmed; a failed start leaves any finite fit
    assert not C._confirmed(start, None, 1, jump=10.0) and C._confirmed(None, fit, 1, jump=10.0)


def test_trust_bounds_the_warp_to_the_start_grids_step_density():
    torch.set_num_threads(1)
    sch, model = linear(), _mixture()
    xb = noise(16, (8,), 21) * math.sqrt(1 + sch.sigma_max**2)
    ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    ref = integrate(model, xb, ends, "scipy_dop853", rtol=1e-11, atol=1e-11, options={"group": 16}).x
    start = C.candidate_grids(sch, 10)["logsnr/0.03"]
    free, _ = C.optimise_grid(model, xb, ref, start, "unipc", sigma_floor=sch.sigma_min, bins=4, max_evals=60)
    tight, _ = C.optimise_grid(model, xb, ref, start, "unipc", sigma_floor=sch.sigma_min, bins=4, max_evals=60,
                               trust=1e-12)
    lg, lt, lf = (torch.log(g[:-1]) for g in (start, tight, free))
    # with no room for the density only the end point moves: log σ is the start's, rescaled affinely
    expect = lg[0] + (lg - lg[0]) * (lt[-1] - lg[0]) / (lg[-1] - lg[0])
    assert torch.allclose(lt, expect, rtol=0, atol=1e-9)
    assert not torch.allclose(lf, lg[0] + (lg - lg[0]) * (lf[-1] - lg[0]) / (lg[-1] - lg[0]), atol=1e-6)
    with pytest.raises(ValueError, match="trust"):
        C.optimise_grid(model, xb, ref, start, "unipc", sigma_floor=0.01, trust=0.0)


def test_fit_recipe_returns_the_start_grid_when_the_fit_switches_one_validation_sample(monkeypatch):
    torch.set_num_threads(1)
    sch, model = linear(), _mixture()
    x, xv = noise(16, (8,), 11), noise(20, (8,), 12)
    real = C._per_sample
    fitted = {}

    def switched(field, xbar, grid, method, reference, scales=None):  # validation (20 samples), fitted grid: 5 jumps
        per = real(field, xbar, grid, method, reference, scales)
        starts = C.candidate_grids(sch, len(grid) - 1).values()
        if len(xbar) == 20 and per is not None and not any(torch.equal(grid, g) for g in starts):
            fitted["grid"] = grid
            per = per.clone()
            per[5] = 0.25
        return per

    monkeypatch.setattr(C, "_per_sample", switched)
    f = C.fit_recipe(model, x, xv, sch, 10, max_evals=80, drop_worst=2, jump=10.0, coef_iters=0)
    assert "grid" in fitted and not f.kept  # the trimmed RMSE alone leaves sample 5 out and keeps it
    assert torch.equal(f.grid, C.candidate_grids(sch, 10)[f.start])
    g = C.fit_recipe(model, x, xv, sch, 10, max_evals=80, drop_worst=2, jump=None, coef_iters=0)
    assert g.kept and torch.equal(g.grid, fitted["grid"])
