"""Sample/encode/decode/interpolate through the one integrate path; round trips; dtype; bad input."""

import math

import pytest
import torch

import probflow
from probflow import grids, schedules
from probflow.models import GaussianMixture

SCH = schedules.linear()
GM64 = GaussianMixture.random(64, 8, seed=1, std_range=(0.1, 0.5))


@pytest.fixture(scope="module")
def x0():
    return GM64.sample(16, generator=torch.Generator().manual_seed(0))


def test_dopri5_round_trip_is_accurate_in_float64(x0):
    g = torch.tensor([SCH.sigma_max, 0.0], dtype=torch.float64)
    enc = probflow.encode(GM64, x0, g, "dopri5", rtol=1e-8, atol=1e-8)
    dec = probflow.decode(GM64, enc.x, g, "dopri5", rtol=1e-8, atol=1e-8)
    mse = ((dec.x - x0) ** 2).mean().item()
    print(f"dopri5 round trip: per-dim MSE {mse:.3e}, NFE {enc.nfe} + {dec.nfe}")
    assert mse < 1e-12


def test_euler_round_trip_error_falls_like_one_over_steps(x0):
    errs = {}
    for n in (25, 50, 100, 200):
        g = grids.ddim(SCH, n)
        z = probflow.encode(GM64, x0, g, "euler").x
        errs[n] = (probflow.decode(GM64, z, g, "euler").x - x0).pow(2).mean().sqrt().item()
    ratios = [errs[n] / errs[2 * n] for n in (25, 50, 100)]
    assert all(1.5 < r < 2.6 for r in ratios), (errs, ratios)


def test_encode_ends_at_the_exact_ode_latent(x0):
    g = grids.ddim(SCH, 20)
    exact = probflow.encode(GM64, x0[:4], g, "scipy_dop853", rtol=1e-10, atol=1e-10, options={"group": 4}).x
    rk4 = probflow.encode(GM64, x0[:4], grids.ddim(SCH, 200), "rk4").x
    assert (rk4 - exact).abs().max().item() < 1e-5


def test_trajectory_is_in_the_model_variable_and_ends_at_x():
    gm = probflow.models.default_mixture()
    xT = probflow.noise(8, (2,), seed=0)
    g = grids.ddim(SCH, 10)
    sol = probflow.sample(gm, xT, g, "rk4", trajectory=True)
    assert sol.trajectory.shape == (11, 8, 2)
    assert torch.equal(sol.trajectory[0], xT) or torch.allclose(sol.trajectory[0], xT, rtol=1e-15)
    assert torch.allclose(sol.trajectory[-1], sol.x)


def test_float32_runs_end_to_end_and_agrees_with_float64():
    xT = probflow.noise(32, (64,), seed=2)
    g = grids.ddim(SCH, 20)
    for method in ("euler", "rk4"):
        s64 = probflow.sample(GM64, xT, g, method)
        s32 = probflow.sample(GM64, xT.float(), g, method)
        assert s32.x.dtype == torch.float32
        assert (s32.x.double() - s64.x).abs().max().item() < 1e-4
    d32 = probflow.sample(GM64, xT.float(), g[[0, -1]], "dopri5", rtol=1e-5, atol=1e-5)
    d64 = probflow.sample(GM64, xT, g[[0, -1]], "dopri5", rtol=1e-5, atol=1e-5)
    assert (d32.x.double() - d64.x).abs().max().item() < 1e-3


def test_same_seed_same_numbers_and_noise_is_independent_of_batch_size():
    a = probflow.noise(10, (3, 4), seed=7)
    b = probflow.noise(3, (3, 4), seed=7)
    assert torch.equal(a[:3], b)
    assert not torch.equal(probflow.noise(3, (3, 4), seed=8), b)
    g = grids.ddim(SCH, 10)
    assert torch.equal(probflow.sample(GM64, probflow.noise(5, (64,), 1), g).x,
                       probflow.sample(GM64, probflow.noise(5, (64,), 1), g).x)


def test_interpolation_returns_its_endpoints_exactly_and_slerp_keeps_the_norm():
    z0, z1 = probflow.noise(2, (4096,), seed=0).split(1)
    w = torch.linspace(0, 1, 9, dtype=torch.float64)
    for mix in (probflow.slerp, probflow.lerp):
        z = mix(z0, z1, w)
        assert torch.equal(z[0], z0) and torch.equal(z[-1], z1)
    norms = probflow.slerp(z0, z1, w).flatten(1).norm(dim=1) / math.sqrt(4096)
    assert (norms - 1).abs().max().item() < 0.05
    mid = probflow.lerp(z0, z1, w)[4].norm().item() / math.sqrt(4096)
    assert abs(mid - math.sqrt(0.5)) < 0.05  # lerp shrinks the midpoint, slerp does not


def test_slerp_on_image_batches_mixes_each_sample_over_all_its_pixels():
    z0, z1 = probflow.noise(3, (3, 8, 8), seed=1), probflow.noise(3, (3, 8, 8), seed=2)
    w = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    flat = probflow.slerp(z0.flatten(1), z1.flatten(1), w)
    z = probflow.slerp(z0, z1, w)
    assert z.shape == (3, 3, 3, 8, 8)
    assert torch.allclose(z.flatten(2), flat, rtol=0, atol=1e-14)


def test_interpolate_decodes_every_frame():
    gm = probflow.models.default_mixture()
    z = probflow.noise(2, (2,), seed=0)
    g = grids.ddim(SCH, 10)
    sol = probflow.interpolate(gm, z[:1], z[1:], g, frames=5, method="rk4")
    assert sol.x.shape == (5, 1, 2) and sol.nfe == 40
    ends = probflow.sample(gm, z, g, "rk4").x
    assert torch.allclose(sol.x[0, 0], ends[0], atol=1e-12) and torch.allclose(sol.x[-1, 0], ends[1], atol=1e-12)


def test_interpolate_with_the_encode_state_returns_the_inputs_exactly_at_the_ends():
    gm = probflow.models.GaussianMixture.random(6, 3, seed=5)
    x0 = gm.sample(2, generator=torch.Generator().manual_seed(1))
    g = grids.ddim(SCH, 12)
    enc = probflow.encode(gm, x0, g, "reversible_heun")
    sol = probflow.interpolate(gm, enc.x[:1], enc.x[1:], g, "reversible_heun", frames=4, state=enc.state,
                               trajectory=True)
    q = 2.0**-42 * math.sqrt(1 + float(g[0]) ** 2)  # the fixed-point lattice, in x at σ_max
    assert sol.x.shape == (4, 1, 6) and sol.trajectory.shape == (len(g), 4, 1, 6)
    assert (sol.x[0, 0] - x0[0]).abs().max() <= q and (sol.x[-1, 0] - x0[1]).abs().max() <= q
    plain = probflow.interpolate(gm, enc.x[:1], enc.x[1:], g, "reversible_heun", frames=4)
    assert torch.equal(plain.x[1:-1], sol.x[1:-1])  # inner frames: the same ordinary solve
    assert (plain.x[0, 0] - x0[0]).abs().max() > 1e3 * q  # without the state the ends are not exact
    with pytest.raises(ValueError, match="weights: with a state"):
        probflow.interpolate(gm, enc.x[:1], enc.x[1:], g, "reversible_heun", weights=torch.tensor([0.2, 1.0]),
                             state=enc.state)
    with pytest.raises(ValueError, match="state: dopri5"):
        probflow.decode(gm, enc.x, g, "dopri5", state=enc.state)


def test_bad_input_raises_a_clear_error_naming_the_argument():
    gm = probflow.models.default_mixture()
    g = grids.ddim(SCH, 5)
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="method: unknown solver 'rk5'"):
        probflow.sample(gm, x, g, "rk5")
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        probflow.sample(gm, torch.full((3, 2), math.nan, dtype=torch.float64), g)
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        probflow.encode(gm, torch.full((3, 2), math.inf, dtype=torch.float64), g)
    with pytest.raises(ValueError, match="sigmas: .*strictly monotone"):
        probflow.sample(gm, x, torch.tensor([10.0, 1.0, 2.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigmas: expected the decreasing sampling grid"):
        probflow.sample(gm, x, g.flip(0))
    with pytest.raises(ValueError, match="z0, z1: .*same shape"):
        probflow.interpolate(gm, torch.zeros(1, 2), torch.zeros(2, 2), g)
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        probflow.sample(gm, torch.zeros(3, 2, dtype=torch.long), g)
    with pytest.raises(ValueError, match="model: returned ε of shape"):
        probflow.sample(lambda x, s: x[:, :1], x, g)
    with pytest.raises(ValueError, match="rtol, atol"):
        probflow.sample(gm, x, g, "dopri5", rtol=0.0)
    with pytest.raises(TypeError, match="model: expected a callable"):
        probflow.DDIMField(3)
