"""The condition is part of the model, and classifier-free guidance is a vector field: ε_w = ε_∅ + w (ε_c − ε_∅)
with both halves in one batched forward; w = 0 and w = 1 are the network's unconditional and conditional output
bit for bit; the condition and w are in the fingerprint; every use of an ε-model (solvers, encode/decode,
interpolate, exact inversion, likelihood) runs on the guided field of one fixed condition."""

import copy
import math

import pytest
import torch

import probflow
from probflow import grids
from probflow.inversion import encode_exact
from probflow.likelihood import likelihood
from probflow.models.conditional import GuidedNet, condition_record, guided_model, with_guidance
from probflow.schedules import linear

diffusers = pytest.importorskip("diffusers")

SCH = linear(1000, 1e-4, 0.02)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=4, attention_head_dim=4).eval()


def C(k):  # noqa: N802
    return {"class_labels": torch.tensor([k])}


def model_of(unet, w, c=1, null=3, pred="epsilon"):
    return guided_model(unet, SCH, pred, C(c), C(null), w, sample_shape=(1, 8, 8), name="tiny")


def raw(unet, x, k, c):
    """The network's own output at table index k for class c (what diffusers' pipelines call)."""
    with torch.no_grad():
        return unet(x, torch.full((len(x),), float(k)), class_labels=torch.full((len(x),), c)).sample


@pytest.mark.parametrize("k", [0, 480, 999])
def test_w1_is_the_conditional_and_w0_the_unconditional_network_output_exactly(unet, k):
    x = torch.randn(3, 1, 8, 8)
    s = SCH.sigmas[k]
    assert torch.equal(model_of(unet, 1.0)(x, s), raw(unet, x, k, 1))
    assert torch.equal(model_of(unet, 0.0)(x, s), raw(unet, x, k, 3))
    assert not torch.equal(raw(unet, x, k, 1), raw(unet, x, k, 3))  # the condition does change ε


@pytest.mark.parametrize("w", [-1.0, 0.5, 3.0, 7.5])
def test_guided_eps_is_the_cfg_combination_from_one_batched_forward(unet, w):
    x = torch.randn(3, 1, 8, 8)
    calls = []
    h = unet.register_forward_hook(lambda mod, args, kw_out: calls.append(args[0].shape[0]))
    try:
        eps = model_of(unet, w)(x, SCH.sigmas[700])
    finally:
        h.remove()
    assert calls == [6]  # [x; x] with [∅; c]: both halves in one forward
    u, c = raw(unet, x, 700, 3), raw(unet, x, 700, 1)
    ref = u.double() + w * (c.double() - u.double())
    assert (eps.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_guidance_commutes_with_the_prediction_type_conversion(unet, pred):
    """CFG on the raw output then the (affine) conversion = CFG on the converted ε of each half."""
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    s = SCH.sigmas[300]
    e = model_of(unet, 2.5, pred=pred)(x, s)
    eu, ec = model_of(unet, 0.0, pred=pred)(x, s), model_of(unet, 1.0, pred=pred)(x, s)
    assert (e - (eu + 2.5 * (ec - eu))).abs().max().item() <= 1e-5 * e.abs().max().item()


def test_fingerprint_covers_condition_and_w(unet):
    fps = {model_of(unet, w, c).fingerprint for w in (1.0, 3.0) for c in (0, 1)}
    assert len(fps) == 4
    assert model_of(unet, 3.0, 1).fingerprint == model_of(unet, 3.0, 1).fingerprint
    assert model_of(unet, 3.0, 1, null=2).fingerprint != model_of(unet, 3.0, 1, null=3).fingerprint
    rec = condition_record(model_of(unet, 3.0, 1))
    assert rec["class_label"] == "1" and rec["negative_class_label"] == "3" and float(rec["guidance"]) == 3.0
    m = with_guidance(model_of(unet, 3.0, 1), 5.0, C(2))
    assert m.net.unet is unet and m.condition["class_label"] == "2" and m.condition["guidance"] == "5.0"


@pytest.mark.parametrize("method", ["euler", "heun2", "dpmpp_2m", "dopri5"])
def test_every_solver_integrates_the_guided_field(unet, method):
    """Each solver on the guided model equals the same solver on the field ε_∅ + w (ε_c − ε_∅) built by hand."""
    m = model_of(unet, 3.0)
    mu, mc = model_of(unet, 0.0), model_of(unet, 1.0)

    def by_hand(x, s):
        u, c = mu(x, s), mc(x, s)
        return u + 3.0 * (c - u)

    z = probflow.noise(2, (1, 8, 8), seed=1)
    sig = grids.ddim(SCH, 8)
    a = probflow.sample(m, z, sig, method, rtol=1e-4, atol=1e-4).x
    b = probflow.sample(by_hand, z, sig, method, rtol=1e-4, atol=1e-4).x
    # fixed grids: round-off of the batched forward; adaptive: the step controller may pick other steps, within rtol
    bound = 1e-3 if method == "dopri5" else 1e-5
    assert (a - b).abs().max().item() <= bound * max(1.0, b.abs().max().item())


def test_exact_inversion_under_guidance_returns_the_image(unet):
    """float64 throughout (network included), so that exact means round-off of float64. The random network's
    output layer is scaled by 0.03: an untrained ε varies with x far more than a trained one at large σ, so its
    large steps are not contractions and the step solves (probflow.inversion) need not converge."""
    u64 = copy.deepcopy(unet).double()
    with torch.no_grad():
        u64.conv_out.weight.mul_(0.03)
        u64.conv_out.bias.mul_(0.03)

    def m64(w, c=1):
        return guided_model(u64, SCH, "epsilon", C(c), C(3), w, sample_shape=(1, 8, 8), model_dtype=torch.float64)

    m = m64(3.0)
    sig = grids.named("quadratic_open", SCH, 10)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    lat = encode_exact(m, x0, sig).x
    back = probflow.decode(m, lat, sig).x
    assert (back - x0).abs().max().item() <= 1e-11
    plain = probflow.decode(m, probflow.encode(m, x0, sig).x, sig).x
    assert (plain - x0).abs().max().item() > 1e3 * (back - x0).abs().max().item()
    # the same latent under another condition or w is another image
    assert (probflow.decode(m64(3.0, c=0), lat, sig).x - x0).abs().max().item() > 1e-3
    assert (probflow.decode(m64(1.0), lat, sig).x - x0).abs().max().item() > 1e-3


def test_interpolation_and_likelihood_run_on_the_guided_field(unet):
    m = model_of(unet, 2.0)
    sig = grids.ddim(SCH, 6)
    z = probflow.noise(2, (1, 8, 8), seed=2)
    out = probflow.interpolate(m, z[:1], z[1:], sig, frames=3).x  # (frames, 1, 1, 8, 8)
    ends = probflow.sample(m, z, sig).x
    scale = ends.abs().max().item()
    assert (out[0, 0] - ends[0]).abs().max().item() <= 1e-5 * scale
    assert (out[-1, 0] - ends[1]).abs().max().item() <= 1e-5 * scale
    # the likelihood (exact divergence by VJPs through the batched CFG forward) equals that of the hand-made field
    mu, mc = model_of(unet, 0.0), model_of(unet, 1.0)

    def by_hand(x, s):
        u, c = mu(x, s), mc(x, s)
        return u + 2.0 * (c - u)

    x0 = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1)
    up = grids.ddim(SCH, 6).flip(0)
    a, b = likelihood(m, x0, up, "euler").log_prob, likelihood(by_hand, x0, up, "euler").log_prob
    assert math.isfinite(float(a[0])) and abs(float(a[0] - b[0])) <= 1e-5 * abs(float(b[0]))


def test_bad_guidance_and_conditions(unet):
    for w in (float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match="^guidance: expected a finite number"):
            model_of(unet, w)
    with pytest.raises(ValueError, match="^guidance: w = 3 needs a null/negative condition"):
        GuidedNet(unet, C(1), None, 3.0)
    with pytest.raises(ValueError, match="^condition: class_labels: expected a tensor with a leading batch"):
        GuidedNet(unet, {"class_labels": torch.tensor([1, 2])}, None, 1.0)
    with pytest.raises(ValueError, match="^condition: unknown key 'labels'"):
        GuidedNet(unet, {"labels": torch.tensor([1])}, None, 1.0)
    with pytest.raises(ValueError, match="^negative: encoder_hidden_states: expected shape"):
        GuidedNet(unet, {"encoder_hidden_states": torch.zeros(1, 4, 8)},
                  {"encoder_hidden_states": torch.zeros(1, 5, 8)}, 2.0)
