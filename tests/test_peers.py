"""diffusers' schedulers as peers (probflow.bench.peers): the driver is checked against probflow and against the
exact flow, so that a benchmark against them compares methods, not conventions (docs/MATH.md §3, §6)."""

import math

import pytest
import torch

from probflow import grids, schedules
from probflow.bench import peers
from probflow.flows import noise, sample
from probflow.models import GaussianMixture

pytestmark = pytest.mark.skipif(not peers.available(), reason="diffusers is not importable")


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    sch = schedules.linear()
    model = GaussianMixture.random(4, 3, seed=2, std_range=(0.1, 0.5))
    z = noise(6, (4,), seed=3)
    return sch, model, z


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_peer_equals_probflow_euler_on_the_trailing_grid(setup, steps):
    # DDIM (Eq. 11, diffusers' own code) and Euler on Eq. 12 are the same map on the same σ grid (docs/MATH.md §3);
    # with the float64 table swapped in, the only difference is rounding.
    sch, model, z = setup
    r = peers.run_peer("ddim", model, z, sch, steps)
    x = sample(model, z, grids.ddim(sch, steps), "euler").x
    assert r.nfe == steps and not r.notes
    assert torch.allclose(r.x, x, rtol=0, atol=1e-10), float((r.x - x).abs().max())
    assert r.model_sigmas[0] == sch.sigma_max  # starts at t = T−1, σ from the float64 table


def test_ddim_peer_flags_the_misstep_when_steps_do_not_divide_T(setup):
    # trailing timesteps of 7 steps are not T//7 apart: DDIMScheduler moves to t − T//7 instead (docs/MATH.md §6)
    sch, model, z = setup
    r = peers.run_peer("ddim", model, z, sch, 7)
    assert r.notes and "missteps" in r.notes[0]
    x = sample(model, z, grids.ddim(sch, 7), "euler").x
    assert (r.x - x).abs().max() > 1e-6


def test_euler_discrete_peer_starts_from_the_same_xbar_and_matches_euler(setup):
    # EulerDiscreteScheduler keeps x̄ and steps in float32 inside `step`: agreement to its float32 floor
    sch, model, z = setup
    r = peers.run_peer("euler_d", model, z, sch, 10)
    x = sample(model, z, grids.ddim(sch, 10), "euler").x
    assert r.nfe == 10
    assert (r.x - x).abs().max() < 1e-5
    sched = peers.make_scheduler("euler_d", sch, 10)
    assert sched.sigmas.dtype == torch.float64 and float(sched.sigmas[0]) == sch.sigma_max


def test_karras_peer_grid_is_probflow_karras_grid_in_float64(setup):
    sch, _, _ = setup
    sched = peers.make_scheduler("dpmpp_2m", sch, 12, "karras")
    ref = grids.karras(sch.sigma_max, sch.sigma_min, 12)
    assert torch.allclose(sched.sigmas, ref, rtol=1e-14, atol=0)


def test_heun_peer_counts_two_calls_per_step_and_one_for_the_last(setup):
    sch, model, z = setup
    r = peers.run_peer("heun_d", model, z, sch, 5)
    assert r.nfe == 9 == peers.steps_for_nfe("heun_d", 10) * 2 - 1


@pytest.fixture(scope="module")
def flow():
    """A sharp 8-D mixture, its noise and the exact flow's x_0 (DOP853 at 1e-12)."""
    torch.set_num_threads(1)
    sch = schedules.linear()
    model = GaussianMixture.random(8, 4, seed=5, std_range=(0.05, 0.5))
    z = noise(8, (8,), seed=6)
    end = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    return sch, model, z, sample(model, z, end, "scipy_dop853", rtol=1e-12, atol=1e-12, options={"group": 8}).x


def test_dpmpp_2m_peer_converges_to_the_exact_flow(flow):
    # error against DOP853 at 1e-12 falls with NFE, faster than first order on the Karras grid
    sch, model, z, ref = flow
    errs = []
    for n in (10, 20, 40, 80):
        r = peers.run_peer("dpmpp_2m", model, z, sch, n, "karras_sigma")
        assert r.nfe == n
        errs.append(float((r.x - ref).pow(2).mean().sqrt()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert math.log2(errs[1] / errs[3]) / 2 > 1.3, errs  # mean order over 20 → 80 steps


def test_unknown_peer_and_grid_are_rejected(setup):
    sch, model, z = setup
    with pytest.raises(ValueError, match="peer"):
        peers.run_peer("nope", model, z, sch, 5)
    with pytest.raises(ValueError, match="grid"):
        peers.run_peer("ddim", model, z, sch, 5, "karras")
    with pytest.raises(ValueError, match="model_sigma"):
        peers.run_peer("ddim", model, z, sch, 5, model_sigma="t")


def test_euler_type_peers_start_the_model_at_the_same_x_T(setup):
    # trap 3: pipelines start Euler-type schedulers at σ_max·z; the driver starts at x̄_T = z·sqrt(1 + σ_max²),
    # so the model's first input (x̄/sqrt(1 + σ²)) is x_T itself, as for every other solver
    sch, model, z = setup
    for name in ("euler_d", "heun_d", "lms_d"):
        seen = []

        def rec(x, s, seen=seen):
            seen.append(x.clone())
            return model(x, s)

        peers.run_peer(name, rec, z, sch, 4)
        assert torch.allclose(seen[0], z, rtol=1e-12, atol=0), name


def test_ddim_peer_turns_off_clip_sample_which_would_change_the_result():
    # trap 2: DDIMScheduler clamps x̂_0 to [−1, 1] by default; data beyond ±1 make that visible
    import diffusers

    torch.set_num_threads(1)
    sch = schedules.linear()
    means = torch.tensor([[1.5, -1.5], [-1.5, 1.5]], dtype=torch.float64)
    model = GaussianMixture(torch.ones(2), means, 0.01 * torch.eye(2).expand(2, 2, 2).clone())
    z = noise(4, (2,), seed=0)
    ours = peers.run_peer("ddim", model, z, sch, 10)
    assert peers.make_scheduler("ddim", sch, 10).config.clip_sample is False
    x = sample(model, z, grids.ddim(sch, 10), "euler").x
    assert torch.allclose(ours.x, x, atol=1e-10)
    d = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", set_alpha_to_one=True)
    assert d.config.clip_sample is True
    d.set_timesteps(10)
    xc = z.clone()
    for t in d.timesteps:
        xc = d.step(model(xc, sch.sigmas[int(t)]), t, xc).prev_sample
    assert (xc - x).abs().max() > 0.1  # clipped: lands inside [−1, 1], not on the data


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler_d", "lms_d"])
def test_exponential_peer_grid_is_probflow_log_uniform_grid_in_float64(setup, name):
    # diffusers' use_exponential_sigmas (σ log-uniform from σ_max to σ_0) is probflow's log-SNR uniform grid
    sch, _, _ = setup
    # (Euler-type schedulers end at the σ of their last trailing timestep instead of σ_0, as with Karras)
    sched = peers.make_scheduler(name, sch, 12, "exponential")
    s = sched.sigmas.double()
    end = sch.sigma_min if peers.PEERS[name].variable == "x" else float(s[-2])
    ref = grids.log_uniform(sch.sigma_max, end, 12)
    assert torch.allclose(s, ref, rtol=1e-14, atol=0)


def test_exponential_grids_are_offered_where_diffusers_has_them(setup):
    assert "exponential" not in peers.peer_grids("ddim")
    assert {"exponential", "exponential_sigma"} <= set(peers.peer_grids("unipc"))
    assert "exponential" in peers.peer_grids("heun_d") and "exponential_sigma" not in peers.peer_grids("heun_d")
    sch, model, z = setup
    # exponential_sigma: the model at the scheduler's own σ; exponential: at the pipeline's rounded timestep
    r_s = peers.run_peer("dpmpp_2m", model, z, sch, 8, "exponential_sigma")
    r_t = peers.run_peer("dpmpp_2m", model, z, sch, 8, "exponential")
    assert r_s.model_sigmas == pytest.approx(r_s.sigmas[:-1].tolist(), rel=1e-14)
    assert r_t.model_sigmas != pytest.approx(r_s.model_sigmas, rel=1e-6)
    assert r_s.nfe == r_t.nfe == 8


def test_unipc_order_3_peer_converges_faster_than_order_2(flow):
    # the fairness peer for probflow's unipc_3: diffusers' UniPC with solver_order = 3 must really run at order 3
    # (until its first-order last step into σ = 0 caps it), measured against DOP853 at 1e-12
    sch, model, z, ref = flow
    assert peers.make_scheduler("unipc_3", sch, 10, "karras_sigma").config.solver_order == 3
    assert peers.make_scheduler("unipc_4", sch, 10, "karras_sigma").config.solver_order == 4
    orders = {}
    for name in ("unipc", "unipc_3"):
        errs = [float((peers.run_peer(name, model, z, sch, n, "karras_sigma").x - ref).pow(2).mean().sqrt())
                for n in (20, 80)]
        orders[name] = math.log2(errs[0] / errs[1]) / 2
    assert orders["unipc_3"] > 2.3 and orders["unipc_3"] > orders["unipc"] + 0.5, orders


def test_euler_type_peers_jump_to_zero_from_their_last_trailing_sigma(setup):
    # diffusers builds the Euler-type Karras grid down to σ of the last trailing timestep (t = T/n − 1), then 0;
    # DPM-Solver++ ends the same option at σ_0
    sch, _, _ = setup
    for steps in (5, 10, 20):
        t_last = sch.T // steps - 1
        assert peers.last_sigma_before_zero("euler_d", sch, steps, "karras") == pytest.approx(
            float(sch.sigmas[t_last]), rel=1e-12)
        assert peers.last_sigma_before_zero("dpmpp_2m", sch, steps, "karras") == pytest.approx(sch.sigma_min, rel=1e-12)


def test_custom_grid_peer_steps_on_the_given_grid(setup):
    # the Karras grid given as `sigmas` reproduces grid "karras_sigma" exactly; another grid changes the result and
    # the model sees that grid's σ (trap 6)
    sch, model, z = setup
    kar = grids.karras(sch.sigma_max, sch.sigma_min, 8)
    for name in peers.custom_grid_peers():
        a = peers.run_peer(name, model, z, sch, 8, "karras_sigma")
        b = peers.run_peer(name, model, z, sch, 8, sigmas=kar)
        assert torch.allclose(a.x, b.x, rtol=0, atol=1e-12), name  # the same grid up to its last bit
        g = grids.log_uniform(sch.sigma_max, 0.05, 8)
        c = peers.run_peer(name, model, z, sch, 8, sigmas=g)
        assert c.nfe == 8 and torch.allclose(torch.tensor(c.model_sigmas, dtype=torch.float64), g[:-1], rtol=1e-12)
        assert (c.x - b.x).abs().max() > 1e-4, name


def test_custom_grid_is_refused_where_it_does_not_apply(setup):
    sch, model, z = setup
    with pytest.raises(ValueError, match="sigmas"):
        peers.run_peer("ddim", model, z, sch, 4, sigmas=grids.karras(sch.sigma_max, sch.sigma_min, 4))
    with pytest.raises(ValueError, match="sigmas"):
        peers.run_peer("unipc", model, z, sch, 5, sigmas=grids.karras(sch.sigma_max, sch.sigma_min, 4))
    with pytest.raises(ValueError, match="sigmas"):
        peers.run_peer("unipc", model, z, sch, 4, sigmas=grids.karras(sch.sigma_max, sch.sigma_min, 4).flip(0))
