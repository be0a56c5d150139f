"""A method registered with only a step function and its declared capabilities (`probflow.solvers.Method`) is
treated correctly by every consumer, which reads the declaration and never the name or a probe run: `integrate`
(directions), exact inversion (a multistep method is inverted by the trajectory solve, a single-step one per step
even when it keeps a state), the likelihood (refuses a method without an augmented state or without the upward
direction, and integrates one that has both), the benchmark (one NFE → steps rule, the NFE it counts) and the
command line (the method is listed and runs)."""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

import probflow
from probflow import grids
from probflow.bench import peers, runner
from probflow.inversion import encode_exact
from probflow.likelihood import likelihood
from probflow.method import steps_for_nfe
from probflow.models import GaussianMixture
from probflow.solvers import METHODS, Method, get_method, method_names, register

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

MEAN = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
VAR = 0.25
GAUSS = GaussianMixture(torch.ones(1), MEAN, VAR * torch.eye(2, dtype=torch.float64).unsqueeze(0))


def euler_step(field, x, s, s_next, state):
    return x + (s_next - s) * field(s, x), state


def counting_euler_step(field, x, s, s_next, state):
    """Euler whose state counts its steps: it keeps a state, yet each step depends on x̄ alone (single-step)."""
    return x + (s_next - s) * field(s, x), (0 if state is None else state) + 1


def ab2_step(field, x, s, s_next, state):
    """Adams–Bashforth 2 in σ with variable steps; the state carries (σ_prev, f_prev); the first step is Euler."""
    f, h = field(s, x), s_next - s
    if state is None:
        return x + h * f, (s, f)
    s_prev, f_prev = state
    r = h / (s - s_prev)
    return x + h * ((1 + r / 2) * f - (r / 2) * f_prev), (s, f)


def midpoint_with_start_step(field, x, s, s_next, state):
    """Midpoint (2 calls per step) plus one extra call on the first step (a start-up cost, like dpmpp_3m's)."""
    if state is None:
        field(s, x)
    h = s_next - s
    k1 = field(s, x)
    return x + h * field(s + h / 2, x + h / 2 * k1), True


DECLARED = {
    "test_cap_ab2": Method("test_cap_ab2", 2, step=ab2_step, multistep=True),
    "test_cap_counting": Method("test_cap_counting", 1, step=counting_euler_step),
    "test_cap_down_only": Method("test_cap_down_only", 1, step=euler_step, directions=frozenset({"down"})),
    "test_cap_plain": Method("test_cap_plain", 1, step=euler_step, augmented=False),
    "test_cap_mid": Method("test_cap_mid", 2, stages=2, extra_calls=1, step=midpoint_with_start_step),
}


@pytest.fixture(autouse=True)
def registered():
    for m in DECLARED.values():
        register(m)
    yield
    for name in DECLARED:
        METHODS.pop(name, None)


def _x0(n=3, seed=0):
    return MEAN + math.sqrt(VAR) * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_registered_methods_are_listed_by_the_registry_and_the_benchmark():
    names = method_names()
    assert set(DECLARED) <= set(names) and set(DECLARED) <= set(method_names(adaptive=False))
    assert not set(DECLARED) & set(method_names(adaptive=True))
    assert set(DECLARED) <= set(runner.fixed_methods()) and not set(DECLARED) & set(runner.adaptive_methods())
    assert get_method("test_cap_ab2") is DECLARED["test_cap_ab2"]


def test_integrate_follows_the_declared_directions():
    up = grids.log_uniform(10.0, 0.05, 6).flip(0)  # 0 … 10, increasing
    x = _x0()
    with pytest.raises(ValueError, match="sigmas: method 'test_cap_down_only' integrates downwards only"):
        probflow.integrate(GAUSS, x, up, "test_cap_down_only")
    # downwards it is Euler: the same numbers as torchdiffeq's euler (an independent implementation)
    down = up.flip(0)
    xb = x * math.sqrt(1 + 100.0)
    ours = probflow.integrate(GAUSS, xb, down, "test_cap_down_only").x
    torch.testing.assert_close(ours, probflow.integrate(GAUSS, xb, down, "euler").x, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(probflow.integrate(GAUSS, x, up, "test_cap_plain").x).all()  # both directions declared


def test_a_declared_multistep_method_is_inverted_by_the_trajectory_solve():
    sig = grids.log_uniform(10.0, 0.05, 8)
    x0 = _x0()
    z = encode_exact(GAUSS, x0, sig, "test_cap_ab2")
    assert z.info.get("solve") == "trajectory"
    back = probflow.decode(GAUSS, z.x, sig, "test_cap_ab2").x
    assert float((back - x0).abs().max()) < 1e-9


def test_a_single_step_method_that_keeps_a_state_is_inverted_per_step():
    """Its state is not a history: the declaration (multistep=False) decides, not whether a probe returns a state."""
    sig = grids.log_uniform(10.0, 0.05, 8)
    x0 = _x0()
    z = encode_exact(GAUSS, x0, sig, "test_cap_counting")
    assert z.info.get("solve") != "trajectory" and len(z.info["iterations"]) == len(sig) - 1
    back = probflow.decode(GAUSS, z.x, sig, "test_cap_counting").x
    assert float((back - x0).abs().max()) < 1e-9


def test_a_method_object_is_checked_like_a_registered_name():
    adaptive = Method("test_cap_adaptive_object", 1, adaptive=True, step=euler_step)
    with pytest.raises(ValueError, match="method"):
        encode_exact(GAUSS, _x0(), grids.log_uniform(10.0, 0.05, 4), adaptive)


@pytest.mark.parametrize("name", ["test_cap_plain", "test_cap_down_only"])
def test_the_likelihood_refuses_what_the_declaration_rules_out(name):
    grid = grids.log_uniform(10.0, 0.05, 8).flip(0)
    with pytest.raises(ValueError, match=f"{name}|method"):
        likelihood(GAUSS, _x0(), grid, name)


def test_the_likelihood_integrates_a_declared_augmented_method():
    """AB2 against the Gaussian's closed-form log-density (an independent formula): its error falls at its declared
    order 2 (÷4 when the log-uniform grid is refined twofold)."""
    x0 = _x0()
    d = x0 - MEAN
    exact = -0.5 * (d * d).sum(1) / VAR - math.log(2 * math.pi * VAR)
    errs = []
    for n in (200, 400):
        grid = grids.log_uniform(200.0, 1e-3, n).flip(0)
        errs.append(float((likelihood(GAUSS, x0, grid, "test_cap_ab2", prior="exact").log_prob - exact).abs().max()))
    assert errs[1] < 0.02 and 3.0 < errs[0] / errs[1] < 5.5, errs


def test_the_benchmark_turns_nfe_into_steps_by_the_declared_rule():
    m = get_method("test_cap_mid")
    # 2n + 1 calls: 9 and 11 are equally close to 10, so the fewer steps (4); at 20: 19 and 21, so 9
    assert runner.steps_for(m, 10) == m.steps_for_nfe(10) == 4
    assert m.steps_for_nfe(20) == 9 and m.steps_for_nfe(1) == 1 and m.steps_for_nfe(7) == 3
    assert peers.steps_for_nfe("heun_d", 10) == steps_for_nfe(10, 2, -1) == 5  # diffusers' Heun: 2n − 1 calls
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    assert importlib.import_module("heldout_study").steps_for("test_cap_mid", 10) == 4
    w = probflow.bench.mixture_workload(2, 4, 0, ref_tol=1e-9, check_tol=1e-7)
    row = runner.run_fixed(w, "test_cap_mid", "uniform", 10)
    assert row["error"] is None and row["steps"] == 4 and row["nfe"] == 2 * 4 + 1


def test_the_command_line_lists_and_runs_a_registered_method(tmp_path, capsys):
    from probflow.cli import main

    assert main(["sample", "--method", "no_such_method", "--n", "1", "--out", str(tmp_path / "a.png")]) == 2
    assert "test_cap_ab2" in capsys.readouterr().err
    out = tmp_path / "b.png"
    assert main(["sample", "--method", "test_cap_ab2", "--steps", "4", "--n", "2", "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
