"""Exact inversion under classifier-free guidance in float32, the dtype networks run in: a tiny guided UNet with
torch's scaled-dot-product attention decodes its exact latent back to the input to float32 round-off (PNG pixels
identical); and a step with no preimage ends in InversionError naming σ, the residual,
the step's own round-off floor and what to try."""

import copy
import math

import pytest
import torch

import probflow
from probflow import grids
from probflow.inversion import InversionError, encode_exact
from probflow.io.images import to_uint8
from probflow.models.conditional import guided_model
from probflow.schedules import linear

diffusers = pytest.importorskip("diffusers")

SCH = linear(1000, 1e-4, 0.02)


@pytest.fixture(scope="module")
def guided():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=4, attention_head_dim=4).eval()
    u = copy.deepcopy(unet)
    with torch.no_grad():  # an untrained ε varies with x far more than a trained one (see test_conditional.py)
        u.conv_out.weight.mul_(0.03)
        u.conv_out.bias.mul_(0.03)
    return guided_model(u, SCH, "epsilon", {"class_labels": torch.tensor([1])}, {"class_labels": torch.tensor([3])},
                        3.0, sample_shape=(1, 8, 8), name="tiny")


def test_float32_guided_round_trip_is_round_off_and_png_identical(guided):
    sig = grids.named("quadratic_open", SCH, 10)
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randint(0, 256, (2, 1, 8, 8), generator=g).float() / 255) * 2 - 1  # 8-bit pixels, as from a PNG
    sol = encode_exact(guided, x0, sig)
    back = probflow.decode(guided, sol.x, sig).x
    err = (back - x0).abs().max().item()
    # float32 round-off of a 10-step chain: a few hundred ulp of the image scale at most
    assert err <= 256 * torch.finfo(torch.float32).eps
    assert sol.info["roundtrip_max_abs"] == pytest.approx(err, rel=0, abs=1e-7)
    assert (to_uint8(back) == to_uint8(x0)).all()
    plain = probflow.decode(guided, probflow.encode(guided, x0, sig).x, sig).x
    assert (plain - x0).abs().max().item() > 100 * max(err, 1e-7)  # plain DDIM inversion under CFG drifts


class NoPreimage:
    """ε that makes the last Euler step of GRID the map x̄ ↦ 0.5·tanh(x̄) (bounded: a target beyond 0.5 has no
    preimage) and the steps before it the identity."""

    GRID = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    sample_shape = (4,)

    def __call__(self, x, sigma):
        s = float(sigma)
        xbar = x * math.sqrt(1 + s * s)
        if abs(s - 1.0) > 1e-9:
            return torch.zeros_like(x)
        return (0.5 * torch.tanh(xbar) - xbar) / (0.5 - 1.0)


def test_a_step_without_preimage_raises_naming_sigma_residual_floor_and_remedy():
    m = NoPreimage()
    x0 = torch.full((1, 4), 0.4, dtype=torch.float64)  # x̄_N = 0.4·sqrt(1.25) ≈ 0.447 < 0.5: a preimage exists
    sol = encode_exact(m, x0, m.GRID)
    assert (probflow.decode(m, sol.x, m.GRID).x - x0).abs().max().item() <= 1e-12
    x0 = torch.full((1, 4), 0.9, dtype=torch.float64)  # x̄_N ≈ 1.006 > 0.5: none
    with pytest.raises(InversionError) as e:
        encode_exact(m, x0, m.GRID)
    msg = str(e.value)
    assert "σ = 1 → 0.5" in msg and "residual" in msg and "round-off floor" in msg and "more steps" in msg
    resid = float(msg.split("residual ")[1].split(" ")[0])
    assert resid >= 0.99 * (0.9 * math.sqrt(1.25) - 0.5)  # the gap to the map's bound, not a round-off miss
