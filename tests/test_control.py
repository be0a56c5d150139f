"""`integrate`'s parts: the step-size control (`probflow.Control`) is checked once and honoured by every adaptive
backend (scipy's included), the scipy backend gives what `scipy.integrate.solve_ivp` gives (an independent
call), and `probflow.flows` passes integrate's keywords through unchanged."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import probflow
from probflow import Control, grids
from probflow.field import DDIMField
from probflow.integrate import MAX_STEPS, MaxStepsError
from probflow.models import GaussianMixture

GM = GaussianMixture.random(6, 3, seed=3)
ENDS = torch.tensor([80.0, 0.0], dtype=torch.float64)


def _start(n=4, seed=1):
    return probflow.noise(n, (6,), seed) * math.sqrt(1 + 80.0**2)


@pytest.mark.parametrize("kw, words", [
    (dict(rtol=0.0), "rtol, atol: expected finite positive tolerances"),
    (dict(atol=-1e-3), "rtol, atol: expected finite positive tolerances"),
    (dict(rtol=math.nan), "rtol, atol: expected finite positive tolerances"),
    (dict(max_steps=0), "max_steps: expected a positive integer or None"),
    (dict(max_steps=2.5), "max_steps: expected a positive integer or None"),
])
def test_control_is_checked_when_it_is_made(kw, words):
    with pytest.raises(ValueError, match=words):
        Control(**kw)
    with pytest.raises(ValueError, match=words):  # the keywords make the same Control
        probflow.integrate(GM, _start(), ENDS, "dopri5", **kw)


def test_control_and_its_keywords_are_not_mixed_and_give_the_same_solve():
    x = _start()
    with pytest.raises(ValueError, match="control: pass rtol"):
        probflow.integrate(GM, x, ENDS, "dopri5", control=Control(rtol=1e-4), rtol=1e-4)
    with pytest.raises(TypeError, match="control"):
        probflow.integrate(GM, x, ENDS, "dopri5", control={"rtol": 1e-4})
    a = probflow.integrate(GM, x, ENDS, "dopri5", control=Control(rtol=1e-6, atol=1e-6))
    b = probflow.integrate(GM, x, ENDS, "dopri5", rtol=1e-6, atol=1e-6)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe
    assert Control().max_steps == MAX_STEPS


@pytest.mark.parametrize("method", ["dopri5", "scipy_dop853", "adaptive_exp"])
def test_every_adaptive_backend_honours_max_steps(method):
    with pytest.raises(MaxStepsError) as info:
        probflow.integrate(GM, _start(), ENDS, method, control=Control(rtol=1e-10, atol=1e-10, max_steps=4))
    assert 0.0 < info.value.sigma < 80.0
    assert torch.isfinite(probflow.integrate(GM, _start(), ENDS, method, control=Control(max_steps=None)).x).all()


def test_a_norm_applies_to_torchdiffeq_and_is_refused_where_the_backend_has_its_own():
    x = _start()
    calls = []

    def rms(t):
        calls.append(1)
        return t.pow(2).mean().sqrt()

    probflow.integrate(GM, x, ENDS, "dopri5", control=Control(rtol=1e-4, atol=1e-4, norm=rms))
    assert calls  # torchdiffeq's controller used it
    for method in ("scipy_dop853", "adaptive_exp"):
        with pytest.raises(ValueError, match=f"control: {method} uses its own error norm"):
            probflow.integrate(GM, x, ENDS, method, control=Control(norm=rms))


@pytest.mark.parametrize("group", [1, 4])
def test_scipy_backend_gives_what_solve_ivp_gives(group):
    """Stepped one step at a time (for max_steps and progress), the solve is solve_ivp's: the same numbers."""
    x, g = _start(), grids.log_uniform(80.0, 0.01, 6)
    sol = probflow.integrate(GM, x, g, "scipy_dop853", rtol=1e-8, atol=1e-8, options={"group": group},
                             trajectory=True)
    f = DDIMField(GM)
    tol = 1e-8 / math.sqrt(group * 6)
    ref = []
    for b in range(0, len(x), group):
        def fun(t, y):
            return f(torch.tensor(t, dtype=torch.float64), torch.from_numpy(y).view(-1, 6)).reshape(-1).numpy()

        out = solve_ivp(fun, (float(g[0]), float(g[-1])), x[b:b + group].reshape(-1).numpy(), method="DOP853",
                        t_eval=g.numpy(), rtol=tol, atol=tol)
        ref.append(torch.from_numpy(np.ascontiguousarray(out.y.T)).view(len(g), -1, 6))
    torch.testing.assert_close(sol.trajectory, torch.cat(ref, 1), rtol=0, atol=0)


def test_scipy_backend_reports_progress_down_to_the_end():
    seen = []
    probflow.integrate(GM, _start(), ENDS, "scipy_dop853", options={"group": 4},
                       progress=lambda s, n: seen.append((s, n)))
    sig = [s for s, _ in seen]
    assert len(sig) > 3 and all(a >= b for a, b in zip(sig, sig[1:], strict=False)) and sig[-1] == 0.0
    seen.clear()  # one solve per sample (group 1): each runs down to σ = 0
    probflow.integrate(GM, _start(), ENDS, "scipy_dop853", progress=lambda s, n: seen.append((s, n)))
    assert [s for s, _ in seen].count(0.0) == 4


def test_flows_pass_integrates_keywords_through():
    g = grids.log_uniform(80.0, 0.01, 8)
    z = probflow.noise(3, (6,), 0)
    a = probflow.sample(GM, z, ENDS, "dopri5", control=Control(rtol=1e-7, atol=1e-7))
    b = probflow.sample(GM, z, ENDS, "dopri5", rtol=1e-7, atol=1e-7)
    assert torch.equal(a.x, b.x)
    seen = []
    probflow.decode(GM, z, ENDS, "adaptive_exp", progress=lambda s, n: seen.append(s))
    assert seen and seen[-1] == 0.0
    e = probflow.encode(GM, probflow.sample(GM, z, g, "rk4").x, g, "rk4", trajectory=True)
    assert e.trajectory.shape == (len(g), 3, 6)
    frames = probflow.interpolate(GM, z[:1], z[1:2], g, "rk4", frames=3, trajectory=True)
    assert frames.x.shape == (3, 1, 6) and frames.trajectory.shape == (len(g), 3, 1, 6)
    with pytest.raises(TypeError, match="no_such_keyword"):
        probflow.sample(GM, z, g, "rk4", no_such_keyword=1)


def test_a_declared_caution_is_warned_and_names_the_better_choice():
    import warnings

    import torch

    from probflow.integrate import integrate
    from probflow.solvers import METHODS

    model = lambda x, s: 0.1 * x  # noqa: E731
    x = torch.ones(2, 3, dtype=torch.float64)
    grid = torch.tensor([2.0, 0.5], dtype=torch.float64)
    cautioned = [n for n, m in METHODS.items() if m.caution]
    assert {"fehlberg2", "bosh3", "dopri5", "adaptive_heun"} <= set(cautioned)
    for name in cautioned:
        for tol in (1e-3, 1e-4):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                integrate(model, x, grid, name, rtol=tol, atol=tol)
            said = any(name in str(r.message) and "use adaptive_exp" in str(r.message) for r in w)
            # dopri5 and adaptive_heun keep to their tolerance from 1e-4 down (FAIR.md): cautioned above it only
            assert said == (tol > METHODS[name].caution_above), (name, tol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        integrate(model, x, grid, "dopri5", rtol=1e-4, atol=1e-4)
        integrate(model, x, grid, "adaptive_heun", rtol=1e-5, atol=1e-5)
