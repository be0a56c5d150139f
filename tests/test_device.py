"""dtype and device follow the state; the model may run in its own dtype (the field is the boundary)."""

import pytest
import torch

import probflow
from probflow import grids, schedules
from probflow.models import GaussianMixture

GM = GaussianMixture.random(8, 3, seed=0)
G = grids.ddim(schedules.linear(), 20)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_float64_state_around_a_float32_model_casts_at_the_field():
    seen = []

    def eps32(x, sigma):
        seen.append((x.dtype, sigma.dtype))
        return GM(x, sigma)

    field = probflow.DDIMField(eps32, model_dtype=torch.float32)
    x_T = probflow.noise(4, (8,), seed=0)
    sol = probflow.sample(field, x_T, G, "rk4")
    assert sol.x.dtype == torch.float64 and set(seen) == {(torch.float32, torch.float32)}
    assert field.nfe == sol.nfe == 80
    ref = probflow.sample(GM, x_T, G, "rk4").x
    assert 0 < (sol.x - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5"])
def test_solution_stays_on_the_state_device_and_matches_cpu(device, method):
    x_T = probflow.noise(16, (8,), seed=1, dtype=torch.float32, device=device)
    sol = probflow.sample(GM, x_T, G, method, rtol=1e-5, atol=1e-5)
    assert sol.x.device.type == device and sol.x.dtype == torch.float32
    ref = probflow.sample(GM, x_T.cpu().double(), G, method, rtol=1e-5, atol=1e-5).x
    assert (sol.x.cpu().double() - ref).abs().max().item() < 1e-3
