"""Every fixed-grid method converges at its declared order, measured against the DOP853 reference (MATH.md §7)."""

import math

import pytest
import torch

import probflow
from probflow import grids
from probflow.models import GaussianMixture
from probflow.solvers import get_method

SMOOTH = GaussianMixture.random(3, 4, seed=2, std_range=(0.3, 0.8))


def measured_order(method, make_grid, steps, x, ref):
    errs = [(probflow.integrate(SMOOTH, x, make_grid(n), method).x - ref).abs().max().item() for n in steps]
    logs = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    loge = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    slope = ((logs - logs.mean()) * (loge - loge.mean())).sum() / ((logs - logs.mean()) ** 2).sum()
    return -slope.item(), errs


@pytest.fixture(scope="module")
def log_problem():
    x = probflow.noise(8, (3,), seed=0) * math.sqrt(1 + 10.0**2)
    ends = torch.tensor([10.0, 0.1], dtype=torch.float64)
    ref = probflow.integrate(SMOOTH, x, ends, "scipy_dop853", rtol=1e-12, atol=1e-12, options={"group": 8}).x
    return x, ref


@pytest.mark.parametrize(
    "method, steps, tol",
    [
        ("euler", [64, 128, 256], 0.15),
        ("midpoint", [32, 64, 128], 0.3),
        ("heun2", [32, 64, 128], 0.3),
        ("heun3", [16, 32, 64], 0.4),
        ("rk4", [8, 16, 32], 0.5),
    ],
)
def test_fixed_grid_method_converges_at_its_declared_order(log_problem, method, steps, tol):
    x, ref = log_problem
    order, errs = measured_order(method, lambda n: grids.log_uniform(10.0, 0.1, n, final_zero=False), steps, x, ref)
    assert abs(order - get_method(method).order) <= tol, (order, errs)


@pytest.mark.parametrize("method, steps", [("explicit_adams", [32, 64, 128]), ("implicit_adams", [32, 64, 128])])
def test_adams_methods_converge_at_their_order_on_uniform_grids(method, steps):
    x = probflow.noise(8, (3,), seed=0) * math.sqrt(1 + 3.0**2)
    ref = probflow.integrate(SMOOTH, x, torch.tensor([3.0, 1.0], dtype=torch.float64), "scipy_dop853",
                             rtol=1e-12, atol=1e-12, options={"group": 8}).x
    order, errs = measured_order(method, lambda n: torch.linspace(3.0, 1.0, n + 1, dtype=torch.float64), steps, x, ref)
    assert abs(order - get_method(method).order) <= 0.5, (order, errs)


def test_adams_methods_refuse_non_uniform_grids():
    with pytest.raises(ValueError, match="sigmas: .*explicit_adams.*equal steps"):
        probflow.integrate(SMOOTH, torch.zeros(2, 3, dtype=torch.float64), grids.log_uniform(10.0, 0.1, 8),
                           "explicit_adams")


def test_dopri5_error_follows_its_tolerance(log_problem):
    x, ref = log_problem
    ends = torch.tensor([10.0, 0.1], dtype=torch.float64)
    errs = [(probflow.integrate(SMOOTH, x, ends, "dopri5", rtol=t, atol=t).x - ref).abs().max().item()
            for t in (1e-4, 1e-6, 1e-8)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6
