"""reversible_heun: exact round trips (any step count, float64/float32, a real network), order 2 against
scipy's DOP853, and refusal of a wrong partner state."""

import math

import pytest
import torch

import probflow
from probflow import grids, schedules
from probflow.field import DDIMField
from probflow.models import GaussianMixture
from probflow.models.digits import as_model
from probflow.models.unet import UNet
from probflow.reversible import QUANTUM, HeunState, from_fixed, to_fixed
from probflow.solvers import get_method

SCH = schedules.linear()
GM = GaussianMixture.random(64, 8, seed=1, std_range=(0.1, 0.5))


def _randomise(net):
    """Random weights everywhere (UNet zero-initialises its output layers, so a fresh one predicts ε = 0)."""
    with torch.no_grad():  # from torch's global generator, seeded by the caller
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape) / max(1, p[0].numel()) ** 0.5)
    return net


@pytest.fixture(scope="module")
def x0():
    return GM.sample(8, generator=torch.Generator().manual_seed(0))


def test_reversible_heun_is_registered_as_reversible_order_2():
    m = get_method("reversible_heun")
    assert m.reversible and m.order == 2 and m.stages == 1 and not m.adaptive


@pytest.mark.parametrize("steps", [3, 10, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trip_returns_the_input_exactly(x0, steps, dtype):
    g = grids.ddim(SCH, steps)
    x = x0.to(dtype)
    enc = probflow.encode(GM, x, g, "reversible_heun")
    dec = probflow.decode(GM, enc.x, g, "reversible_heun", state=enc.state)
    assert enc.nfe == steps + 1 and dec.nfe == steps  # one model call per step (+1 to start the pair)
    # bit for bit: the input rounded to the fixed-point quantum q
    assert torch.equal(dec.x, from_fixed(to_fixed(x), dtype))
    mse = (dec.x.double() - x.double()).pow(2).mean().item()
    assert mse <= QUANTUM**2 / 4
    assert mse <= (1e-24 if dtype == torch.float64 else 1e-10)  # the targets at any step count
    # the latent moved far from the data: the round trip is not trivially exact
    assert (enc.x.double() - x.double()).abs().mean() > 0.3


def test_round_trip_is_exact_through_a_float32_network():
    torch.manual_seed(0)
    model = as_model(_randomise(UNet(in_channels=1, channels=(8, 16), blocks=1)))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    g = grids.ddim(model.schedule, 10)
    enc = probflow.encode(DDIMField(model, torch.float32), x, g, "reversible_heun")
    dec = probflow.decode(DDIMField(model, torch.float32), enc.x, g, "reversible_heun", state=enc.state)
    assert torch.equal(dec.x, from_fixed(to_fixed(x), torch.float64))
    assert (dec.x - x).pow(2).mean().item() < 1e-24
    assert (enc.x - x).abs().mean() > 0.3 and DDIMField(model)(torch.tensor(1.0), x).abs().mean() > 0.01


@pytest.mark.parametrize("direction", ["down", "up"])
def test_reversible_heun_converges_at_order_2_against_dop853(direction):
    gm = GaussianMixture.random(8, 4, seed=3, std_range=(0.2, 0.6))
    x = probflow.noise(16, (8,), seed=1)
    errs = []
    for n in (20, 40, 80):
        g = torch.linspace(3.0, 0.3, n + 1, dtype=torch.float64)
        g = g if direction == "down" else g.flip(0)
        if not errs:
            ref = probflow.integrate(gm, x, g, "scipy_dop853", rtol=1e-12, atol=1e-12, options={"group": 16}).x
        errs.append((probflow.integrate(gm, x, g, "reversible_heun").x - ref).abs().max().item())
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert all(1.8 < p < 2.3 for p in orders), (errs, orders)


def test_latent_approaches_the_exact_ode_latent_as_steps_grow(x0):
    g10, g40 = grids.ddim(SCH, 10), grids.ddim(SCH, 40)
    exact = probflow.encode(GM, x0, g10, "scipy_dop853", rtol=1e-10, atol=1e-10, options={"group": 8}).x
    d10 = (probflow.encode(GM, x0, g10, "reversible_heun").x - exact).pow(2).mean().item()
    d40 = (probflow.encode(GM, x0, g40, "reversible_heun").x - exact).pow(2).mean().item()
    assert d40 < d10 / 8, (d10, d40)


def test_refuses_a_partner_state_that_is_not_its_own(x0):
    g = grids.ddim(SCH, 5)
    enc = probflow.encode(GM, x0, g, "reversible_heun")
    with pytest.raises(ValueError, match="state: .*does not belong"):  # other latents, same shape
        probflow.decode(GM, enc.x + 1e-3, g, "reversible_heun", state=enc.state)
    with pytest.raises(ValueError, match="state: .*shape"):  # another batch
        probflow.decode(GM, enc.x[:4], g, "reversible_heun", state=enc.state)
    with pytest.raises(ValueError, match="state: .*σ"):  # another grid
        probflow.decode(GM, enc.x, grids.ddim(schedules.cosine(), 5), "reversible_heun", state=enc.state)
    with pytest.raises(ValueError, match="state: .*HeunState"):  # another method's state
        probflow.decode(GM, enc.x, g, "reversible_heun", state=torch.zeros(3))


def test_state_tensors_round_trip_and_bad_ones_are_refused(x0):
    g = grids.ddim(SCH, 4)
    enc = probflow.encode(GM, x0, g, "reversible_heun")
    st = HeunState.from_tensors(enc.state.tensors())
    dec = probflow.decode(GM, enc.x, g, "reversible_heun", state=st)
    assert torch.equal(dec.x, from_fixed(to_fixed(x0), torch.float64))
    t = enc.state.tensors()
    with pytest.raises(ValueError, match="lacks"):
        HeunState.from_tensors({k: v for k, v in t.items() if k != "xhat"})
    with pytest.raises(ValueError, match="int64"):
        HeunState.from_tensors({**t, "xbar": t["xbar"].double()})


def test_overflow_of_the_fixed_point_range_is_an_error():
    x = torch.full((1, 2), 1e6, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="fixed-point range"):
        probflow.integrate(GM.__class__.random(2, 2, seed=0), x, torch.tensor([1.0, 0.5], dtype=torch.float64),
                           "reversible_heun")
