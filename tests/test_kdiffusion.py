"""k-diffusion's samplers as peers (probflow.bench.kdiffusion): the driver equals k-diffusion's own loop called
with a VE denoiser written here from the mixture's closed form, agrees with independent implementations of the
same methods (probflow's Euler, diffusers' DPM-Solver++(2M)), and each sampler converges at its order."""

import math

import pytest
import torch

from probflow import grids, schedules
from probflow.bench import kdiffusion as kd
from probflow.flows import noise, sample
from probflow.models import GaussianMixture

pytestmark = pytest.mark.skipif(not kd.available(), reason="k-diffusion is not installed")

W = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
MU = torch.tensor([[0.8, -0.4, 0.1], [-0.6, 0.5, -0.7], [0.1, 0.9, 0.6]], dtype=torch.float64)
S2 = torch.tensor([0.04, 0.09, 0.02], dtype=torch.float64)  # isotropic component variances


def ve_denoiser(x, sigma):
    """E[x_0 | x = x_0 + σ n] for Σ_k w_k N(μ_k, s_k² I), written from the closed form (k-diffusion's convention)."""
    s2 = float(sigma.reshape(-1)[0]) ** 2
    c = S2 + s2  # (K,)
    d = x.unsqueeze(1) - MU  # (B, K, D)
    logp = W.log() - 0.5 * (d * d).sum(-1) / c - 0.5 * MU.shape[1] * c.log()
    r = torch.softmax(logp, -1).unsqueeze(-1)
    return (r * (MU + (S2 / c).unsqueeze(-1) * d)).sum(1)


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    model = GaussianMixture(W, MU, S2[:, None, None] * torch.eye(3, dtype=torch.float64))
    return schedules.linear(), model, noise(5, (3,), seed=4)


@pytest.mark.parametrize("name", list(kd.KPEERS))
def test_driver_equals_k_diffusions_own_loop_with_a_closed_form_ve_denoiser(case, name):
    sch, model, z = case
    sig = grids.karras(sch.sigma_max, sch.sigma_min, 7)
    spec = kd.KPEERS[name]
    fn = getattr(kd.load_sampling(), spec.fn)
    kw = dict(spec.kwargs)
    if "eta" in kw:
        kw["noise_sampler"] = lambda a, b: torch.zeros(5, 3, dtype=torch.float64)
    own = fn(ve_denoiser, z * math.sqrt(1 + sch.sigma_max**2), sig, disable=True, **kw)
    r = kd.run_kpeer(name, model, z, sig)
    assert torch.allclose(r.x, own, rtol=0, atol=1e-10), float((r.x - own).abs().max())
    assert r.nfe == (13 if spec.two_stage else 7)
    assert kd.steps_for_nfe(name, r.nfe) == 7


def test_k_euler_is_probflow_euler_and_k_dpmpp_2m_is_diffusers_on_the_same_grid(case):
    sch, model, z = case
    sig = grids.log_uniform(sch.sigma_max, 0.05, 9)
    x = sample(model, z, sig, "euler").x
    assert torch.allclose(kd.run_kpeer("k_euler", model, z, sig).x, x, rtol=0, atol=1e-12)
    from probflow.bench import peers

    if not peers.available():
        pytest.skip("diffusers is not importable")
    d = peers.run_peer("dpmpp_2m", model, z, sch, 9, sigmas=sig).x  # diffusers steps in float32 ("upcast")
    k = kd.run_kpeer("k_dpmpp_2m", model, z, sig).x
    assert (d - k).abs().max() < 1e-5
    assert (k - x).abs().max() > 1e-3  # the two methods differ, so the agreement above is not vacuous


@pytest.mark.parametrize("name", list(kd.KPEERS))
def test_each_sampler_converges_at_its_declared_order(case, name):
    # to σ = 0.5 (the ODE is smooth there; the step into σ = 0 of a fixed σ_min is a fixed first-order step),
    # on log-uniform grids, against DOP853 at 1e-12
    sch, model, z = case
    end = torch.tensor([20.0, 0.5], dtype=torch.float64)
    ref = sample(model, z, end, "scipy_dop853", rtol=1e-12, atol=1e-12, options={"group": 5}).x
    ns = (16, 32, 64)
    errs = [float((kd.run_kpeer(name, model, z, grids.log_uniform(20.0, 0.5, n, final_zero=False)).x - ref)
                  .pow(2).mean().sqrt()) for n in ns]
    order = math.log2(errs[1] / errs[2])
    # the multistep samplers (3M, LMS) start with a first-order step (local error O(h²)), so on a fixed interval
    # their global order is 2 asymptotically and their scheme's order before the start-up error dominates
    p = kd.KPEERS[name].order
    assert min(p, 2) - 0.3 < order < p + 0.5, (errs, order)
    assert errs[0] > errs[1] > errs[2]


def test_dpm_adaptive_meets_its_tolerance_roughly_and_counts_calls(case):
    sch, model, z = case
    ref = sample(model, z, torch.tensor([sch.sigma_max, sch.sigma_min], dtype=torch.float64), "scipy_dop853",
                 rtol=1e-12, atol=1e-12, options={"group": 5}).x * math.sqrt(1 + sch.sigma_min**2)
    loose = kd.run_dpm_adaptive(model, z, sch.sigma_max, sch.sigma_min, 1e-2, 1e-2)
    tight = kd.run_dpm_adaptive(model, z, sch.sigma_max, sch.sigma_min, 1e-5, 1e-5)
    e = [float((r.x - ref).pow(2).mean().sqrt()) for r in (loose, tight)]
    assert tight.nfe > loose.nfe > 0 and e[1] < e[0] and e[1] < 1e-3, (e, loose.nfe, tight.nfe)


def test_bad_inputs_are_one_line_errors(case):
    sch, model, z = case
    with pytest.raises(ValueError, match="peer"):
        kd.run_kpeer("nope", model, z, grids.karras(sch.sigma_max, sch.sigma_min, 4))
    with pytest.raises(ValueError, match="sigmas"):
        kd.run_kpeer("k_dpmpp_2m", model, z, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="noise"):
        kd.run_kpeer("k_dpmpp_2m", model, torch.zeros(3, dtype=torch.long), grids.karras(10.0, 0.1, 4))
    with pytest.raises(ValueError, match="sigma_min"):
        kd.run_dpm_adaptive(model, z, sch.sigma_max, 0.0, 1e-3, 1e-3)
