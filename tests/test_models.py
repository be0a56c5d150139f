"""The analytic models are exact: ε* = −sqrt(1−ᾱ) ∇_x log p_t(x) (docs/MATH.md §2), checked by autograd."""

import math

import pytest
import torch
from scipy.stats import multivariate_normal

from probflow.bench.heldout import DiagonalMixture
from probflow.models import GaussianMixture, IdealDenoiser, default_mixture


def eps_by_autograd(model, x, sigma):
    """−sqrt(1−ᾱ) ∇_x log p_t(x), with p_t(x) = p_σ(x·sqrt(1+σ²))·(1+σ²)^{D/2}."""
    x = x.clone().requires_grad_(True)
    s = torch.tensor(sigma, dtype=torch.float64)
    logp = model.log_prob(x * torch.sqrt(1 + s * s), s) + 0.5 * x.shape[1] * torch.log(1 + s * s)
    (g,) = torch.autograd.grad(logp.sum(), x)
    return -torch.sqrt(s * s / (1 + s * s)) * g


@pytest.mark.parametrize("sigma", [0.05, 0.7, 5.0, 150.0])
def test_mixture_eps_equals_minus_sqrt_one_minus_alpha_bar_times_score(sigma):
    gm = GaussianMixture.random(5, 4, seed=3, std_range=(0.05, 0.5))
    x = torch.randn(32, 5, dtype=torch.float64)
    exact = gm(x, torch.tensor(sigma, dtype=torch.float64))
    auto = eps_by_autograd(gm, x, sigma)
    assert ((exact - auto).norm() / auto.norm()).item() < 1e-10


@pytest.mark.parametrize("sigma", [0.2, 1.0, 20.0])
def test_ideal_denoiser_eps_equals_score_form(sigma):
    data = torch.randn(50, 6, dtype=torch.float64)
    model = IdealDenoiser(data)
    x = torch.randn(16, 6, dtype=torch.float64)
    exact = model(x, torch.tensor(sigma, dtype=torch.float64))
    auto = eps_by_autograd(model, x, sigma)
    assert ((exact - auto).norm() / auto.norm()).item() < 1e-10


def test_mixture_log_prob_matches_scipy_convolved_density():
    gm = default_mixture()
    sigma = 0.3
    x = torch.randn(20, 2, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    ref = torch.log(sum(
        w * torch.from_numpy(multivariate_normal(m.numpy(), (c + sigma**2 * eye).numpy()).pdf(x.numpy()))
        for w, m, c in zip(gm.weights, gm.means, gm.covs)
    ))
    assert torch.allclose(gm.log_prob(x, sigma), ref, rtol=1e-12, atol=1e-12)


def test_mixture_posterior_matches_scipy_component_densities():
    gm = GaussianMixture.random(3, 4, seed=5, std_range=(0.1, 0.6))
    sigma = 0.4
    x = gm.sample(12, sigma=sigma, generator=torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=torch.float64)
    joint = torch.stack([
        w * torch.from_numpy(multivariate_normal(m.numpy(), (c + sigma**2 * eye).numpy()).pdf(x.numpy()))
        for w, m, c in zip(gm.weights, gm.means, gm.covs)
    ], dim=1)
    post = gm.posterior(x, sigma)
    assert post.shape == (12, 4)
    assert torch.allclose(post, joint / joint.sum(1, keepdim=True), rtol=1e-10, atol=1e-12)


def test_diagonal_mixture_posterior_equals_the_full_covariance_mixtures():
    g = torch.Generator().manual_seed(3)
    w, mu = torch.rand(5, generator=g, dtype=torch.float64) + 0.5, torch.randn(5, 7, generator=g, dtype=torch.float64)
    var = (0.05 + torch.rand(5, 7, generator=g, dtype=torch.float64)) ** 2
    full = GaussianMixture(w / w.sum(), mu, torch.diag_embed(var))
    x = torch.randn(9, 7, generator=g, dtype=torch.float64)
    for sigma in (0.0, 0.3, 4.0):
        assert torch.allclose(DiagonalMixture(w, mu, var).posterior(x, sigma), full.posterior(x, sigma), atol=1e-12)


def test_mixture_samples_have_the_mixture_moments():
    gm = GaussianMixture.random(3, 3, seed=1)
    x = gm.sample(200_000, sigma=0.5, generator=torch.Generator().manual_seed(0))
    mean = (gm.weights[:, None] * gm.means).sum(0)
    second = sum(w * (c + torch.outer(m, m)) for w, m, c in zip(gm.weights, gm.means, gm.covs))
    cov = second - torch.outer(mean, mean) + 0.25 * torch.eye(3, dtype=torch.float64)
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.01)


def test_mixture_accepts_any_batch_shape_and_float32():
    gm = GaussianMixture.random(12, 2, seed=0)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    e64 = gm(x, torch.tensor(1.0, dtype=torch.float64))
    e32 = gm(x.float(), torch.tensor(1.0))
    assert e64.shape == x.shape and e32.dtype == torch.float32
    assert torch.allclose(e32.double(), e64, atol=1e-5)


def test_bad_mixture_parameters_are_refused():
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 3), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])
    with pytest.raises(ValueError, match="data"):
        IdealDenoiser(torch.tensor([[math.nan, 0.0]]))


# ---------------------------------------------------------------- the field's checks (issue 27)

def test_field_accepts_a_dtype_name_and_refuses_other_values():
    import probflow

    gm = default_mixture()
    f = probflow.DDIMField(gm, model_dtype="float32")
    assert f.model_dtype == torch.float32
    for bad in ("float33", torch.int64, 5):
        with pytest.raises(TypeError, match="model_dtype: expected a floating-point dtype"):
            probflow.DDIMField(gm, model_dtype=bad)


def test_field_lets_an_overshooting_trial_point_return_nan_but_names_a_finite_sigma():
    import probflow

    f = probflow.DDIMField(lambda x, s: x * float("nan"))
    xbar = torch.zeros(2, 3, dtype=torch.float64)
    assert torch.isnan(f(torch.tensor(float("inf"), dtype=torch.float64), xbar)).all()  # the solver rejects it
    with pytest.raises(ValueError, match="model: returned NaN or Inf for ε at σ = 2.5"):
        f(2.5, xbar)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_field_finds_one_bad_element_among_many(value):
    """The check sums ε first (cheap): one NaN or ±Inf among 10⁵ finite elements must still be found."""
    import probflow

    def eps(x, s):
        out = torch.ones_like(x)
        out.view(-1)[12345] = value
        return out

    with pytest.raises(ValueError, match="model: returned NaN or Inf for ε at σ = 2.5"):
        probflow.DDIMField(eps)(2.5, torch.zeros(1, 100_000))


def test_field_accepts_finite_eps_whose_sum_overflows():
    """Finite float32 values whose sum overflows to Inf are not NaN or Inf: the elementwise test decides."""
    import probflow

    out = probflow.DDIMField(lambda x, s: torch.full_like(x, 3e38))(2.5, torch.zeros(1, 8))
    assert torch.isfinite(out).all()


def test_a_batch_of_the_wrong_shape_is_refused_before_the_model_runs():
    import probflow

    calls = []

    class Model:
        dim = 2

        def __call__(self, x, s):
            calls.append(1)
            return x

    with pytest.raises(ValueError, match="noise: expected samples of 2 entries"):
        probflow.sample(Model(), torch.zeros(3, 5, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert calls == []


def test_unet_config_sizes_are_bounded_before_anything_is_built():
    import time

    from probflow.models.unet import UNet

    t = time.perf_counter()
    for kw, frag in (({"blocks": 10**6}, "blocks"), ({"channels": [8] * 10**6}, "channels"),
                     ({"channels": [8, 10**9]}, "channels\\[1\\]"), ({"in_channels": 0}, "in_channels"),
                     ({"blocks": True}, "blocks"), ({"emb_dim": -1}, "emb_dim")):
        with pytest.raises(ValueError, match=frag):
            UNet(**kw)
    assert time.perf_counter() - t < 60  # refused from the arguments, not after building a million blocks
