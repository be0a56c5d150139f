"""Log-likelihood through the ODE (docs/MATH.md §8) against exact densities, and the bits/dim convention against a
hand-computed Gaussian case. References are independent of the code under test: the mixtures' closed-form
log-densities, torch.func's full Jacobian, scipy.stats."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from probflow import grids, sde
from probflow.field import DDIMField
from probflow.likelihood import AugmentedField, bits_per_dim, dequantise, likelihood, probes
from probflow.models import GaussianMixture, default_mixture
from probflow.solvers import Method, get_method, method_names

SIGMA_MAX = 80.0


@pytest.fixture(scope="module")
def mix2():
    m = default_mixture()
    return m, m.sample(16, generator=torch.Generator().manual_seed(11))


def test_exact_divergence_matches_the_mixture_density_d2(mix2):
    m, x0 = mix2
    r = likelihood(m, x0, SIGMA_MAX, "dopri5", rtol=1e-8, atol=1e-8, prior="exact")
    assert (r.log_prob - m.log_prob(x0, 0.0)).abs().max() <= 1e-6
    assert r.vjps == 2 * r.nfe  # exact divergence: D VJPs per evaluation


def test_exact_divergence_matches_the_mixture_density_d8():
    m = GaussianMixture.random(8, 4, seed=3)
    x0 = m.sample(8, generator=torch.Generator().manual_seed(4))
    r = likelihood(m, x0, SIGMA_MAX, "dopri5", rtol=1e-8, atol=1e-8, prior="exact")
    assert (r.log_prob - m.log_prob(x0, 0.0)).abs().max() <= 1e-6


def test_normal_prior_changes_only_the_prior_term(mix2):
    m, x0 = mix2
    g = grids.karras(SIGMA_MAX, 0.002, 24).flip(0)
    a = likelihood(m, x0, g, "rk4", prior="exact")
    b = likelihood(m, x0, g, "rk4")
    assert torch.equal(a.divergence, b.divergence)
    var = 1 + SIGMA_MAX**2
    xbar = a.latent.reshape(len(x0), -1) * math.sqrt(var)
    hand = stats.multivariate_normal(np.zeros(2), var * np.eye(2)).logpdf(xbar.numpy())
    np.testing.assert_allclose(b.prior.numpy(), hand, rtol=0, atol=1e-10)
    gap = (b.prior - a.prior).abs().max()
    assert 0 < gap < 1e-2  # N(0, (1+σ²)I) vs the convolved mixture: O(1/σmax²) per dimension


def test_augmented_field_divergence_is_the_jacobian_trace():
    m = GaussianMixture.random(5, 3, seed=1)
    x = m.sample(4, sigma=0.3, generator=torch.Generator().manual_seed(2))
    f = DDIMField(m)
    s = torch.tensor(0.3, dtype=torch.float64)
    aug = AugmentedField(f, (5,), None, chunk=2)
    out = aug(s, torch.cat([x, torch.zeros(4, 1, dtype=x.dtype)], 1))
    assert aug.nfe == 1 and aug.vjps == 5 and f.nfe == 3  # ⌈5/2⌉ passes over copies of the batch
    jac = torch.func.vmap(torch.func.jacrev(lambda z: f(s, z[None])[0]))(x)
    torch.testing.assert_close(out[:, -1], jac.diagonal(dim1=1, dim2=2).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, :5], f(s, x))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_a_calibrated_bound(kind):
    """On a fixed grid the x̄ path is the same for every probe, so each probe's integral is an unbiased
    estimate of the exact-divergence integral of that very solve; the mean of 256 probes must lie within 4
    standard errors of it (|z| > 4 has probability < 1e-4 under the null), and the standard error must match
    the spread across 16 independent seeds (its own calibration)."""
    m = GaussianMixture.random(6, 3, seed=5)
    x0 = m.sample(3, generator=torch.Generator().manual_seed(6))
    g = grids.karras(SIGMA_MAX, 0.002, 12).flip(0)
    ex = likelihood(m, x0, g, "heun2", prior="exact")
    h = likelihood(m, x0, g, "heun2", prior="exact", divergence="hutchinson", probes_per_sample=256, probe_kind=kind)
    z = (h.divergence - ex.divergence) / h.stderr
    assert z.abs().max() < 4, z
    assert h.vjps == 256 * h.nfe
    one = torch.stack([likelihood(m, x0, g, "heun2", divergence="hutchinson", seed=s, probe_kind=kind,
                                  probes_per_sample=1).divergence for s in range(16)])
    spread = one.std(0)  # SE of one probe, measured across seeds
    predicted = h.stderr * math.sqrt(256)
    assert ((spread / predicted) > 0.4).all() and ((spread / predicted) < 1.8).all()  # χ²_15 range, ±~3σ
    assert torch.isnan(likelihood(m, x0, g, "heun2", divergence="hutchinson", probes_per_sample=1).stderr).all()


def test_probes_depend_on_the_sample_not_on_the_batch(mix2):
    m, x0 = mix2
    g = grids.karras(SIGMA_MAX, 0.002, 8).flip(0)
    for fresh in (False, True):
        full = likelihood(m, x0[:6], g, "rk4", divergence="hutchinson", probes_per_sample=3, seed=9,
                          fresh_probes=fresh)
        part = likelihood(m, x0[3:5], g, "rk4", divergence="hutchinson", probes_per_sample=3, seed=9, first_index=3,
                          fresh_probes=fresh)
        torch.testing.assert_close(part.divergence_probes, full.divergence_probes[3:5], rtol=1e-12, atol=1e-12)
    p = probes(4, 2, 5, "rademacher", seed=1)
    assert p.shape == (2, 4, 5) and set(p.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(probes(2, 2, 5, seed=1, first=2), p[:, 2:])


def test_downward_only_methods_are_refused_with_the_reason(mix2):
    m, x0 = mix2
    with pytest.raises(ValueError, match="adaptive_exp.*downwards only"):
        likelihood(m, x0[:2], SIGMA_MAX, "adaptive_exp")


@pytest.mark.parametrize("method", [n for n in method_names() if n != "scipy_dop853"
                                    and get_method(n).augmented and "up" in get_method(n).directions])
def test_every_registered_method_carries_the_augmented_state(method, mix2):
    """Each method's log-density error falls as the grid is refined (fixed) or the tolerance tightened."""
    m, x0 = mix2
    x0, exact = x0[:2], m.log_prob(x0[:2], 0.0)
    meth = get_method(method)
    if meth.adaptive:
        errs = [(likelihood(m, x0, SIGMA_MAX, method, rtol=t, atol=t, prior="exact").log_prob - exact).abs().max()
                for t in (1e-2, 1e-4)]
        assert errs[1] < 0.1 and errs[1] < errs[0] / 2, errs
        return
    make = (lambda n: torch.linspace(0, SIGMA_MAX, 2 * n + 1, dtype=torch.float64)) if meth.uniform_steps \
        else (lambda n: grids.karras(SIGMA_MAX, 0.002, n).flip(0))
    errs = [(likelihood(m, x0, make(n), method, prior="exact").log_prob - exact).abs().max() for n in (12, 48)]
    assert errs[1] < errs[0] / 2, errs


def test_scipy_reference_carries_the_augmented_state(mix2):
    m, x0 = mix2
    r = likelihood(m, x0[:1], SIGMA_MAX, "scipy_dop853", rtol=1e-9, atol=1e-9, prior="exact")
    assert (r.log_prob - m.log_prob(x0[:1], 0.0)).abs().max() < 1e-6


def test_float32_state_and_float32_model(mix2):
    m, x0 = mix2
    exact = m.log_prob(x0, 0.0)
    r = likelihood(m, x0.float(), SIGMA_MAX, "dopri5", rtol=1e-5, atol=1e-5, prior="exact")
    assert r.log_prob.dtype == torch.float32 and (r.log_prob.double() - exact).abs().max() < 1e-2
    f32 = DDIMField(m, model_dtype=torch.float32)  # float64 state, the model in float32
    r = likelihood(f32, x0, SIGMA_MAX, "dopri5", rtol=1e-5, atol=1e-5, prior="exact")
    assert r.log_prob.dtype == torch.float64 and (r.log_prob - exact).abs().max() < 1e-2


def _gaussian(dim: int, mu: float, s: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), torch.full((1, dim), mu), (s * s * torch.eye(dim))[None])


def test_bits_per_dim_matches_the_hand_computed_gaussian_case():
    """N(μ, s²I) model, 8-bit images in [−1, 1]: bpd = −Σ log N(x'; μ, s²)/(D ln 2) + log2 127.5 at the
    dequantised x' (B1), and its mean over draws matches E_u in closed form and the discrete bits/dim
    −log2 P(k)/D (scipy's normal cdf over each bin of width 2/255), to which it is tight for s ≫ Δ."""
    mu, s = 0.1, 0.4
    m = _gaussian(4, mu, s)
    k = torch.tensor([[0, 100, 128, 255], [3, 77, 200, 250]], dtype=torch.float64)
    x = (k / 127.5 - 1).reshape(2, 1, 2, 2)
    r = bits_per_dim(m, x, SIGMA_MAX, "dopri5", draws=3, rtol=1e-9, atol=1e-9, prior="exact", seed=4)
    xd = r.x_dequantised.reshape(3, 2, 4).numpy()
    hand = -stats.norm(mu, s).logpdf(xd).sum(-1) / (4 * math.log(2)) + math.log2(127.5)
    np.testing.assert_allclose(r.bpd_draws.numpy(), hand, rtol=0, atol=1e-6)
    assert r.offset == pytest.approx(math.log2(127.5), abs=1e-12)
    kk = np.rint((xd + 1) * 127.5)  # each draw stays in its own bin, centred on its level
    assert (kk == np.broadcast_to(k.numpy(), kk.shape)).all()
    delta = 2 / 255
    xk = (k / 127.5 - 1).numpy()
    expected = (0.5 * math.log(2 * math.pi * s * s) + ((xk - mu) ** 2 + delta**2 / 12) / (2 * s * s)).sum(-1) \
        / (4 * math.log(2)) + math.log2(127.5)
    discrete = -np.log2(stats.norm(mu, s).cdf(xk + delta / 2) - stats.norm(mu, s).cdf(xk - delta / 2)).sum(-1) / 4
    assert np.all(expected >= discrete) and np.abs(expected - discrete).max() < 1e-4  # Jensen, tight
    many = dequantise(x, 4000, seed=1).reshape(4000, 2, 4).numpy()  # the mean over draws → the closed form
    mc = -stats.norm(mu, s).logpdf(many).sum(-1) / (4 * math.log(2)) + math.log2(127.5)
    assert np.all(np.abs(mc.mean(0) - expected) < 4 * mc.std(0) / math.sqrt(4000) + 1e-12)


def test_bits_per_dim_mean_and_standard_error_are_over_images():
    m = _gaussian(4, 0.0, 0.5)
    x = (torch.tensor([[0, 64, 128, 255], [10, 20, 30, 40], [90, 91, 92, 93]], dtype=torch.float64)
         / 127.5 - 1).reshape(3, 4)
    r = bits_per_dim(m, x, SIGMA_MAX, "dopri5", draws=2, rtol=1e-7, atol=1e-7, prior="exact")
    assert r.bpd_draws.shape == (2, 3)
    torch.testing.assert_close(r.bpd, r.bpd_draws.mean(0))
    assert r.mean == pytest.approx(float(r.bpd.mean())) and r.stderr == pytest.approx(float(r.bpd.std() / 3**0.5))
    one = bits_per_dim(m, x[1:2], SIGMA_MAX, "dopri5", draws=2, rtol=1e-7, atol=1e-7, prior="exact", first_index=1)
    torch.testing.assert_close(one.x_dequantised[:, 0], r.x_dequantised[:, 1])  # draws do not depend on the batch


def test_bad_inputs_raise_one_line_errors(mix2):
    m, x0 = mix2
    g = grids.karras(SIGMA_MAX, 0.002, 4).flip(0)
    bad = [
        (dict(x0=x0.clone().fill_(float("nan"))), "x0: contains NaN"),
        (dict(x0=x0[:, :1]), "x0: expected samples of 2 numbers"),
        (dict(sigmas=g.flip(0)), "sigmas: expected an increasing grid from σ = 0"),
        (dict(sigmas=g, method="rk4", divergence="trace"), "divergence: expected"),
        (dict(sigmas=SIGMA_MAX, method="rk4"), "sigmas: the fixed-grid method 'rk4' needs a grid"),
        (dict(sigmas=-1.0), "sigmas: expected σmax > 0"),
        (dict(divergence="hutchinson", probe_kind="uniform"), "probe_kind: expected"),
        (dict(probes_per_sample=0), "probes_per_sample: expected a positive integer"),
        (dict(sigmas=g, method=sde.stochastic_ddim(0.5)), "cannot give a likelihood"),
        (dict(prior="laplace"), "prior: expected"),
    ]
    for kw, msg in bad:
        args = dict(x0=x0[:2], sigmas=SIGMA_MAX, method="dopri5") | kw
        with pytest.raises(ValueError, match=msg):
            likelihood(m, args.pop("x0"), args.pop("sigmas"), args.pop("method"), **args)
    with pytest.raises(ValueError, match="prior: 'exact' needs an analytic model"):
        likelihood(lambda x, s: x * 0, x0[:2], g, "euler", prior="exact")
    x8 = torch.tensor([[0.0, 0.5]])  # 0.5 is not v/127.5 − 1 for an integer v
    with pytest.raises(ValueError, match="x: bits/dim needs 256-level data"):
        bits_per_dim(m, x8, SIGMA_MAX)
    with pytest.raises(ValueError, match="x: bits/dim needs 256-level data"):
        bits_per_dim(m, torch.tensor([[-1.0, 1.0 + 2 / 255]]), SIGMA_MAX)
    with pytest.raises(ValueError, match="levels: expected an integer >= 2"):
        bits_per_dim(m, torch.tensor([[-1.0, 1.0]]), SIGMA_MAX, levels=1)


def test_cli_prints_per_image_bits_per_dim_and_refuses_bad_images(tmp_path, capsys):
    from PIL import Image

    from probflow import models
    from probflow.cli import main
    from probflow.digits import load_split
    from probflow.io.images import load_images, save_images

    paths = [str(p) for p in save_images(load_split()["x_test"][:3], tmp_path / "img")]
    args = ["likelihood", *paths, "--method", "heun2", "--steps", "3", "--divergence", "hutchinson", "--quiet",
            "--levels", "256"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and out[-1].startswith("mean ") and "± " in out[-1]
    model = models.load("digits")
    x = load_images(paths, (8, 8), 1, verbose=False)
    g = grids.karras(model.schedule.sigma_max, model.schedule.sigma_min, 3).flip(0)  # the CLI's default grid
    api = bits_per_dim(model, x, g, "heun2", divergence="hutchinson", rtol=1e-6, atol=1e-6)
    se = [float(line.split("\t")[2].removeprefix("± ")) for line in out[:3]]
    assert se == pytest.approx(api.bpd_stderr.tolist(), abs=1e-4) and min(se) > 0  # a per-image SE, in bits/dim
    assert [float(line.split("\t")[1]) for line in out[:3]] == pytest.approx(api.bpd.tolist(), abs=1e-4)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(tmp_path / "deep.png")
    for bad, msg in ((["big.png"], "expected the model's 8×8"), (["deep.png"], "is not 8-bit"),
                     (["missing.png"], "no such image file")):
        assert main(["likelihood", str(tmp_path / bad[0]), "--quiet"]) == 2
        assert msg in capsys.readouterr().err
    assert main(["likelihood", paths[0], "--draws", "0"]) == 2
    assert "--draws: expected an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- image scale: cost, budget, progress, levels


def _linear(a: torch.Tensor):
    """ε(x, σ) = x·Aᵀ: f(σ, x̄) = x̄·Aᵀ/sqrt(1+σ²), whose divergence integral is tr(A)·asinh(σmax) in closed form
    on any path (the Jacobian does not depend on x̄)."""
    return lambda x, s: x @ a.T.to(x.dtype)


def test_auto_divergence_is_exact_up_to_the_threshold_and_hutchinson_above():
    from probflow.likelihood import EXACT_MAX_DIM

    for d, kind in ((EXACT_MAX_DIM, "exact"), (EXACT_MAX_DIM + 1, "hutchinson")):
        a = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) / math.sqrt(d)
        x0 = torch.randn(2, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        g = torch.linspace(0, 5.0, 9, dtype=torch.float64)
        r = likelihood(_linear(a), x0, g, "rk4")
        assert r.divergence_kind == kind
        exact = float(torch.trace(a)) * math.asinh(5.0)  # the closed form; rk4 on 8 steps is accurate to ~1e-4
        if kind == "exact":
            assert r.vjps == d * r.nfe and (r.divergence - exact).abs().max() < 1e-3
        else:
            assert r.vjps == 4 * r.nfe and r.divergence_probes.shape == (2, 4)
            z = (r.divergence - exact) / r.stderr
            assert z.abs().max() < 5, z


def test_fresh_probes_are_unbiased_and_have_less_variance_than_fixed_ones():
    """On a fixed grid the x̄ path does not depend on the probes, so fresh probes at every evaluation keep each
    accumulator unbiased for the exact-divergence value of the same solve, with a smaller variance (a sum of
    per-evaluation variances instead of the square of a sum). 256 probes each; the closed-form reference."""
    d = 40
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64) / math.sqrt(d)
    x0 = torch.randn(3, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = torch.linspace(0, 5.0, 17, dtype=torch.float64)
    ex = likelihood(_linear(a), x0, g, "rk4", divergence="exact")
    fixed = likelihood(_linear(a), x0, g, "rk4", divergence="hutchinson", probes_per_sample=256, fresh_probes=False)
    fresh = likelihood(_linear(a), x0, g, "rk4", divergence="hutchinson", probes_per_sample=256)
    assert fresh.fresh_probes and not fixed.fresh_probes and fresh.nfe == fixed.nfe
    for h in (fixed, fresh):
        assert ((h.divergence - ex.divergence) / h.stderr).abs().max() < 4
    assert (fresh.stderr < fixed.stderr / 2).all(), (fresh.stderr, fixed.stderr)


def test_adaptive_step_size_is_not_driven_by_the_probes(mix2):
    """With Hutchinson's divergence an adaptive solve controls x̄ only: the path, the latent and the NFE are the
    same whatever the probes (seed, count, kind), so the estimate stays unbiased for that path."""
    m, x0 = mix2
    runs = [likelihood(m, x0[:4], SIGMA_MAX, "dopri5", rtol=1e-4, atol=1e-4, divergence="hutchinson", seed=s,
                       probes_per_sample=p, probe_kind=k) for s, p, k in ((0, 1, "rademacher"), (5, 3, "gaussian"))]
    assert runs[0].nfe == runs[1].nfe
    torch.testing.assert_close(runs[0].latent, runs[1].latent, rtol=0, atol=0)
    assert not torch.equal(runs[0].divergence, runs[1].divergence)


def test_constant_eps_has_divergence_zero_and_does_not_raise():
    """ε that does not depend on x at some σ (or anywhere): the exact divergence is 0 there, not an error."""
    g = torch.linspace(0, 3.0, 7, dtype=torch.float64)
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def const(x, s):  # no graph to x at all
        return torch.full_like(x, 0.5).detach()

    def partly(x, s):  # depends on x only above σ = 1: ε = x there (divergence D/sqrt(1+σ²))
        return x if float(s) > 1 else torch.zeros_like(x) + 0.25

    for kind in ("exact", "hutchinson"):
        r = likelihood(const, x0, g, "rk4", divergence=kind)
        assert torch.equal(r.divergence, torch.zeros(3, dtype=torch.float64)), kind
    r = likelihood(partly, x0, g, "euler", divergence="exact")
    # euler evaluates at σ_0 … σ_5 (left ends): the divergence D/sqrt(1+σ²) where σ > 1, 0 elsewhere
    want = sum(0.5 * 5 / math.sqrt(1 + s * s) for s in g[:-1].tolist() if s > 1)
    torch.testing.assert_close(r.divergence, torch.full((3,), want, dtype=torch.float64))


def test_methods_are_refused_by_their_capabilities_not_their_names(mix2):
    m, x0 = mix2
    g = grids.karras(SIGMA_MAX, 0.002, 4).flip(0)
    down = Method("my_down_only", 1, backend="torchdiffeq", directions=frozenset({"down"}))
    flat = Method("my_flat", 1, backend="torchdiffeq", augmented=False)
    for meth, why in ((down, "it integrates downwards only"), (flat, "it cannot carry the augmented state")):
        with pytest.raises(ValueError, match=f"method: '{meth.name}' cannot give a likelihood: {why}"):
            likelihood(m, x0[:2], g, meth)

    def euler_step(field, x, s, sn, state):
        return x + (sn - s) * field(s, x), state

    lookalike = Method("ddim_eta=0.5", 1, step=euler_step)  # a stochastic-looking name, a deterministic method
    a = likelihood(m, x0[:2], g, lookalike)
    b = likelihood(m, x0[:2], g, "euler")
    assert a.nfe == 4
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=1e-12, atol=1e-12)


def test_estimate_counts_what_the_solve_then_does(mix2):
    from probflow.likelihood import estimate

    m, x0 = mix2
    g = grids.karras(SIGMA_MAX, 0.002, 6).flip(0)
    for method, kind, p in (("rk4", "exact", None), ("heun2", "hutchinson", 3), ("dpmpp_3m", "hutchinson", None)):
        c = estimate(m, x0[:4], g, method, divergence=kind, probes_per_sample=p, batch=2)
        r = likelihood(m, x0[:2], g, method, divergence=kind, probes_per_sample=p)
        assert c.evaluations == r.nfe and c.vjps_per_evaluation * c.evaluations == r.vjps
        assert c.solves == 2 and c.seconds == pytest.approx(2 * r.nfe * c.seconds_per_evaluation)
        assert "model calls" in c.describe()
    c = estimate(m, x0[:2], SIGMA_MAX, "dopri5")
    assert c.evaluations is None and c.seconds is None and "adaptive" in c.describe()


def test_budget_refuses_before_any_model_call_and_stops_adaptive_solves(mix2):
    from probflow.likelihood import BudgetError

    m, x0 = mix2
    calls = []

    def counted(x, s):
        calls.append(1)
        return m(x, s)

    g = grids.karras(SIGMA_MAX, 0.002, 6).flip(0)
    field = DDIMField(counted)
    with pytest.raises(BudgetError, match="budget_seconds: the request is estimated at"):
        likelihood(field, x0[:2], g, "rk4", budget_seconds=1e-9)
    assert field.nfe == 0  # the pilot's calls are not the solve's, and the solve never started
    with pytest.raises(BudgetError, match="budget_seconds: the solve passed its budget"):
        likelihood(m, x0[:2], SIGMA_MAX, "dopri5", budget_seconds=1e-9)
    with pytest.raises(ValueError, match="budget_seconds: expected a positive number"):
        likelihood(m, x0[:2], g, "rk4", budget_seconds=-1)
    assert likelihood(m, x0[:2], g, "rk4", budget_seconds=600).nfe == 24


def test_progress_reports_every_model_call(mix2):
    m, x0 = mix2
    g = grids.karras(SIGMA_MAX, 0.002, 5).flip(0)
    seen = []
    r = likelihood(m, x0[:2], g, "rk4", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i + 1, 20) for i in range(20)] and r.nfe == 20


def _digit_pngs(tmp_path, n=2):
    from probflow.digits import load_split
    from probflow.io.images import save_images

    return [str(p) for p in save_images(load_split()["x_test"][:n], tmp_path / "img")]


def test_cli_takes_the_levels_from_the_model_and_agrees_with_the_api(tmp_path, capsys):
    from probflow import models
    from probflow.cli import main
    from probflow.digits import load_split

    paths = _digit_pngs(tmp_path)
    assert main(["likelihood", *paths, "--method", "euler", "--steps", "3", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "levels: 17 (the model)" in cap.err and "divergence: exact (D = 64 ≤ 256)" in cap.err
    model = models.load("digits")
    g = grids.karras(model.schedule.sigma_max, model.schedule.sigma_min, 3).flip(0)
    api = bits_per_dim(model, load_split()["x_test"][:2].double(), g, "euler", levels=17)  # the native data
    got = [float(line.split("\t")[1]) for line in cap.out.splitlines()[:2]]
    assert got == pytest.approx(api.bpd.tolist(), abs=1e-4)
    assert main(["likelihood", *paths, "--method", "euler", "--steps", "3", "--quiet", "--levels", "256"]) == 0
    cap = capsys.readouterr()
    assert "levels: 256 (--levels)" in cap.err
    assert all(abs(float(a.split("\t")[1]) - b) > 0.1 for a, b in zip(cap.out.splitlines()[:2], got))
    from PIL import Image

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3 + 1).save(tmp_path / "odd.png")
    assert main(["likelihood", str(tmp_path / "odd.png"), "--quiet"]) == 2
    assert "are not 17-level data" in capsys.readouterr().err
    for bad, msg in ((["--levels", "1"], "--levels: expected an integer from 2 to 256"),
                     (["--levels", "300"], "--levels: expected an integer from 2 to 256"),
                     (["--budget-minutes", "0"], "--budget-minutes: expected a positive number"),
                     (["--probes", "100000"], "--probes: 100000 is above the bound")):
        assert main(["likelihood", paths[0], "--quiet", *bad]) == 2
        assert msg in capsys.readouterr().err


def test_cli_prints_the_estimate_shows_progress_and_refuses_over_budget(tmp_path, capsys):
    from probflow.cli import main

    paths = _digit_pngs(tmp_path)
    assert main(["likelihood", *paths, "--method", "euler", "--steps", "2", "--divergence", "hutchinson"]) == 0
    err = capsys.readouterr().err
    assert "estimate: 2 sample(s) × 2 model calls and 8 VJPs per sample" in err
    assert "likelihood (euler, hutchinson)" in err and "call" in err  # the progress bar (tqdm, on stderr)
    assert main(["likelihood", *paths, "--steps", "50", "--budget-minutes", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert "--budget-minutes: the request is estimated at" in err and "over the budget" in err
