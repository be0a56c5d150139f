"""Exponential integrators (probflow.exponential): measured orders against DOP853, the step into σ = 0,
agreement with diffusers' DPM-Solver++(2M) and UniPC on the same float64 grid, encoding, and the
problem-adapted grid."""

import math

import pytest
import torch

import probflow
from probflow import calibrate, grids
from probflow.exponential import METHOD_NAMES, exp_weights, zero_weights
from probflow.models import GaussianMixture
from probflow.solvers import get_method

SMOOTH = GaussianMixture.random(8, 3, seed=1, std_range=(0.3, 1.0))


def slope(xs, errs):
    lx = torch.tensor([math.log(v) for v in xs], dtype=torch.float64)
    le = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    return (((lx - lx.mean()) * (le - le.mean())).sum() / ((lx - lx.mean()) ** 2).sum()).item()


@pytest.fixture(scope="module")
def problem():
    x = probflow.noise(8, (8,), seed=2) * 10.0
    ref = {}
    for end in (0.1, 0.0):
        ends = torch.tensor([10.0, end], dtype=torch.float64)
        ref[end] = probflow.integrate(SMOOTH, x, ends, "scipy_dop853", rtol=1e-13, atol=1e-13,
                                      options={"group": 8}).x
    return x, ref


def test_registered_on_import():
    for name in METHOD_NAMES:
        assert get_method(name).backend == "probflow"


@pytest.mark.parametrize(
    "method, steps, tol",
    [
        ("dpmpp_2m", [16, 32, 64], 0.3),
        ("dpmpp_3m", [16, 32, 64], 0.5),
        ("dpmpp_2s", [16, 32, 64], 0.3),
        ("dpmpp_3s", [16, 32, 64], 0.4),
        ("unipc", [16, 32, 64], 0.4),
        ("unipc_3", [16, 32, 64], 0.6),
        ("unipc_4", [16, 32, 64], 0.6),
    ],
)
def test_exponential_method_converges_at_its_declared_order(problem, method, steps, tol):
    """σ 10 → 0.1, log-uniform grids: slope of the max error against DOP853 at 1e-13."""
    x, ref = problem
    errs = [(probflow.integrate(SMOOTH, x, grids.log_uniform(10.0, 0.1, n, final_zero=False), method).x
             - ref[0.1]).abs().max().item() for n in steps]
    order = -slope(steps, errs)
    assert abs(order - get_method(method).order) <= tol, (order, errs)


@pytest.mark.parametrize("method, min_slope", [("dpmpp_2m", 3.2), ("dpmpp_3m", 4.0), ("unipc", 3.0),
                                               ("unipc_3", 4.0), ("dpmpp_2s", 2.7), ("dpmpp_3s", 2.7)])
def test_final_step_into_zero_keeps_the_order(problem, method, min_slope):
    """Fine interior (200 steps to σ_min), then σ_min → 0: a first-order last step (x̄ = D) leaves an error
    ∝ σ_min² (euler here: slope ≤ 2); the (E3) extrapolation in σ² / the RK step in σ shrink it faster."""
    x, ref = problem
    smins = [0.2, 0.1, 0.05]

    def errs(m):
        return [(probflow.integrate(SMOOTH, x, grids.log_uniform(10.0, s, 200), m).x - ref[0.0]).abs().max().item()
                for s in smins]

    e = errs(method)
    assert slope(smins, e) >= min_slope, e
    e_euler = errs("euler")
    assert slope(smins, e_euler) <= 2.0 and e[-1] < 0.05 * e_euler[-1], (e, e_euler)


@pytest.mark.parametrize("method, nfe", [("dpmpp_2m", 12), ("dpmpp_3m", 13), ("unipc", 12), ("unipc_3", 12),
                                         ("dpmpp_2s", 24), ("dpmpp_3s", 36)])
def test_nfe_per_grid(method, nfe):
    x = probflow.noise(2, (8,), seed=3) * 10.0
    assert probflow.integrate(SMOOTH, x, grids.log_uniform(10.0, 0.05, 12), method).nfe == nfe


def test_first_order_weights_are_ddim():
    """(E1) with D constant is the DDIM/Euler step x̄ − (σ − σ_next) ε (docs/MATH.md §3), and into 0 it is D."""
    x = probflow.noise(4, (8,), seed=4) * 3.0
    s, sn = torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64)
    f = probflow.DDIMField(SMOOTH)
    eps = f(s, x)
    decay, w = exp_weights(-math.log(3.0), -math.log(1.2), [-math.log(3.0)])
    torch.testing.assert_close(decay * x + w[0] * (x - s * eps), x - (s - sn) * eps, rtol=1e-13, atol=1e-13)
    one = probflow.integrate(SMOOTH, x, torch.stack([s, sn]), "dpmpp_2m").x
    torch.testing.assert_close(one, probflow.integrate(SMOOTH, x, torch.stack([s, sn]), "euler").x,
                               rtol=1e-13, atol=1e-13)
    assert zero_weights([0.5]) == [1.0]
    w2 = zero_weights([0.5, 1.0])  # linear in σ² through 0.25, 1: value at 0
    assert w2 == pytest.approx([4 / 3, -1 / 3], rel=1e-14)


def _float64_scheduler(cls_name, sig, **config):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, prediction_type="epsilon", thresholding=False,
                                         lower_order_final=False, final_sigmas_type="sigma_min", **config)
    sched.set_timesteps(len(sig) - 1)
    sched.sigmas = sig.clone()  # the same float64 grid (non-zero end: every step is an interior step)
    sched._step_index = 0
    return sched


def _xdiff(x, s):  # diffusers' variable: x = x̄/sqrt(1+σ²)
    return x / math.sqrt(1 + float(s) ** 2)


def test_dpmpp_2m_matches_diffusers_heun_variant_in_float64():
    """diffusers DPMSolverMultistepScheduler(dpmsolver++, order 2, solver_type="heun") driven by hand in
    float64 (its `step` casts to float32) on the same σ grid: same iterates to rounding. Its first step is
    first order (warm-up), like ours; its forced first-order last step is avoided by ending at σ_min > 0."""
    sig = grids.log_uniform(80.0, 0.05, 15, final_zero=False)
    xbar = probflow.noise(4, (8,), seed=5) * math.sqrt(1 + 80.0**2)
    sched = _float64_scheduler("DPMSolverMultistepScheduler", sig, algorithm_type="dpmsolver++", solver_order=2,
                               solver_type="heun")
    x = _xdiff(xbar, sig[0])
    for i in range(len(sig) - 1):
        eps = SMOOTH(x, sig[i])
        m = sched.convert_model_output(eps, sample=x)
        sched.model_outputs = [*sched.model_outputs[1:], m]
        if sched.lower_order_nums < 1:
            x = sched.dpm_solver_first_order_update(m, sample=x)
        else:
            x = sched.multistep_dpm_solver_second_order_update(sched.model_outputs, sample=x)
        sched.lower_order_nums += 1
        sched._step_index += 1
    ours = probflow.integrate(SMOOTH, xbar, sig, "dpmpp_2m").x
    torch.testing.assert_close(_xdiff(ours, sig[-1]), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, order", [("unipc", 2), ("unipc_3", 3), ("unipc_4", 4)])
def test_unipc_matches_diffusers_in_float64(method, order):
    """diffusers UniPCMultistepScheduler (bh2, solver_order 2, 3, 4, corrector on) driven by hand in float64 on
    the same σ grid: same iterates to rounding (both return the last prediction, uncorrected)."""
    sig = grids.log_uniform(80.0, 0.05, 15, final_zero=False)
    xbar = probflow.noise(4, (8,), seed=6) * math.sqrt(1 + 80.0**2)
    sched = _float64_scheduler("UniPCMultistepScheduler", sig, solver_order=order, solver_type="bh2",
                               predict_x0=True)
    x = _xdiff(xbar, sig[0])
    for i in range(len(sig) - 1):
        eps = SMOOTH(x, sig[i])
        m = sched.convert_model_output(eps, sample=x)
        if i > 0:
            x = sched.multistep_uni_c_bh_update(this_model_output=m, last_sample=sched.last_sample, this_sample=x,
                                                order=sched.this_order)
        sched.model_outputs = [*sched.model_outputs[1:], m]
        sched.timestep_list = [*sched.timestep_list[1:], sched.timesteps[i]]
        sched.this_order = min(order, sched.lower_order_nums + 1)
        sched.last_sample = x
        x = sched.multistep_uni_p_bh_update(model_output=eps, sample=x, order=sched.this_order)
        sched.lower_order_nums = min(sched.lower_order_nums + 1, order)
        sched._step_index += 1
    ours = probflow.integrate(SMOOTH, xbar, sig, method).x
    torch.testing.assert_close(_xdiff(ours, sig[-1]), x, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def encoding():
    x0 = SMOOTH.sample(6, generator=torch.Generator().manual_seed(7))
    g = grids.log_uniform(10.0, 0.05, 40)
    ref = probflow.encode(SMOOTH, x0, g, "scipy_dop853", rtol=1e-12, atol=1e-12, options={"group": 6}).x
    err_ddim = (probflow.encode(SMOOTH, x0, g, "euler").x - ref).abs().max().item()
    return x0, g, ref, err_ddim


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_3m", "unipc", "dpmpp_2s"])
def test_encoding_from_zero_runs_and_beats_ddim_inversion(encoding, method):
    """Encoding starts at σ = 0 (λ = +∞): a Heun step in σ leaves 0, then the method; error against DOP853."""
    x0, g, ref, err_ddim = encoding
    err = (probflow.encode(SMOOTH, x0, g, method).x - ref).abs().max().item()
    assert err < 0.1 * err_ddim, (err, err_ddim)


def test_equalised_grid_is_a_valid_grid_and_follows_the_error_density():
    x = probflow.noise(4, (8,), seed=8)
    g = calibrate.equalised(SMOOTH, x, 80.0, 0.02, 12)
    assert len(g) == 13 and float(g[0]) == 80.0 and float(g[-2]) == pytest.approx(0.02) and float(g[-1]) == 0.0
    assert (g[1:] < g[:-1]).all()
    # D is nearly constant for σ ≫ data scale: the equalised grid takes a longer first step than log-uniform
    lu = grids.log_uniform(80.0, 0.02, 12)
    assert float(g[1]) < 0.9 * float(lu[1])
    with pytest.raises(ValueError, match="sigma_min"):
        calibrate.equalised(SMOOTH, x, 1.0, 2.0, 12)
    with pytest.raises(ValueError, match="pilot_steps"):
        calibrate.equalised(SMOOTH, x, 80.0, 0.02, 12, pilot_steps=3)


def test_calibrated_grid_beats_log_snr_uniform_on_independent_noise():
    """A grid optimised on 8 calibration samples (sharp D = 16 mixture, UniPC, 8 steps from t = T − 1 to 0)
    cuts the RMSE against DOP853 on 16 *other* samples by > 2× relative to the log-SNR uniform grid it
    starts from (measured ≈ 4×), and is never worse on the calibration batch itself."""
    gm = GaussianMixture.random(16, 4, seed=3, std_range=(0.05, 0.5))
    sch = probflow.schedules.linear()
    smax, smin = sch.sigma_max, 3 * sch.sigma_min
    cal, test = probflow.noise(8, (16,), seed=11), probflow.noise(16, (16,), seed=12)
    ends = torch.tensor([smax, 0.0], dtype=torch.float64)

    xb = {k: x * math.sqrt(1 + smax**2) for k, x in (("cal", cal), ("test", test))}
    ref = {k: probflow.integrate(gm, x, ends, "scipy_dop853", rtol=1e-10, atol=1e-10, options={"group": len(x)}).x
           for k, x in xb.items()}

    def rmse(k, g):
        return (probflow.integrate(gm, xb[k], g, "unipc").x - ref[k]).pow(2).mean().sqrt().item()

    g = calibrate.calibrated(gm, cal, smax, smin, 8, "unipc", max_evals=100, reference=ref["cal"])
    assert len(g) == 9 and float(g[0]) == smax and float(g[-1]) == 0.0 and (g[1:] < g[:-1]).all()
    start = grids.log_uniform(smax, smin, 8)
    assert rmse("cal", g) <= rmse("cal", start)
    e, e_start = rmse("test", g), rmse("test", start)
    assert e < 0.5 * e_start, (e, e_start)


def test_calibrated_grid_bad_input():
    x = probflow.noise(2, (8,), seed=1)
    with pytest.raises(ValueError, match="sigma_min"):
        calibrate.calibrated(SMOOTH, x, 1.0, 2.0, 8)
    with pytest.raises(ValueError, match="bins"):
        calibrate.calibrated(SMOOTH, x, 80.0, 0.02, 8, bins=0)
    with pytest.raises(ValueError, match="steps"):
        calibrate.calibrated(SMOOTH, x, 80.0, 0.02, 0)
    with pytest.raises(ValueError, match="x:"):
        calibrate.calibrated(SMOOTH, [1.0, 2.0], 80.0, 0.02, 8)
    with pytest.raises(ValueError, match="reference"):
        calibrate.calibrated(SMOOTH, x, 80.0, 0.02, 8, reference=torch.zeros(3, 8, dtype=torch.float64))


def test_calibrated_builder_caches_per_step_count():
    b = calibrate.calibrated_builder(SMOOTH, (8,), "dpmpp_2m", n=2, max_evals=5, ref_tol=1e-8)
    sch = probflow.schedules.linear()
    g1 = b(sch, 4)
    assert torch.equal(g1, b(sch, 4)) and len(g1) == 5 and b.__name__ == "calibrated_dpmpp_2m"


def _dop853_x0(model, xbar: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """x̄(0) of Eq. 12 per sample with scipy's solve_ivp directly (not probflow.integrate): an independent reference."""
    from scipy.integrate import solve_ivp

    out = []
    for row in xbar:
        def rhs(s, y):
            sig = torch.tensor(s, dtype=torch.float64)
            xb = torch.from_numpy(y).unsqueeze(0)
            return model(xb / math.sqrt(1.0 + s * s), sig).squeeze(0).numpy()

        sol = solve_ivp(rhs, (sigma_max, 0.0), row.numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
        out.append(torch.from_numpy(sol.y[:, -1]))
    return torch.stack(out)


def test_calibrated_select_picks_the_candidate_with_the_lowest_independent_validation_error():
    """The choice equals a brute-force one: every candidate's grid (`calibrated` with the same inputs) evaluated
    on the validation batch against scipy's DOP853 called directly; the reported errors match it."""
    gm = GaussianMixture.random(6, 3, seed=5, std_range=(0.05, 0.3))
    smax, smin = 80.0, 0.03
    cal, val = probflow.noise(4, (6,), seed=21), probflow.noise(5, (6,), seed=22)
    methods = ("dpmpp_2m", "unipc", "euler")
    sel = calibrate.calibrated_select(gm, cal, val, smax, smin, 5, methods, max_evals=12)
    xbar = cal.double() * math.sqrt(1 + smax**2)
    ref_cal = probflow.integrate(gm, xbar, torch.tensor([smax, 0.0], dtype=torch.float64), "scipy_dop853",
                                 rtol=1e-10, atol=1e-10, options={"group": 4}).x
    xv = val.double() * math.sqrt(1 + smax**2)
    ref_val = _dop853_x0(gm, xv, smax)
    errs = {}
    for m in methods:
        g = calibrate.calibrated(gm, cal, smax, smin, 5, m, max_evals=12, reference=ref_cal)
        torch.testing.assert_close(sel.grids[m], g, rtol=1e-9, atol=0.0)
        errs[m] = (probflow.integrate(gm, xv, g, m).x - ref_val).pow(2).mean().sqrt().item()
        assert sel.val_rmse[m] == pytest.approx(errs[m], rel=1e-6), m
    assert len({round(math.log(e), 1) for e in errs.values()}) == 3  # the candidates really differ
    assert sel.method == min(errs, key=errs.get) and torch.equal(sel.grid, sel.grids[sel.method])
    assert sel.method != "euler"  # a first-order method on 5 steps loses to the exponential ones


def test_calibrated_select_bad_input():
    x = probflow.noise(2, (8,), seed=1)
    with pytest.raises(ValueError, match="methods"):
        calibrate.calibrated_select(SMOOTH, x, x, 80.0, 0.02, 4, ("unipc", "heun2"))
    with pytest.raises(ValueError, match="methods"):
        calibrate.calibrated_select(SMOOTH, x, x, 80.0, 0.02, 4, ("unipc", "unipc"))
    with pytest.raises(ValueError, match="x_val"):
        calibrate.calibrated_select(SMOOTH, x, probflow.noise(2, (4,), seed=1), 80.0, 0.02, 4)
    with pytest.raises(ValueError, match="x_val"):
        calibrate.calibrated_select(SMOOTH, x, [1.0], 80.0, 0.02, 4)


def test_dpmpp_2s_matches_diffusers_singlestep_heun_in_float64():
    """diffusers DPMSolverSinglestepScheduler(dpmsolver++, order 2, solver_type="heun") takes its
    intermediate stage at the next *grid* point; on a grid whose odd points are the λ-midpoints of ours,
    driven by hand in float64 (first-order substep to the midpoint, then the second-order update from the
    step's start), it is our dpmpp_2s step for step, to rounding (end σ_min > 0: no forced last step)."""
    coarse = grids.log_uniform(80.0, 0.05, 8, final_zero=False)
    mids = (coarse[:-1] * coarse[1:]).sqrt()  # λ-midpoints: r = 1/2
    fine = torch.stack([coarse[:-1], mids], 1).flatten()
    fine = torch.cat([fine, coarse[-1:]])
    sched = _float64_scheduler("DPMSolverSinglestepScheduler", fine, algorithm_type="dpmsolver++", solver_order=2,
                               solver_type="heun")
    xbar = probflow.noise(4, (8,), seed=9) * math.sqrt(1 + 80.0**2)
    x = _xdiff(xbar, fine[0])
    for k in range(len(coarse) - 1):
        sched._step_index = 2 * k
        m1 = sched.convert_model_output(SMOOTH(x, fine[2 * k]), sample=x)
        x_mid = sched.dpm_solver_first_order_update(m1, sample=x)
        sched._step_index = 2 * k + 1
        m0 = sched.convert_model_output(SMOOTH(x_mid, fine[2 * k + 1]), sample=x_mid)
        x = sched.singlestep_dpm_solver_second_order_update([m1, m0], sample=x)
    ours = probflow.integrate(SMOOTH, xbar, coarse, "dpmpp_2s").x
    torch.testing.assert_close(_xdiff(ours, coarse[-1]), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h", [1e-3, 0.04, 0.3, 1.7])
def test_exp_weights_are_the_exact_integral_of_the_lagrange_interpolant(h):
    """(E1)–(E2) against scipy.integrate.quad: w_j = ∫_0^h e^{−(h−u)} ℓ_j(u) du for Lagrange bases ℓ_j through
    the nodes (current point and two earlier ones, as dpmpp_3m uses; the small-h series branch included)."""
    from scipy.integrate import quad

    lam = 0.7
    lams = [lam, lam - 0.8 * h, lam - 1.9 * h]
    decay, w = exp_weights(lam, lam + h, lams)
    u = [lj - lam for lj in lams]
    for j in range(3):
        def basis(v, j=j):
            return math.prod((v - u[i]) / (u[j] - u[i]) for i in range(3) if i != j)
        want = quad(lambda v, j=j: math.exp(-(h - v)) * basis(v), 0.0, h, epsabs=0, epsrel=1e-13)[0]
        assert w[j] == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert decay == pytest.approx(math.exp(-h), rel=1e-15)
