"""Stochastic DDIM (η) and the reverse-SDE family (γ): the SDE → ODE limit (docs/MATH.md §4).

References: Euler on Eq. 12 (torchdiffeq's euler), an independent DDPM ancestral sampler written here in x
from β_t, and exact samples of the Gaussian mixture and of its σ-marginals. Distributions are compared by
MMD² with a fixed kernel against fresh exact samples, below a bound calibrated by the same statistic between
two exact sample sets; a wrong model, a too-coarse solver and a wrong SDE drift must fail it.
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
N = 1000  # samples per set
SPLITS = 1000  # exact-vs-exact pairs per σ
LEVEL = 0.996  # the bound's quantile: 1 − 0.05/12, Bonferroni over the 12 accepting comparisons below


def kernel(z: torch.Tensor) -> torch.Tensor:
    """Sum of Gaussian kernels at BANDWIDTHS between the rows of z (float32: MMD² ≈ 1e-2 ≫ its rounding)."""
    d2 = torch.cdist(z.float(), z.float()).square_()
    return sum(torch.exp(d2 * (-0.5 / (s * s))) for s in BANDWIDTHS)


def signs(n: int, m: int) -> torch.Tensor:
    return torch.cat([torch.full((n,), 1 / n), torch.full((m,), -1 / m)])


def mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """MMD² (V-statistic) of samples a vs b: wᵀKw with w = (1/n, …, −1/m, …)."""
    w = signs(a.shape[0], b.shape[0])
    return float((w * (kernel(torch.cat([a, b])) @ w)).double().sum())


def exact(n: int, sigma: float, seed: int) -> torch.Tensor:
    """n exact draws of x̄ ~ p_σ (the mixture convolved with N(0, σ²I))."""
    return GM.sample(n, sigma=sigma, generator=torch.Generator().manual_seed(seed))


def in_x(xbar: torch.Tensor, sigma: float) -> torch.Tensor:
    """x = x̄/sqrt(1+σ²): where the kernel's bandwidths are meant."""
    return xbar * (1 + sigma * sigma) ** -0.5


_NULL: dict[float, torch.Tensor] = {}


def null(sigma: float) -> torch.Tensor:
    """MMD² between two exact N-sample sets of p_σ, SPLITS times: 2N exact draws (a seed of their own),
    split at random into two halves, each half an i.i.d. sample of p_σ (one kernel matrix for all splits)."""
    if sigma not in _NULL:
        g = torch.Generator().manual_seed(1000 + round(1000 * sigma))
        k = kernel(in_x(GM.sample(2 * N, sigma, g), sigma))
        w = signs(N, N)
        W = torch.stack([w[torch.randperm(2 * N, generator=g)] for _ in range(SPLITS)], dim=1)  # noqa: N806
        _NULL[sigma] = (W * (k @ W)).double().sum(0)
    return _NULL[sigma]


def threshold(sigma: float) -> float:
    """The calibrated bound at σ: the LEVEL quantile of the exact-vs-exact statistic."""
    return torch.quantile(null(sigma), LEVEL).item()


def matches(x: torch.Tensor, sigma: float, seed: int) -> tuple[bool, str]:
    """Whether the x̄-samples x pass: MMD² against N fresh exact draws of p_σ below `threshold(σ)`."""
    stat, thr = mmd2(in_x(x, sigma), in_x(exact(N, sigma, seed), sigma)), threshold(sigma)
    return stat < thr, f"σ = {sigma:.3g}: MMD² {stat:.3g} vs calibrated bound {thr:.3g}"


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


def ddim_eq11(model, x_T: torch.Tensor, t_seq: torch.Tensor, alpha_bar: torch.Tensor, eta: float,
              noise: sde.SampleNoise) -> torch.Tensor:
    """DDIM's Eq. 11 in x on a timestep subsequence, with σ_{s,t}(η) as in the paper (docs/MATH.md §4), then a
    last step to ᾱ = 1; one z per step."""
    ab = [alpha_bar[t] for t in t_seq] + [torch.ones((), dtype=torch.float64)]
    x = x_T
    for a_t, a_s in zip(ab[:-1], ab[1:], strict=True):
        eps = model(x, torch.sqrt((1 - a_t) / a_t))
        x0 = (x - torch.sqrt(1 - a_t) * eps) / torch.sqrt(a_t)
        s = eta * torch.sqrt((1 - a_s) / (1 - a_t)) * torch.sqrt(1 - a_t / a_s)
        x = torch.sqrt(a_s) * x0 + torch.sqrt(1 - a_s - s * s) * eps + s * noise.draw(x.shape[1:], x.dtype)
    return x


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
def test_eta_step_on_a_timestep_subsequence_is_eq11(eta, spacing):
    schedule = schedules.cosine()
    t_seq = grids.ddim_timesteps(schedule, 20, spacing)
    model = GaussianMixture.random(3, 4, seed=5)
    x_T = pf.noise(16, (3,), seed=6)
    sol = pf.sample(model, x_T, grids.ddim(schedule, 20, spacing), sde.stochastic_ddim(eta, seed=2))
    ref = ddim_eq11(model, x_T, t_seq, schedule.alpha_bar, eta, sde.SampleNoise(2, 16))
    assert (sol.x - ref).abs().max().item() <= 1e-10


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


def check_index(target: float) -> int:
    """The index of the grid point nearest to σ = target."""
    return int((GRID - target).abs().argmin())


@pytest.mark.parametrize("kind", ["ode", "sde", "ddim_eta1"])
def test_final_samples_match_the_mixture(solves, kind):
    ok, msg = matches(solves[kind].x, 0.0, seed=21)
    assert ok, f"{kind}: {msg}"


@pytest.mark.parametrize("kind", ["ode", "sde", "ddim_eta1"])
def test_intermediate_marginals_match_the_convolved_mixture(solves, kind):
    for target in CHECK_SIGMAS:
        i = check_index(target)
        ok, msg = matches(solves[kind].trajectory[i], float(GRID[i]), seed=31 + i)
        assert ok, f"{kind}: {msg}"


def test_the_two_sample_test_rejects_a_wrong_model_and_a_coarse_solver():
    wrong = GaussianMixture(torch.ones(6), GM.means, GM.covs)  # equal weights instead of 1:2
    ok, msg = matches(wrong.sample(N, generator=torch.Generator().manual_seed(3)), 0.0, seed=21)
    assert not ok, f"wrong weights accepted: {msg}"
    coarse = pf.integrate(GM, exact(N, SIGMA_MAX, seed=11), grids.karras(SIGMA_MAX, 0.002, 5), "euler")
    ok, msg = matches(coarse.x, 0.0, seed=21)
    assert not ok, f"5 Euler steps accepted: {msg}"


def test_the_marginal_test_rejects_an_sde_with_the_wrong_drift():
    """Noise γ sqrt(2σ) dw̄ with the ODE's drift ε dσ instead of (1 + γ²) ε dσ: the marginals drift off p_σ."""

    def wrong_drift(field, xbar, sigma, sigma_next, state):
        state = sde.SampleNoise(1, xbar.shape[0]) if state is None else state
        h = sigma_next - sigma
        return xbar + field(sigma, xbar) * h + torch.sqrt(-2 * sigma * h) * state.draw(xbar.shape[1:]), state

    i = check_index(0.5)
    x = pf.integrate(GM, exact(N, SIGMA_MAX, seed=11), GRID[:i + 1], Method("wrong_drift", 1, step=wrong_drift)).x
    ok, msg = matches(x, float(GRID[i]), seed=31 + i)
    assert not ok, f"wrong drift accepted: {msg}"


def test_calibration_is_not_degenerate():
    """The exact-vs-exact statistics are spread (the bound is an interior quantile); run with -s to print them."""
    for target in (0.0, *CHECK_SIGMAS):
        s = 0.0 if target == 0.0 else float(GRID[check_index(target)])
        thr, stats = threshold(s), null(s)
        assert 0 < stats.min() < stats.median() < thr < stats.max()
        print(f"σ = {s:.4g}: exact-vs-exact MMD² median {stats.median():.3g}, bound ({LEVEL:.1%}) {thr:.3g}")


# --- bad input ----------------------------------------------------------------------------------------------

def test_bad_input_is_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="eta"):
        sde.stochastic_ddim(1.5)
    with pytest.raises(ValueError, match="gamma"):
        sde.reverse_sde(-0.1)
    with pytest.raises(ValueError, match="seed"):
        sde.SampleNoise(-1, 3)
    noise = sde.SampleNoise(0, 3)
    noise.draw((2,))
    with pytest.raises(ValueError, match="shape"):
        noise.draw((3,))
    up = grids.karras(10.0, 0.1, 4).flip(0)[1:]
    with pytest.raises(ValueError, match="sigmas"):
        pf.integrate(GM, torch.zeros(2, 2, dtype=torch.float64), up, sde.reverse_sde(1.0))
    with pytest.raises(ValueError, match="state"):
        pf.integrate(GM, torch.zeros(2, 2, dtype=torch.float64), grids.karras(10.0, 0.1, 4),
                     sde.stochastic_ddim(1.0), state=sde.SampleNoise(0, 3))
