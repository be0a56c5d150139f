import math

import pytest
import torch

from probflow import grids, schedules


@pytest.mark.parametrize("build", [schedules.linear, schedules.scaled_linear, schedules.cosine])
def test_t_of_sigma_is_exact_at_table_points_and_monotone(build):
    sch = build()
    t = sch.t(sch.sigmas)
    assert torch.equal(t, torch.arange(sch.T, dtype=torch.float64))
    s = torch.logspace(-4, 3, 2001, dtype=torch.float64)
    ts = sch.t(s)
    assert (ts[1:] >= ts[:-1]).all()
    assert float(sch.t(0.0)) == 0.0 and float(sch.t(1e6)) == sch.T - 1
    assert torch.allclose(sch.sigma(t), sch.sigmas, rtol=1e-14)


def test_linear_schedule_matches_ddpm_closed_form():
    sch = schedules.linear()
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    ab = math.prod(1 - b for b in betas)
    assert sch.alpha_bar[-1].item() == pytest.approx(ab, rel=1e-12)
    assert sch.sigma_max == pytest.approx(math.sqrt((1 - ab) / ab), rel=1e-12)
    ab_back = schedules.sigma_to_alpha_bar(schedules.alpha_bar_to_sigma(sch.alpha_bar))
    assert torch.allclose(ab_back, sch.alpha_bar, rtol=1e-13)


def test_cosine_schedule_follows_nichol_dhariwal_before_the_beta_cap():
    sch = schedules.cosine()

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 100, 500, 900):
        assert sch.alpha_bar[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-10)


def test_ddim_trailing_grid_starts_at_T_minus_1_and_ends_at_zero():
    sch = schedules.linear()
    t = grids.ddim_timesteps(sch, 10)
    assert t.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    g = grids.ddim(sch, 10)
    assert g[0].item() == sch.sigma_max and g[-1].item() == 0.0 and len(g) == 11
    q = grids.ddim_timesteps(sch, 50, "quadratic")
    assert q[0] == 999 and (q[:-1] > q[1:]).all()
    assert (grids.ddim(sch, 100, "quadratic").diff() < 0).all()


def test_karras_and_log_uniform_grids():
    k = grids.karras(80.0, 0.002, 10)
    assert len(k) == 11 and k[0].item() == pytest.approx(80.0) and k[-2].item() == pytest.approx(0.002)
    i, rho = 3, 7.0
    expect = (80 ** (1 / rho) + i / 9 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert k[i].item() == pytest.approx(expect, rel=1e-12)
    lu = grids.log_uniform(100.0, 0.01, 8, final_zero=False)
    assert torch.allclose(lu.log().diff(), torch.full((8,), math.log(1e-4) / 8, dtype=torch.float64))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([1.0, 2.0, 1.5]), "strictly monotone"),
        (torch.tensor([3.0, float("nan"), 0.0]), "NaN or Inf"),
        (torch.tensor([3.0, float("inf"), 0.0]), "NaN or Inf"),
        (torch.tensor([2.0, -1.0]), "non-negative"),
        (torch.tensor([1.0]), "at least 2"),
        (torch.tensor([[1.0, 0.0]]), "1-D"),
    ],
)
def test_bad_grids_are_refused_naming_the_argument(bad, match):
    with pytest.raises(ValueError, match=f"sigmas: .*{match}"):
        grids.check_grid(bad)


def test_bad_schedule_and_steps():
    with pytest.raises(ValueError, match="alpha_bar"):
        schedules.Schedule("x", torch.tensor([0.5, 0.7]))
    with pytest.raises(ValueError, match="steps"):
        grids.ddim(schedules.linear(), 0)
    with pytest.raises(ValueError, match="schedule"):
        schedules.by_name("nope")


# ---------------------------------------------------------------- arguments and bounds (issue 27)

@pytest.mark.parametrize("rho", [0, -1, float("nan"), float("inf"), True])
def test_karras_refuses_a_bad_rho_naming_it(rho):
    with pytest.raises(ValueError, match="rho: expected a number in \\(0, 1000\\]"):
        grids.karras(80.0, 0.002, 10, rho=rho)


def test_karras_ends_exactly_at_the_range_asked_for():
    for steps in (3, 10, 50):
        g = grids.karras(80.0, 0.002, steps)
        assert float(g[0]) == 80.0 and float(g[-2]) == 0.002 and float(g[-1]) == 0.0


@pytest.mark.parametrize("name", sorted(grids.NAMED))
def test_grids_refuse_too_many_steps_before_allocating_unless_lifted(name):
    sch = schedules.linear()
    with pytest.raises(ValueError, match="steps: 1000000000 is above the limit of 1000000"):
        grids.named(name, sch, 10**9)
    with pytest.raises(ValueError, match="steps: 20 is above the limit of 10"):
        grids.named(name, sch, 20, max_steps=10)
    with pytest.raises(TypeError, match="steps: expected a positive integer, got bool"):
        grids.named(name, sch, True)


def test_the_step_bound_can_be_lifted():
    assert len(grids.named("logsnr", schedules.linear(), 1_500_000, max_steps=None)) == 1_500_001


@pytest.mark.parametrize("call,frag", [
    (lambda: grids.karras(float("inf"), 0.002, 5), "sigma_min, sigma_max"),
    (lambda: grids.log_uniform(80.0, float("nan"), 5), "sigma_min, sigma_max"),
    (lambda: grids.check_grid("abc"), "sigmas: expected a 1-D tensor or list"),
    (lambda: grids.ddim(None, 5), "schedule: expected a probflow Schedule"),
    (lambda: grids.log_snr_tuned(schedules.linear(), 5, end=float("nan")), "end:"),
    (lambda: schedules.linear(10**9), "T: expected an integer number of timesteps in \\[2, 1e\\+07\\]"),
    (lambda: schedules.cosine(s=-1), "s: expected a finite offset"),
    (lambda: schedules.cosine(max_beta=2), "max_beta"),
    (lambda: schedules.linear().sigma(float("nan")), "t: expected values in"),
])
def test_bad_arguments_are_refused_naming_them(call, frag):
    with pytest.raises((ValueError, TypeError), match=frag):
        call()
