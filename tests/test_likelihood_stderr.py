"""The standard error of Hutchinson's divergence (docs/MATH.md §13): with fresh probes it is pooled over the solve's
calls, V = Σ_c a_c² s_c²/P, through sign channels. References independent of the code under test: the solver's
weights a_c written out by hand (euler, torchdiffeq's rk4 = the 3/8 rule), the one-probe variance of vᵀJv in closed
form for a linear model, and the empirical variance over independently seeded samples."""

import math

import pytest
import torch

from probflow import grids
from probflow.likelihood import SE_CHANNELS, ProbeStream, likelihood
from probflow.likelihood.core import stream


def _eps(a: torch.Tensor):
    """ε(x, σ) = x·Aᵀ: the field f(σ, x̄) = A x̄/sqrt(1+σ²) has the Jacobian J(σ) = A/sqrt(1+σ²) on any path."""
    return lambda x, s: x @ a.T.to(x.dtype)


def _matrix(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / math.sqrt(d)


def _calls(method: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_c, a_c) of every call of a fixed-grid solve, by hand: euler evaluates at the left ends with weight h;
    torchdiffeq's rk4 (the 3/8 rule) at σ, σ + h/3, σ + 2h/3, σ + h with weights h·(1, 3, 3, 1)/8."""
    h = g[1:] - g[:-1]
    if method == "euler":
        return g[:-1], h
    sig = torch.stack([g[:-1], g[:-1] + h / 3, g[:-1] + 2 * h / 3, g[1:]], 1).reshape(-1)
    return sig, (h[:, None] * torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 8).reshape(-1)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_sign_channels_are_the_solver_weighted_sum_of_the_per_call_spreads(method):
    """Replaying each sample's probe and sign streams by hand: the returned standard error is exactly
    sqrt(mean_k u_k²), u_k = Σ_c a_c r_{c,k} s_c/sqrt(P), with the hand-written weights a_c and s_c² the sample
    variance of the P probes' vᵀJ_c v at call c; and the estimate is Σ_c a_c mean_j vᵀJ_c v."""
    d, p, n, seed = 12, 3, 3, 4
    a = _matrix(d, 1)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.linspace(0, 4.0, 6, dtype=torch.float64)
    r = likelihood(_eps(a), x0, g, method, divergence="hutchinson", probes_per_sample=p, seed=seed)
    sig, w = _calls(method, g)
    assert r.nfe == len(sig) and r.fresh_probes
    for i in range(n):
        pg, sg = stream(seed, i, 1), stream(seed, i, 3)  # the probe and sign streams of sample i
        u, est = torch.zeros(SE_CHANNELS, dtype=torch.float64), 0.0
        for s, wc in zip(sig.tolist(), w.tolist()):
            v = torch.randint(0, 2, (p, d), generator=pg).double() * 2 - 1
            q = torch.einsum("jd,de,je->j", v, a, v) / math.sqrt(1 + s * s)  # vᵀ J(σ) v per probe
            signs = torch.randint(0, 2, (1, SE_CHANNELS), generator=sg).double()[0] * 2 - 1
            u += wc * signs * math.sqrt(float(q.var()) / p)
            est += wc * float(q.mean())
        assert float(r.divergence[i]) == pytest.approx(est, rel=1e-10)
        assert float(r.stderr[i]) == pytest.approx(math.sqrt(float(u.pow(2).mean())), rel=1e-10)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_pooled_variance_is_unbiased_and_z_scores_are_standard(method):
    """Linear model, 400 independently seeded samples (J does not depend on x̄, so every sample's estimate has the
    same law): the mean of SE² matches the closed form Σ_c a_c² Var_c/P (Var_c = 2(‖S‖²_F − Σ S_ii²)/(1+σ_c²) for
    one Rademacher probe, S = (A + Aᵀ)/2), and so does the empirical variance of the estimates; z = (estimate −
    exact)/SE is close to standard normal (4 probes: few |z| > 3, where P − 1 = 3 degrees of freedom gave ~6 %)."""
    d, p, n = 40, 4, 400
    a = _matrix(d, 7)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = torch.linspace(0, 5.0, 9, dtype=torch.float64)
    r = likelihood(_eps(a), x0, g, method, divergence="hutchinson", probes_per_sample=p, seed=3)
    sig, w = _calls(method, g)
    s = (a + a.T) / 2
    var1 = 2 * (s.pow(2).sum() - s.diagonal().pow(2).sum())
    v = float((w**2 * var1 / (1 + sig**2)).sum() / p)
    exact = float(torch.trace(a) * (w / (1 + sig**2).sqrt()).sum())
    assert float(r.stderr.pow(2).mean()) == pytest.approx(v, rel=0.1)  # ~6 sd of the mean of 400
    assert float(r.divergence.var()) == pytest.approx(v, rel=0.3)  # ~4 sd of a variance from 400
    z = (r.divergence - exact) / r.stderr
    assert abs(float(z.mean())) < 0.2 and 0.9 < float(z.std()) < 1.15, (z.mean(), z.std())
    assert float((z.abs() > 3).float().mean()) < 0.02
    assert float((z.abs() > 2).float().mean()) < 0.1


def test_pooled_standard_error_on_an_adaptive_solve_matches_the_spread_over_samples():
    """dopri5 with `path_norm`: the step sizes (hence a_c, rejected steps included with weight 0) depend on x̄ only
    and are shared by the batch; the mean SE² matches the empirical variance over 300 samples, whose estimates
    have one law (J does not depend on x̄)."""
    d, n = 30, 300
    a = _matrix(d, 3)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = likelihood(_eps(a), x0, 20.0, "dopri5", rtol=1e-5, atol=1e-5, divergence="hutchinson", seed=8)
    emp, pooled = float(r.divergence.var()), float(r.stderr.pow(2).mean())
    assert pooled == pytest.approx(emp, rel=0.3), (pooled, emp)
    exact = float(torch.trace(a)) * math.asinh(20.0)  # the closed form; dopri5 at 1e-5 is far closer than the SE
    z = (r.divergence - exact) / r.stderr
    assert float((z.abs() > 3).float().mean()) < 0.03 and 0.85 < float(z.std()) < 1.2


def test_fixed_probes_keep_the_spread_of_the_accumulators_and_one_probe_has_none():
    """Fixed probes: the calls' estimates share the probes, so the pooled form does not apply and the standard error
    is std_j ℓ_j/sqrt(P); one probe has no spread (NaN) and no sign channels."""
    d = 10
    a = _matrix(d, 2)
    x0 = torch.randn(2, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = grids.karras(20.0, 0.01, 4).flip(0)
    fixed = likelihood(_eps(a), x0, g, "rk4", divergence="hutchinson", probes_per_sample=5, fresh_probes=False)
    torch.testing.assert_close(fixed.stderr, fixed.divergence_probes.std(1) / math.sqrt(5), rtol=0, atol=0)
    fresh = likelihood(_eps(a), x0, g, "rk4", divergence="hutchinson", probes_per_sample=5)
    assert fresh.divergence_probes.shape == (2, 5) and (fresh.stderr > 0).all()
    one = likelihood(_eps(a), x0, g, "rk4", divergence="hutchinson", probes_per_sample=1)
    assert torch.isnan(one.stderr).all() and ProbeStream(2, 1, d).channels == 0


def test_pooled_standard_error_does_not_depend_on_the_batch():
    d = 16
    a = _matrix(d, 4)
    x0 = torch.randn(5, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = grids.karras(20.0, 0.01, 3).flip(0)
    full = likelihood(_eps(a), x0, g, "rk4", divergence="hutchinson", seed=2)
    part = likelihood(_eps(a), x0[2:4], g, "rk4", divergence="hutchinson", seed=2, first_index=2)
    torch.testing.assert_close(part.stderr, full.stderr[2:4], rtol=1e-12, atol=0)
