"""Exact inversion for an ordinary decoder (issue 13): encode_exact's latent, decoded by the ordinary sampler
(probflow's own, and diffusers' DDIMScheduler for Euler), returns x_0 to round-off."""

from __future__ import annotations

import math

import pytest
import torch

import probflow
from probflow import grids, schedules
from probflow.inversion import InversionError, encode_exact
from probflow.models import GaussianMixture

SCH = schedules.linear()


@pytest.fixture(scope="module")
def mixture():
    gm = GaussianMixture.random(64, 8, seed=7, std_range=(0.1, 0.5))  # not the benchmark's seed
    x0 = gm.sample(3, generator=torch.Generator().manual_seed(11))
    return gm, x0


def _mse(a, b):
    return float(((a.double() - b.double()) ** 2).mean())


@pytest.mark.parametrize("method,steps", [("euler", 10), ("euler", 20), ("heun2", 10)])
def test_round_trip_float64(mixture, method, steps):
    gm, x0 = mixture
    g = grids.ddim(SCH, steps)
    enc = encode_exact(gm, x0, g, method)
    back = probflow.decode(gm, enc.x, g, method)
    assert _mse(back.x, x0) <= 1e-24
    info = enc.info
    assert info["decoder"] == method and len(info["iterations"]) == steps
    assert enc.nfe == info["nfe_solve"] + info["nfe_verify"] and info["nfe_verify"] > 0
    assert max(info["residuals"]) <= max(info["tolerances"])
    plain = probflow.encode(gm, x0, g, method)  # the ordinary (explicit) encode is far from exact
    assert _mse(probflow.decode(gm, plain.x, g, method).x, x0) > 1e-8


def test_round_trip_float32(mixture):
    gm, x0 = mixture
    g = grids.ddim(SCH, 20)
    enc = encode_exact(gm, x0.float(), g, "heun2")
    assert enc.x.dtype == torch.float32
    assert _mse(probflow.decode(gm, enc.x, g, "heun2").x, x0) <= 1e-12


def _gauss_eps(s2: float):
    """ε of N(0, s2·I) in any shape: D = s2/(s2+σ²)·x̄, ε = (x̄ − D)/σ with x̄ = x·sqrt(1+σ²)."""
    def eps(x, sigma):
        xb = x * torch.sqrt(1 + sigma**2)
        return xb * sigma / (s2 + sigma**2)
    return eps


def test_any_batch_shape_matches_closed_form_direction():
    model = _gauss_eps(0.3)
    x0 = torch.randn(2, 1, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = grids.ddim(SCH, 10)
    enc = encode_exact(model, x0, g, "euler")
    assert enc.x.shape == x0.shape
    assert _mse(probflow.decode(model, enc.x, g, "euler").x, x0) <= 1e-24


def test_diffusers_ddim_scheduler_decodes_the_euler_latent(mixture):
    """Interoperability: diffusers' own DDIMScheduler loop (eta = 0, trailing, float64 ᾱ, set_alpha_to_one,
    clip_sample=False) maps the latent made exact for euler back to x_0."""
    from diffusers import DDIMScheduler

    gm, x0 = mixture
    steps = 10
    enc = encode_exact(gm, x0, grids.ddim(SCH, steps), "euler")
    sch = DDIMScheduler(num_train_timesteps=SCH.T, clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing="trailing", prediction_type="epsilon")
    sch.alphas_cumprod = SCH.alpha_bar.clone()
    sch.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sch.set_timesteps(steps)
    x = enc.x.clone()
    for t in sch.timesteps:
        x = sch.step(gm(x, SCH.sigmas[int(t)]), t, x, eta=0.0).prev_sample
    assert _mse(x, x0) <= 1e-24


def test_negative_control_other_decoder_is_not_exact(mixture):
    gm, x0 = mixture
    g = grids.ddim(SCH, 10)
    enc = encode_exact(gm, x0, g, "euler")
    assert _mse(probflow.decode(gm, enc.x, g, "heun2").x, x0) > 1e-8
    assert _mse(probflow.decode(gm, enc.x, grids.ddim(SCH, 11), "euler").x, x0) > 1e-8


def test_corrupted_latent_decodes_differently(mixture):
    gm, x0 = mixture
    g = grids.ddim(SCH, 10)
    z = encode_exact(gm, x0, g, "euler").x.clone()
    z[1, 5] += 1e-3
    back = probflow.decode(gm, z, g, "euler").x
    assert _mse(back[1], x0[1]) > 1e-14  # no hidden state restores it
    assert _mse(back[0], x0[0]) <= 1e-24  # the other samples are untouched


class _Perturbed:
    """ε·(1 + rel·ξ), ξ = ±1 fixed per element: a stand-in for another machine or thread count."""

    def __init__(self, model, rel: float) -> None:
        self.model, self.rel = model, rel

    def __call__(self, x, sigma):
        e = self.model(x, sigma)
        xi = torch.sign(torch.sin(torch.arange(e.numel(), dtype=e.dtype) * 12.9898 + 1.0)).reshape(e.shape)
        return e * (1 + self.rel * xi)


def test_robust_to_perturbed_eps_unlike_reversible_heun(mixture):
    gm, x0 = mixture
    g = grids.ddim(SCH, 10)
    rel = 1e-7
    enc = encode_exact(gm, x0, g, "euler")
    moved = float((probflow.decode(_Perturbed(gm, rel), enc.x, g, "euler").x - x0).abs().max())
    assert moved <= 10 * rel * max(1.0, float(x0.abs().max()))
    rev = probflow.encode(gm, x0, g, "reversible_heun")
    back = probflow.decode(_Perturbed(gm, rel), rev.x, g, "reversible_heun", state=rev.state).x
    rev_moved = float((back - x0).abs().max())
    assert rev_moved > moved  # the reversible pair amplifies what the ordinary decoder damps


def test_non_convergence_raises_with_sigma_and_residual(mixture):
    gm, x0 = mixture
    with pytest.raises(InversionError, match=r"σ = .*residual"):
        encode_exact(gm, x0, grids.ddim(SCH, 10), "euler", max_iter=1)


@pytest.mark.parametrize("method", ["reversible_heun", "dopri5"])
def test_refuses_methods_it_cannot_invert(mixture, method):
    gm, x0 = mixture
    with pytest.raises(ValueError, match="method"):
        encode_exact(gm, x0, grids.ddim(SCH, 10), method)


def test_single_step_newton_krylov_fallback_where_anderson_fails(monkeypatch):
    """Euler, 10 trailing steps, a sharp 64-D mixture, with plain fixed-point iteration (memory 0) limited to 8
    iterations per step: the matrix-free Newton–Krylov fallback (forward differences only) finishes the steps
    exactly; with the fallback disabled the same solve raises, naming σ and the residual."""
    import probflow.inversion.steps as inv

    gm = GaussianMixture.random(64, 8, seed=3, std_range=(0.1, 0.5))
    x0 = gm.sample(8, generator=torch.Generator().manual_seed(0))[:2]
    g = grids.ddim(SCH, 10)
    enc = encode_exact(gm, x0, g, "euler", max_iter=8, memory=0)
    fb = enc.info["newton_fallbacks"]
    assert fb and all(f["converged"] for f in fb)
    assert _mse(probflow.decode(gm, enc.x, g, "euler").x, x0) <= 1e-24

    def no_fallback(field, m, target, y, r, fail, bad, s, s_next, tol, max_iter, pre=None, level=None):
        return y, r, 0, {}

    monkeypatch.setattr(inv, "fallback", no_fallback)
    with pytest.raises(InversionError, match=r"σ = .*residual .* float64"):
        encode_exact(gm, x0, g, "euler", max_iter=8, memory=0)


def test_amplifying_chain_is_polished_by_shooting():
    """float32, Euler, 10 trailing steps, a sharp 64-D mixture: the per-step latent of some sample decodes with an
    RMS error above float32 round-off (the chain amplifies each step's rounding); Newton–Krylov on x_T (shooting)
    from that latent lowers it, and leaves the samples that did not need it alone."""
    gm = GaussianMixture.random(64, 8, seed=7, std_range=(0.1, 0.5))
    x0 = gm.sample(4, generator=torch.Generator().manual_seed(1)).float()
    g = grids.ddim(SCH, 10)

    def rms(z):
        return ((probflow.decode(gm, z, g, "euler").x.double() - x0.double()) ** 2).mean(1).sqrt()

    raw = encode_exact(gm, x0, g, "euler", polish=False, verify_tol=1.0)
    enc = encode_exact(gm, x0, g, "euler")
    polished = enc.info["shooting"]["samples"]
    assert raw.info["shooting"] is None and polished
    for j in polished:
        assert float(rms(enc.x)[j]) < 0.5 * float(rms(raw.x)[j])
    for j in set(range(len(x0))) - set(polished):
        assert torch.equal(enc.x[j], raw.x[j])


def test_polished_round_trip_is_the_decoders_own():
    """The verified round trip reported after a polish is what an independent decode of the returned latent gives
    (bit for bit; the polish's last decode is reused only where it ran on that very batch), and the verification
    calls are the verify decode plus the decodes the polish record counts."""
    gm = GaussianMixture.random(64, 8, seed=7, std_range=(0.1, 0.5))
    x0 = gm.sample(4, generator=torch.Generator().manual_seed(11)).float()
    g = grids.ddim(SCH, 10)
    enc = encode_exact(gm, x0, g, "euler")
    assert enc.info["shooting"] is not None
    back = probflow.decode(gm, enc.x, g, "euler").x
    assert enc.info["roundtrip_max_abs"] == float((back - x0).abs().amax())
    assert enc.info["nfe_verify"] == 10 * (1 + enc.info["shooting"]["decodes"])


# ------------------------------------------------- multistep decoders: the trajectory-level (shooting) solve

MULTISTEP = ["dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3", "unipc_4"]
# log-SNR grids (the exponential integrators' own): at 10 steps on grids with larger steps some samples have no
# exact latent near the warm start (dpmpp_3m, quadratic grid: continuation meets a fold), and the solve raises


@pytest.fixture(scope="module")
def small_mixture():
    gm = GaussianMixture.random(16, 8, seed=13, std_range=(0.1, 0.5))  # not the benchmark's, nor the tuning seed
    return gm, gm.sample(3, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("method", MULTISTEP)
def test_multistep_round_trip_float64(small_mixture, method, steps):
    gm, x0 = small_mixture
    g = grids.named("logsnr", SCH, steps)
    enc = encode_exact(gm, x0, g, method)
    assert _mse(probflow.decode(gm, enc.x, g, method).x, x0) <= 1e-24  # the ordinary decoder, x_T alone
    info = enc.info
    assert info["solve"] == "trajectory" and info["decoder"] == method
    assert enc.nfe == info["nfe_solve"] + info["nfe_verify"] and info["nfe_verify"] >= steps
    plain = probflow.encode(gm, x0, g, method)  # the method's explicit encode (the warm start) is not exact
    assert _mse(probflow.decode(gm, plain.x, g, method).x, x0) > 1e-10


@pytest.mark.parametrize("method", ["dpmpp_2m", "unipc_3"])
def test_multistep_round_trip_float32(small_mixture, method):
    gm, x0 = small_mixture
    g = grids.named("logsnr", SCH, 10)
    enc = encode_exact(gm, x0.float(), g, method)
    assert enc.x.dtype == torch.float32
    assert _mse(probflow.decode(gm, enc.x, g, method).x, x0) <= 1e-12


def test_multistep_float32_stops_at_round_off(small_mixture):
    # a trajectory residual within 4 ulps of float32 is its own round-off: the solve ends at the first such pass
    # (before, it spent passes there waiting for a stall: 7 on this case) and the round trip is still the target's
    gm, x0 = small_mixture
    g = grids.named("logsnr", SCH, 20)
    enc = encode_exact(gm, x0.float(), g, "dpmpp_2m")
    hist, ulp4 = enc.info["history"], 4 * torch.finfo(torch.float32).eps
    assert hist[-1] <= ulp4 and all(h > ulp4 for h in hist[:-1])
    assert _mse(probflow.decode(gm, enc.x, g, "dpmpp_2m").x, x0) <= 1e-12


def test_multistep_float32_stops_at_each_steps_own_round_off(small_mixture, monkeypatch):
    # R_i is evaluated from terms as large as x̄_i, which at the large-σ steps is several times x̄_{i+1}: a residual
    # within 4 ulps of max(|x̄_i|, |x̄_{i+1}|) is accepted at once, even where it is above 4 ulps of |x̄_{i+1}| (the
    # history's measure), instead of waiting there for a stall
    import probflow.inversion.trajectory as traj

    seen = []
    norms = traj.residual_norms
    monkeypatch.setattr(traj, "residual_norms", lambda *a: seen.append(norms(*a)) or seen[-1])
    gm, x0 = small_mixture
    g = grids.named("logsnr", SCH, 20)
    enc = encode_exact(gm, x0.float(), g, "dpmpp_3m")
    ulp4 = 4 * torch.finfo(torch.float32).eps
    ratios = [q for _, q in seen]  # the round-off ratio per pass
    assert len(ratios) == enc.info["iterations"][0]
    assert bool((ratios[-1] <= 1).all()) and not bool((ratios[-2] <= 1).all())
    assert enc.info["history"][-1] > ulp4  # the ulp4-of-x̄_{i+1} rule would not have ended here
    assert _mse(probflow.decode(gm, enc.x, g, "dpmpp_3m").x, x0) <= 1e-12


@pytest.mark.parametrize("ratio", [1.5, 3.0])
def test_multistep_float32_ends_near_round_off_once_no_longer_halving(small_mixture, monkeypatch, ratio):
    # within 8 ulps of the largest term (a round-off ratio ≤ 2 at 4 ulps) the solve ends once its best residual has
    # not halved in two passes; beyond that it goes on as before
    import probflow.inversion.trajectory as traj

    norms = traj.residual_norms
    monkeypatch.setattr(traj, "residual_norms", lambda *a: (norms(*a)[0], torch.full_like(norms(*a)[0], ratio)))
    gm, x0 = small_mixture
    g = grids.named("logsnr", SCH, 10)
    enc = encode_exact(gm, x0[:1].float(), g, "unipc")
    best, halved, since, stop = math.inf, math.inf, 0, None
    for k, h in enumerate(enc.info["history"], 1):  # the rule, from the per-pass residuals of the one sample
        best = min(best, h)
        halved, since = (best, 0) if best <= halved / 2 else (halved, since + 1)
        if since >= 2 and best <= 256 * torch.finfo(torch.float32).eps:
            stop = k
            break
    assert stop is not None
    passes = enc.info["iterations"][0]
    assert passes == stop if ratio <= 2 else passes > stop
    assert _mse(probflow.decode(gm, enc.x, g, "unipc").x, x0[:1]) <= 1e-12


def test_an_accepted_sample_keeps_improving_while_its_batch_runs():
    # a sample accepted at round-off is not frozen while others of the batch still run: here, frozen, one sample's
    # verified round trip needed the shooting polish (5 decodes more); iterating on with the batch, none does
    gm = GaussianMixture.random(16, 8, seed=21, std_range=(0.05, 0.5))
    x0 = gm.sample(8, generator=torch.Generator().manual_seed(5)).float()
    g = grids.named("quadratic_open", SCH, 10)
    enc = encode_exact(gm, x0, g, "dpmpp_2m")
    assert enc.info["shooting"] is None and enc.info["nfe_verify"] == 10
    assert _mse(probflow.decode(gm, enc.x, g, "dpmpp_2m").x, x0) <= 1e-12


def test_multistep_first_pass_reuses_the_warm_starts_calls(small_mixture):
    # the first teacher-forced pass runs on the explicit encode's own points: the model is called again only at
    # σ_0 (the encode never evaluates its last point); every later pass costs one decode (N calls)
    gm, x0 = small_mixture
    n = 20
    g = grids.named("logsnr", SCH, n)
    warm = probflow.encode(gm, x0, g, "dpmpp_2m").nfe
    enc = encode_exact(gm, x0, g, "dpmpp_2m")
    passes = enc.info["iterations"][0]
    assert passes >= 3
    assert enc.info["nfe_solve"] == warm + 1 + (passes - 1) * n
    assert _mse(probflow.decode(gm, enc.x, g, "dpmpp_2m").x, x0) <= 1e-24


def test_multistep_negative_control_and_no_hidden_state(small_mixture):
    gm, x0 = small_mixture
    g = grids.named("logsnr", SCH, 10)
    z = encode_exact(gm, x0, g, "dpmpp_2m").x
    assert _mse(probflow.decode(gm, z, g, "unipc").x, x0) > 1e-10  # exact for dpmpp_2m only
    assert _mse(probflow.decode(gm, z, g, "dpmpp_3m").x, x0) > 1e-10
    bad = z.clone()
    bad[0, 3] += 1e-3
    assert _mse(probflow.decode(gm, bad, g, "dpmpp_2m").x[0], x0[0]) > 1e-14


def test_multistep_sample_does_not_depend_on_the_batch(small_mixture):
    gm, x0 = small_mixture
    g = grids.named("logsnr", SCH, 10)
    together = encode_exact(gm, x0, g, "unipc")
    alone = encode_exact(gm, x0[1:2], g, "unipc")
    # the same latent to round-off (batched model calls may round differently, which can change the iteration at
    # which round-off is reached, not the solution)
    assert torch.allclose(together.x[1:2], alone.x, rtol=0, atol=1e-12 * float(alone.x.abs().max()))
    assert _mse(probflow.decode(gm, alone.x, g, "unipc").x, x0[1:2]) <= 1e-24


def test_multistep_any_batch_shape():
    model = _gauss_eps(0.3)
    x0 = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = grids.named("logsnr", SCH, 10)
    enc = encode_exact(model, x0, g, "dpmpp_3m")
    assert enc.x.shape == x0.shape
    assert _mse(probflow.decode(model, enc.x, g, "dpmpp_3m").x, x0) <= 1e-24


def _aniso_eps(s2: torch.Tensor):
    """ε of N(0, diag(s2)) (variances per coordinate of the last axis): linear, but no per-sample scalar (the
    solver's Gaussian surrogate) is its Jacobian."""
    def eps(x, sigma):
        xb = x * torch.sqrt(1 + sigma**2)
        return xb * sigma / (s2 + sigma**2)
    return eps


@pytest.mark.parametrize("method", MULTISTEP)
def test_multistep_latent_is_the_closed_form_inverse_of_a_linear_decoder(method):
    # for a linear ε the decoder is x_0 = diag(gain)·x_T per coordinate; gain from decoding the unit latent
    # (the decoder alone, no inversion), so the exact latent is x_0/gain, known independently of encode_exact
    s2 = torch.tensor([0.01, 0.09, 0.25, 1.0, 4.0], dtype=torch.float64)
    model = _aniso_eps(s2)
    g = grids.named("logsnr", SCH, 10)
    gain = probflow.decode(model, torch.ones(1, 5, dtype=torch.float64), g, method).x
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    enc = encode_exact(model, x0, g, method)
    exact = x0 / gain
    assert torch.allclose(enc.x, exact, rtol=1e-11, atol=0)
    assert _mse(probflow.encode(model, x0, g, method).x, exact) > 1e-8  # the explicit encode is not it


def test_multistep_non_convergence_raises(small_mixture):
    gm, x0 = small_mixture
    with pytest.raises(InversionError, match=r"σ = .*residual"):
        encode_exact(gm, x0, grids.named("logsnr", SCH, 10), "dpmpp_2m", max_iter=1)


def test_dpmpp_2m_latent_decodes_through_diffusers_dpm_solver(small_mixture):
    """Interoperability: diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, solver_type "heun", no
    lower-order final step, ending at σ_0 = final_sigmas_type "sigma_min", float64 tables, custom integer
    timesteps log-SNR spaced) maps the latent made exact for probflow's dpmpp_2m back to x_0, to the float32
    round-off of its step (it upcasts the state to float32); probflow's decoder to float64 round-off."""
    from diffusers import DPMSolverMultistepScheduler

    from probflow.bench.peers import _betas

    gm, x0 = small_mixture
    ts = [int(round(float(SCH.t(s)))) for s in grids.log_uniform(SCH.sigma_max, 2 * SCH.sigma_min, 9)[:-1]]
    sch = DPMSolverMultistepScheduler(num_train_timesteps=SCH.T, trained_betas=_betas(SCH),
                                      algorithm_type="dpmsolver++", solver_order=2, solver_type="heun",
                                      lower_order_final=False, euler_at_final=False, final_sigmas_type="sigma_min",
                                      thresholding=False, prediction_type="epsilon")
    ab = SCH.alpha_bar.clone()
    sch.alphas_cumprod, sch.alpha_t, sch.sigma_t = ab, ab.sqrt(), (1 - ab).sqrt()
    sch.lambda_t = torch.log(sch.alpha_t) - torch.log(sch.sigma_t)
    g = torch.tensor([float(SCH.sigmas[t]) for t in ts] + [float(SCH.sigmas[0])], dtype=torch.float64)

    def through_diffusers(z):
        sch.set_timesteps(timesteps=ts)
        assert torch.allclose(sch.sigmas.double(), g, rtol=1e-6, atol=0)
        sch.sigmas = g.clone()
        x = z.clone()
        for t in sch.timesteps:
            x = sch.step(gm(x, SCH.sigmas[int(t)]), t, x).prev_sample
        return x

    enc = encode_exact(gm, x0, g, "dpmpp_2m")
    assert _mse(probflow.decode(gm, enc.x, g, "dpmpp_2m").x, x0) <= 1e-24
    assert _mse(through_diffusers(enc.x), x0) <= 1e-13
    assert _mse(through_diffusers(probflow.encode(gm, x0, g, "dpmpp_2m").x), x0) > 1e-8  # the plain encode is not


def test_trajectory_is_the_decoders_path(mixture):
    gm, x0 = mixture
    g = grids.ddim(SCH, 10)
    enc = encode_exact(gm, x0, g, "euler", trajectory=True)
    dec = probflow.decode(gm, enc.x, g, "euler", trajectory=True)
    assert enc.trajectory.shape == dec.trajectory.shape
    assert torch.allclose(enc.trajectory.flip(0), dec.trajectory, rtol=0, atol=1e-10)
    assert math.isclose(float(enc.sigmas[-1]), float(g[0]))


# ---------------------------------------------------------------- the CLI's defaults on the shipped digits model

HELD_OUT_PAIRS = [(120, 121), (122, 123)]  # test-split indices never used to choose the default (pairs 0–29)
CONFIDENCE_BOUND = 0.85  # default on held-out pairs 50–59: 0.927 (worst pair 0.837); the old default: ≤ 0.81


def _strip_confidence(clf, path, frames):
    import numpy as np
    from PIL import Image

    pix = np.asarray(Image.open(path)).astype(np.float64)  # nrow = frames, pad 2, scale 1
    x = np.stack([pix[2:10, 2 + k * 10:10 + k * 10] for k in range(frames)]).reshape(frames, 64) / 255 * 2 - 1
    return clf.predict_proba(x).max(1)


@pytest.fixture(scope="module")
def digits_env(tmp_path_factory):
    from probflow.digits import fit_classifier, load_split
    from probflow.io.images import save_images

    split = load_split()
    clf, _ = fit_classifier(split)
    d = tmp_path_factory.mktemp("digits")
    idx = [i for p in HELD_OUT_PAIRS for i in p]
    save_images(split["x_test"][idx].double(), d, names=[f"d{i}" for i in idx])
    return clf, d, split


def test_default_interpolate_gives_clean_digits_and_the_old_default_did_not(digits_env, tmp_path, capsys):
    import warnings

    import numpy as np

    from probflow.cli import main
    from probflow.models import load

    clf, d, split = digits_env
    conf = []
    for a, b in HELD_OUT_PAIRS:
        out = tmp_path / f"s{a}.png"
        assert main(["interpolate", str(d / f"d{a}.png"), str(d / f"d{b}.png"), "--frames", "8", "--scale", "1",
                     "--out", str(out), "--quiet"]) == 0
        conf.append(_strip_confidence(clf, out, 8))
    assert "exact latents" in capsys.readouterr().out
    assert float(np.mean(conf)) >= CONFIDENCE_BOUND
    # the old default (reversible_heun, 50 uniform steps, ends from the encode's state) on the same pairs
    model = load("digits")
    g = grids.named("uniform", model.schedule, 50)
    old = []
    for a, b in HELD_OUT_PAIRS:
        x = split["x_test"][[a, b]].double()
        enc = probflow.encode(model, x, g, "reversible_heun")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fr = probflow.interpolate(model, enc.x[:1], enc.x[1:], g, "reversible_heun", frames=8, state=enc.state).x
        old.append(clf.predict_proba(fr.reshape(8, 64).clamp(-1, 1).numpy()).max(1))
    assert float(np.mean(old)) < CONFIDENCE_BOUND
    # and the CLI now refuses it instead of writing noise
    rc = main(["interpolate", str(d / "d120.png"), str(d / "d121.png"), "--method", "reversible_heun", "--steps", "50",
               "--out", str(tmp_path / "old.png"), "--quiet"])
    assert rc == 2 and "unstable" in capsys.readouterr().err


def test_default_encode_decode_round_trip_is_exact_and_reproducible(digits_env, tmp_path, capsys):
    import json

    from safetensors import safe_open

    from probflow.cli import main

    _, d, _ = digits_env
    imgs = [str(d / "d120.png"), str(d / "d121.png")]
    z1, z2 = tmp_path / "z1.safetensors", tmp_path / "z2.safetensors"
    assert main(["encode", *imgs, "--out", str(z1), "--quiet"]) == 0
    assert main(["encode", *imgs, "--out", str(z2), "--quiet"]) == 0
    assert z1.read_bytes() == z2.read_bytes()  # byte-reproducible files
    with safe_open(str(z1), framework="pt") as f:
        meta = json.loads(f.metadata()["probflow"])
        assert set(f.keys()) == {"latents", "sigmas"}  # one tensor latent, no hidden state
    assert meta["exact_for"] == "euler" and meta["grid"] == "quadratic_open" and meta["steps"] == "20"
    capsys.readouterr()
    assert main(["decode", str(z1), "--out", str(tmp_path / "dec"), "--quiet"]) == 0
    assert "exact inverse" in capsys.readouterr().out
    for i in (120, 121):
        assert (tmp_path / "dec" / f"d{i}.png").read_bytes() == (d / f"d{i}.png").read_bytes()


def test_reversible_latent_decoded_on_another_thread_count_is_not_called_exact(digits_env, tmp_path, capsys):
    from probflow.cli import main

    _, d, _ = digits_env
    z = tmp_path / "r.safetensors"
    assert main(["encode", str(d / "d120.png"), "--method", "reversible_heun", "--steps", "5", "--threads", "1",
                 "--out", str(z), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["decode", str(z), "--threads", "1", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert "exact inverse" in capsys.readouterr().out
    assert main(["decode", str(z), "--threads", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "exact inverse" not in out and "NOT exact" in out
    assert "WARNING: NOT EXACT" in err and "threads 1 → 2" in err


def test_sample_with_stateless_reversible_heun_is_refused_on_digits(tmp_path, capsys):
    from probflow.cli import main

    rc = main(["sample", "--method", "reversible_heun", "--steps", "20", "--n", "4", "--out", str(tmp_path / "s.png"),
               "--quiet"])
    assert rc == 2 and "unstable" in capsys.readouterr().err and not (tmp_path / "s.png").exists()


def test_cli_encode_exact_for_a_multistep_decoder(digits_env, tmp_path, capsys):
    import json

    from safetensors import safe_open

    from probflow.cli import main

    _, d, _ = digits_env
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(d / "d122.png"), "--method", "dpmpp_2m", "--steps", "6", "--out", str(z),
                 "--quiet"]) == 0
    assert "exact for the dpmpp_2m decoder" in capsys.readouterr().out
    with safe_open(str(z), framework="pt") as f:
        meta = json.loads(f.metadata()["probflow"])
        assert set(f.keys()) == {"latents", "sigmas"}
    assert meta["exact_for"] == "dpmpp_2m" and meta["method"] == "dpmpp_2m"
    assert main(["decode", str(z), "--out", str(tmp_path / "dec"), "--quiet"]) == 0  # nothing but the file
    assert "exact inverse" in capsys.readouterr().out
    assert (tmp_path / "dec" / "d122.png").read_bytes() == (d / "d122.png").read_bytes()
    assert main(["decode", str(z), "--method", "unipc", "--out", str(tmp_path / "other"), "--quiet"]) == 0
    assert "exact inverse" not in capsys.readouterr().out  # another decoder makes no claim


def test_exact_latent_decoded_on_another_thread_count_gives_the_same_png(digits_env, tmp_path, capsys):
    """The default exact latent (made on 1 thread) decodes on 2 threads, whose float32 reductions round differently,
    to the input's bytes: the latent is exact to round-off, far inside the half-level a PNG byte would need."""
    from probflow.cli import main

    _, d, _ = digits_env
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(d / "d120.png"), "--threads", "1", "--out", str(z), "--quiet"]) == 0
    assert main(["decode", str(z), "--threads", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert (tmp_path / "b" / "d120.png").read_bytes() == (d / "d120.png").read_bytes()
    out, err = capsys.readouterr()
    assert "environment differs" in out and "threads 1 → 2" in err  # said, not hidden: bytes are not promised


def test_a_digits_batch_whose_first_step_nearly_folds_gets_its_latents():
    """Test images 16–19 in one batch, euler, 10 quadratic_open steps, float32: the first step (σ 157 → 32) nearly
    folds for image 16 (benchmarks/DESIGN.md), and the batched solve of that step had ended in an InversionError
    while each image alone inverts; the samples a batched step leaves are now solved again alone."""
    from probflow.digits import load_split
    from probflow.field import DDIMField
    from probflow.models import load

    model = load("digits")
    x0 = load_split()["x_test"][[16, 17, 18, 19]].float()
    g = grids.named("quadratic_open", model.schedule, 10)
    sol = encode_exact(DDIMField(model, torch.float32), x0, g, "euler")
    back = probflow.decode(DDIMField(model, torch.float32), sol.x, g, "euler").x
    assert sol.info["exact"] == "round-off" and float(((back - x0) / 2).pow(2).mean()) <= 1e-12
