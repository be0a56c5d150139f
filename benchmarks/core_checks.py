"""Print the core measured figures: DDIM (Eq. 11) vs probflow Euler (and vs diffusers' DDIMScheduler),
measured convergence orders against DOP853, and the encode→decode round trip.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/core_checks.py
"""

from __future__ import annotations

import math
import time

import torch

import probflow
from probflow import grids, schedules
from probflow.models import GaussianMixture

SCH = schedules.linear()


def ddim_eq11(model, x_T, timesteps):
    """Eq. 11 with σ_{s,t} = 0 in the x variable, from ᾱ, final step to ᾱ = 1 (independent of probflow's field)."""
    abars = [SCH.alpha_bar[t].item() for t in timesteps] + [1.0]
    x = x_T
    for a_t, a_s in zip(abars[:-1], abars[1:]):
        eps = model(x, torch.tensor(math.sqrt((1 - a_t) / a_t), dtype=x.dtype))
        x = math.sqrt(a_s) * (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t) + math.sqrt(1 - a_s) * eps
    return x


def diffusers_ddim(model, x_T, steps):
    import diffusers

    s = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    s.alphas_cumprod = SCH.alpha_bar.clone()
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    s.set_timesteps(steps)
    x = x_T.clone()
    for t in s.timesteps:
        x = s.step(model(x, SCH.sigmas[int(t)]), t, x, eta=0.0).prev_sample
    return x


def orders() -> None:
    smooth = GaussianMixture.random(3, 4, seed=2, std_range=(0.3, 0.8))
    x = probflow.noise(8, (3,), seed=0) * math.sqrt(1 + 10.0**2)
    ref = probflow.integrate(smooth, x, torch.tensor([10.0, 0.1], dtype=torch.float64), "scipy_dop853",
                             rtol=1e-12, atol=1e-12, options={"group": 8}).x
    for method, steps in [("euler", [64, 128, 256]), ("midpoint", [32, 64, 128]), ("heun2", [32, 64, 128]),
                          ("heun3", [16, 32, 64]), ("rk4", [8, 16, 32])]:
        errs = [(probflow.integrate(smooth, x, grids.log_uniform(10.0, 0.1, n, final_zero=False), method).x - ref)
                .abs().max().item() for n in steps]
        slopes = [math.log(errs[i] / errs[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]
        print(f"  {method:9s} steps {steps}  max err {' '.join(f'{e:.2e}' for e in errs)}"
              f"  order {' '.join(f'{s:.2f}' for s in slopes)}")


def main() -> None:
    print("DDIM = Euler, max |difference| in float64 (16 samples, K=8 sharp mixture, trailing grid)")
    for dim in (2, 64):
        gm = GaussianMixture.random(dim, 8, seed=1, std_range=(0.05, 0.5))
        for steps in (5, 10, 20, 50):
            x_T = probflow.noise(16, (dim,), seed=3)
            eul = probflow.sample(gm, x_T, grids.ddim(SCH, steps), "euler").x
            d1 = (eul - ddim_eq11(gm, x_T, grids.ddim_timesteps(SCH, steps).tolist())).abs().max().item()
            d2 = (eul - diffusers_ddim(gm, x_T, steps)).abs().max().item()
            print(f"  D={dim:2d} steps={steps:2d}  vs Eq.11 {d1:.1e}   vs diffusers DDIMScheduler {d2:.1e}")
    print("Convergence orders (log-σ grid 10 → 0.1, vs DOP853 rtol=atol=1e-12; successive slopes)")
    orders()
    print("Round trip, D=64, 16 samples, float64")
    gm = GaussianMixture.random(64, 8, seed=1, std_range=(0.1, 0.5))
    x0 = gm.sample(16, generator=torch.Generator().manual_seed(0))
    g = torch.tensor([SCH.sigma_max, 0.0], dtype=torch.float64)
    t0 = time.time()
    enc = probflow.encode(gm, x0, g, "dopri5", rtol=1e-8, atol=1e-8)
    dec = probflow.decode(gm, enc.x, g, "dopri5", rtol=1e-8, atol=1e-8)
    print(f"  dopri5 rtol=atol=1e-8: per-dim MSE {((dec.x - x0) ** 2).mean().item():.2e}, NFE {enc.nfe} + {dec.nfe}"
          f" ({time.time() - t0:.1f} s)")
    for n in (25, 50, 100, 200):
        gg = grids.ddim(SCH, n)
        z = probflow.encode(gm, x0, gg, "euler").x
        rms = (probflow.decode(gm, z, gg, "euler").x - x0).pow(2).mean().sqrt().item()
        print(f"  euler {n:3d} steps each way: RMS round-trip error {rms:.3e}  (×steps = {rms * n:.2f})")


if __name__ == "__main__":
    main()
