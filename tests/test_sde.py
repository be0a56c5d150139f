"""Stochastic DDIM (η) and the reverse-SDE family (γ): the SDE → ODE limit (MATH.md §4).

References: Euler on Eq. 12 (torchdiffeq's euler), an independent DDPM ancestral sampler written here in x
from β_t, and exact samples of the Gaussian mixture and of its σ-marginals. Distributions are compared by
a permutation test on MMD² with a fixed kernel; a wrong model and a too-coarse solver must fail it.
"""

from __future__ import annotations

import pytest
import torch

import probflow as pf
from probflow import grids, schedules, sde
from probflow.models import GaussianMixture, default_mixture
from probflow.solvers import Method

torch.set_num_threads(1)

GM = default_mixture()
BANDWIDTHS = (0.05, 0.2, 1.0)  # in x (data scale): the narrowest component std is 0.04, the ring radius 0.8
ALPHA = 0.01
N = 1000


def mmd_permutation_test(a: torch.Tensor, b: torch.Tensor, perms: int = 500, seed: int = 0):
    """MMD² (V-statistic, sum of Gaussian kernels at BANDWIDTHS) of samples a vs b, its permutation
    distribution under H0 (a, b from one law) by relabelling the pooled samples, and the p-value.

    Returns (statistic, threshold = the 1 − ALPHA quantile of the permutation distribution, p-value).
    """
    z = torch.cat([a, b]).reshape(a.shape[0] + b.shape[0], -1)
    n, m = a.shape[0], b.shape[0]
    d2 = torch.cdist(z, z).square_()
    k = sum(torch.exp(d2 / (-2 * s * s)) for s in BANDWIDTHS)
    g = torch.Generator().manual_seed(seed)
    w0 = torch.cat([torch.full((n,), 1 / n), torch.full((m,), -1 / m)]).to(z.dtype)
    w = torch.stack([w0] + [w0[torch.randperm(n + m, generator=g)] for _ in range(perms)], dim=1)
    stats = (w * (k @ w)).sum(0)
    null = stats[1:]
    p = (1 + (null >= stats[0]).sum().item()) / (1 + perms)
    return stats[0].item(), torch.quantile(null, 1 - ALPHA).item(), p


def exact(n: int, sigma: float, seed: int) -> torch.Tensor:
    """n exact draws of x̄ ~ p_σ (the mixture convolved with N(0, σ²I))."""
    return GM.sample(n, sigma=sigma, generator=torch.Generator().manual_seed(seed))


# --- η = 0 and γ = 0 are Euler on Eq. 12 -----------------------------------------------------------------

@pytest.mark.parametrize("knob", ["eta", "gamma"])
def test_zero_noise_equals_the_euler_path(knob):
    grid = grids.ddim(schedules.linear(), 50, spacing="quadratic")
    x_T = pf.noise(64, (2,), seed=1)
    ref = pf.sample(GM, x_T, grid, "euler", trajectory=True)
    method = sde.stochastic_ddim(0.0, seed=3) if knob == "eta" else sde.reverse_sde(0.0, seed=3)
    sol = pf.sample(GM, x_T, grid, method, trajectory=True)
    assert sol.nfe == ref.nfe == 50
    assert (sol.trajectory - ref.trajectory).abs().max().item() <= 1e-12


# --- η = 1 on consecutive steps is DDPM's ancestral sampler ------------------------------------------------

def ddpm_ancestral(model, x_T: torch.Tensor, betas: torch.Tensor, noise: sde.SampleNoise) -> torch.Tensor:
    """Ho et al. (2020), in x: x_{t−1} = (x_t − β_t/sqrt(1−ᾱ_t) ε)/sqrt(1−β_t) + sqrt(β̃_t) z,
    β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t, with ᾱ_{−1} = 1 (so the last step adds no noise); one z per step."""
    ab = torch.cumprod(1 - betas, 0)
    x = x_T
    for t in range(len(betas) - 1, -1, -1):
        eps = model(x, torch.sqrt((1 - ab[t]) / ab[t]))
        ab_prev = ab[t - 1] if t > 0 else torch.ones((), dtype=ab.dtype)
        mean = (x - betas[t] / torch.sqrt(1 - ab[t]) * eps) / torch.sqrt(1 - betas[t])
        x = mean + torch.sqrt((1 - ab_prev) / (1 - ab[t]) * betas[t]) * noise.draw(x.shape[1:], x.dtype)
    return x


@pytest.mark.parametrize("betas", [torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
                                   torch.linspace(1e-3, 0.3, 50, dtype=torch.float64)],
                         ids=["linear-T1000", "linear-T50"])
def test_eta_one_on_consecutive_steps_is_ddpm_ancestral_sampling(betas):
    schedule = schedules.from_betas(betas)
    grid = grids.ddim(schedule, schedule.T)  # every timestep, then σ = 0
    assert torch.equal(grid[:-1], schedule.sigmas.flip(0))
    model = GaussianMixture.random(3, 4, seed=2)
    x_T = pf.noise(16, (3,), seed=4)
    sol = pf.sample(model, x_T, grid, sde.stochastic_ddim(1.0, seed=7))
    ref = ddpm_ancestral(model, x_T, betas, sde.SampleNoise(7, 16))
    assert (sol.x - ref).abs().max().item() <= 1e-10
    # a different noise seed gives a different path: the agreement is not vacuous
    other = ddpm_ancestral(model, x_T, betas, sde.SampleNoise(8, 16))
    assert (sol.x - other).abs().max().item() > 1e-2


# --- noise is seeded per sample ---------------------------------------------------------------------------

def test_a_samples_noise_depends_on_neither_batch_size_nor_position():
    grid = grids.karras(20.0, 0.01, 12)
    x_T = pf.noise(6, (2,), seed=0)
    for make in (lambda idx: sde.stochastic_ddim(0.7, seed=5, indices=idx),
                 lambda idx: sde.reverse_sde(0.7, seed=5, indices=idx)):
        full = pf.sample(GM, x_T, grid, make(None)).x
        part = pf.sample(GM, x_T[[4, 1]], grid, make([4, 1])).x
        assert torch.equal(part, full[[4, 1]])
        again = pf.sample(GM, x_T, grid, make(None)).x
        assert torch.equal(again, full)
    noise = sde.SampleNoise(5, 3)
    assert noise.draw((2,)).shape == (3, 2) and noise.draws == 1


# --- spread of x_0 for one fixed x_T shrinks to exactly 0 ---------------------------------------------------

KNOBS = [1.0, 0.5, 0.25, 0.1, 0.01, 0.0]


def spread(method, grid) -> float:
    """sqrt(tr Cov x_0) over 400 noise draws from one fixed x_T (sample j uses noise stream j)."""
    x_T = pf.noise(1, (2,), seed=2).expand(400, 2).contiguous()
    x0 = pf.sample(GM, x_T, grid, method).x
    return x0.var(0).sum().sqrt().item()


@pytest.mark.parametrize("knob", ["eta", "gamma"])
def test_spread_over_noise_shrinks_monotonically_to_exactly_zero(knob):
    if knob == "eta":
        grid, make = grids.ddim(schedules.linear(), 50), sde.stochastic_ddim
    else:
        grid, make = grids.karras(80.0, 0.002, 100), sde.reverse_sde
    s = [spread(make(k, seed=0), grid) for k in KNOBS]
    assert all(a > b for a, b in zip(s[:-1], s[1:], strict=True)), s
    assert s[-1] == 0.0
    assert s[0] > 0.5  # at knob 1 one x_T reaches most of the mixture (its total std is ≈ 0.8)


# --- final samples and intermediate marginals match the exact mixture --------------------------------------

SIGMA_MAX = 80.0
GRID = grids.karras(SIGMA_MAX, 0.002, 200)
CHECK_SIGMAS = (2.0, 0.5, 0.1)  # the grid points nearest to these are compared with the exact p_σ


@pytest.fixture(scope="module")
def solves():
    """ODE (Heun), reverse SDE (γ = 1) and DDIM η = 1 from the same exact draws of p_{σmax}."""
    x_T = exact(N, SIGMA_MAX, seed=11)
    methods = {"ode": "heun2", "sde": sde.reverse_sde(1.0, seed=1), "ddim_eta1": sde.stochastic_ddim(1.0, seed=1)}
    return {k: pf.integrate(GM, x_T, GRID, m, trajectory=True) for k, m in methods.items()}


@pytest.mark.parametrize("kind", ["ode", "sde", "ddim_eta1"])
def test_final_samples_match_the_mixture(solves, kind):
    stat, thr, p = mmd_permutation_test(solves[kind].x, exact(N, 0.0, seed=21))
    assert p > ALPHA, f"{kind}: MMD² {stat:.3g} above the {1 - ALPHA:.0%} permutation bound {thr:.3g} (p = {p:.3g})"


@pytest.mark.parametrize("kind", ["sde", "ddim_eta1"])
def test_intermediate_marginals_match_the_convolved_mixture(solves, kind):
    sol = solves[kind]
    for target in CHECK_SIGMAS:
        i = int((GRID - target).abs().argmin())
        s = float(GRID[i])
        scale = (1 + s * s) ** -0.5  # compare in x = x̄/sqrt(1+σ²), where the kernel's bandwidths are meant
        stat, thr, p = mmd_permutation_test(sol.trajectory[i] * scale, exact(N, s, seed=31 + i) * scale)
        assert p > ALPHA, f"{kind} at σ = {s:.3g}: MMD² {stat:.3g} > bound {thr:.3g} (p = {p:.3g})"


def test_the_two_sample_test_rejects_a_wrong_model_and_a_coarse_solver():
    ref = exact(N, 0.0, seed=21)
    wrong = GaussianMixture(torch.ones(6), GM.means, GM.covs)  # equal weights instead of 1:2
    assert mmd_permutation_test(wrong.sample(N, generator=torch.Generator().manual_seed(3)), ref)[2] <= ALPHA
    coarse = pf.integrate(GM, exact(N, SIGMA_MAX, seed=11), grids.karras(SIGMA_MAX, 0.002, 5), "euler")
    assert mmd_permutation_test(coarse.x, ref)[2] <= ALPHA


def test_the_marginal_test_rejects_an_sde_with_the_wrong_drift():
    """Noise γ sqrt(2σ) dw̄ with the ODE's drift ε dσ instead of (1 + γ²) ε dσ: the marginals drift off p_σ."""

    def wrong_drift(field, xbar, sigma, sigma_next, state):
        state = sde.SampleNoise(1, xbar.shape[0]) if state is None else state
        h = sigma_next - sigma
        return xbar + field(sigma, xbar) * h + torch.sqrt(-2 * sigma * h) * state.draw(xbar.shape[1:]), state

    grid = GRID[GRID >= 0.4]
    x = pf.integrate(GM, exact(N, SIGMA_MAX, seed=11), grid, Method("wrong_drift", 1, step=wrong_drift)).x
    s = float(grid[-1])
    scale = (1 + s * s) ** -0.5
    assert mmd_permutation_test(x * scale, exact(N, s, seed=41) * scale)[2] <= ALPHA


# --- bad input ----------------------------------------------------------------------------------------------

def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="eta"):
        sde.stochastic_ddim(1.5)
    with pytest.raises(ValueError, match="gamma"):
        sde.reverse_sde(-0.1)
    with pytest.raises(ValueError, match="seed"):
        sde.SampleNoise(-1, 3)
    up = grids.karras(10.0, 0.1, 4).flip(0)[1:]
    with pytest.raises(ValueError, match="sigmas"):
        pf.integrate(GM, torch.zeros(2, 2, dtype=torch.float64), up, sde.reverse_sde(1.0))
    with pytest.raises(ValueError, match="state"):
        pf.integrate(GM, torch.zeros(2, 2, dtype=torch.float64), grids.karras(10.0, 0.1, 4),
                     sde.stochastic_ddim(1.0), state=sde.SampleNoise(0, 3))
