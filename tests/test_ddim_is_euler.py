"""DDIM (Eq. 11, σ_{s,t} = 0) and Euler on Eq. 12 agree to rounding on the same grid (docs/MATH.md §3)."""

import math

import pytest
import torch

import probflow
from probflow import grids, schedules
from probflow.models import GaussianMixture

SCH = schedules.linear()


def ddim_eq11(model, x_T, timesteps):
    """An independent DDIM: Eq. 11 in the x variable, from ᾱ, with a final step to ᾱ = 1."""
    ab = SCH.alpha_bar
    abars = [ab[t].item() for t in timesteps] + [1.0]
    x = x_T
    for a_t, a_s in zip(abars[:-1], abars[1:]):
        sigma_t = torch.tensor(math.sqrt((1 - a_t) / a_t), dtype=x.dtype)
        eps = model(x, sigma_t)
        x0_hat = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_s) * x0_hat + math.sqrt(1 - a_s) * eps
    return x


@pytest.fixture(scope="module", params=[2, 64], ids=["D2", "D64"])
def mixture(request):
    return GaussianMixture.random(request.param, 8, seed=1, std_range=(0.05, 0.5))


@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_ddim_eq11_equals_probflow_euler(mixture, steps):
    x_T = probflow.noise(16, (mixture.dim,), seed=3)
    ref = ddim_eq11(mixture, x_T, grids.ddim_timesteps(SCH, steps).tolist())
    sol = probflow.sample(mixture, x_T, grids.ddim(SCH, steps), "euler")
    assert sol.nfe == steps
    assert (sol.x - ref).abs().max().item() <= 1e-10


@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_diffusers_ddim_scheduler_equals_probflow_euler(mixture, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
        set_alpha_to_one=True, timestep_spacing="trailing", prediction_type="epsilon",
    )
    sched.alphas_cumprod = SCH.alpha_bar.clone()  # diffusers builds it in float32 (docs/MATH.md §6)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(steps)
    x_T = probflow.noise(16, (mixture.dim,), seed=4)
    x = x_T.clone()
    for t in sched.timesteps:
        eps = mixture(x, SCH.sigmas[int(t)])
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    assert sched.timesteps.tolist() == grids.ddim_timesteps(SCH, steps).tolist()
    sol = probflow.sample(mixture, x_T, grids.ddim(SCH, steps), "euler")
    assert (sol.x - x).abs().max().item() <= 1e-10


def test_ddim_equals_euler_can_fail_when_the_grid_differs(mixture):
    """Negative control: a one-step shift of the grid is detected by the same bound."""
    x_T = probflow.noise(4, (mixture.dim,), seed=5)
    ref = ddim_eq11(mixture, x_T, [t - 1 for t in grids.ddim_timesteps(SCH, 10).tolist()])
    sol = probflow.sample(mixture, x_T, grids.ddim(SCH, 10), "euler")
    assert (sol.x - ref).abs().max().item() > 1e-6
