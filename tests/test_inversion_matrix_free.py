"""Exact inversion at image scale without forward-mode AD or dense Jacobians (issue 24): an ε-model that refuses
forward-mode tangents and gradients, on a state far above 4,096 numbers, built from torch's scaled-dot-product
attention and GroupNorm; the memory estimate refuses a batch before any model call."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F

import probflow
from probflow import grids, schedules
from probflow.field import DDIMField
from probflow.inversion import encode_exact, estimate_memory

SCH = schedules.linear()
SHAPE = (3, 48, 48)  # 6,912 numbers per image: above the old dense solver's 4,096 limit


class _ForwardOnly(torch.nn.Module):
    """ε of N(0, s2·I) plus a small attention network (conv, GroupNorm, torch's SDPA over 12×12 tokens, conv):
    smooth, nonlinear, and it raises on a forward-mode dual tensor or a tensor that requires grad, so a solver
    that reaches for forward-mode AD or a backward pass fails here."""

    def __init__(self, s2: float = 0.3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.s2 = s2
        self.inp = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        self.out = torch.nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.double()  # the network part runs in float64 whatever the state's dtype
        self.calls = 0

    def forward(self, x, sigma):
        if fwad.unpack_dual(x).tangent is not None or x.requires_grad:
            raise RuntimeError("forward-mode AD / autograd used on the ε-model")
        self.calls += 1
        xbar = x * torch.sqrt(1 + sigma**2)
        base = xbar * sigma / (self.s2 + sigma**2)
        h = F.silu(self.norm(self.inp(x.double())))
        t = F.avg_pool2d(h, 4)  # (B, 8, 12, 12)
        b, c, hh, ww = t.shape
        q = t.flatten(2).transpose(1, 2)[:, None]  # (B, 1, 144, 8)
        a = F.scaled_dot_product_attention(q, q, q)[:, 0].transpose(1, 2).reshape(b, c, hh, ww)
        h = h + F.interpolate(a, scale_factor=4)
        return base + (0.05 * torch.tanh(self.out(h)) / (1 + sigma.double())).to(x.dtype)


def _images(n, dtype):
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SHAPE[1]), torch.linspace(-1, 1, SHAPE[2]), indexing="ij")
    out = []
    for _ in range(n):
        f = torch.rand(3, 2, generator=g) * 3
        out.append(torch.stack([0.8 * torch.cos(f[c, 0] * xx + f[c, 1] * yy) for c in range(3)]))
    return torch.stack(out).to(dtype)


def _mse(a, b):
    return float(((a.double() - b.double()) ** 2).mean())


def test_model_refuses_forward_ad():
    model = _ForwardOnly()
    x = _images(1, torch.float32)
    with fwad.dual_level(), pytest.raises(RuntimeError, match="forward-mode"):
        model(fwad.make_dual(x, torch.ones_like(x)), torch.tensor(1.0))


@pytest.mark.parametrize("method,dtype", [("euler", torch.float64), ("heun2", torch.float32),
                                          ("dpmpp_2m", torch.float64), ("unipc", torch.float32)])
def test_round_trip_at_image_scale_forward_calls_only(method, dtype):
    model = _ForwardOnly()
    x0 = _images(2, dtype)
    g = grids.named("quadratic_open", SCH, 10)
    enc = encode_exact(model, x0, g, method)
    back = probflow.decode(model, enc.x, g, method).x
    assert _mse(back, x0) <= (1e-24 if dtype == torch.float64 else 1e-12)
    assert enc.info["solve"] == ("trajectory" if method in ("dpmpp_2m", "unipc") else "step")


def test_memory_estimate_is_linear_in_the_state_and_refuses_before_any_model_call():
    g = grids.named("quadratic_open", SCH, 20)
    small, big = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 256, 256)
    for method in ("euler", "dpmpp_2m"):
        ratio = estimate_memory(big, g, method) / estimate_memory(small, g, method)
        assert ratio == pytest.approx(64, rel=0.01)  # O(k·state), not O(D²)
    per_step = estimate_memory(small, g, "euler")
    assert per_step <= 40 * small.numel() * 8  # a few dozen copies of the batch state
    model = _ForwardOnly()
    field = DDIMField(model)
    x0 = _images(4, torch.float64)
    need = estimate_memory(x0, g, "dpmpp_2m")
    with pytest.raises(ValueError, match=r"x0: .*MiB.*max_memory"):
        encode_exact(field, x0, g, "dpmpp_2m", max_memory=need - 1)
    assert field.nfe == 0 and model.calls == 0  # refused before anything ran


def test_encode_stays_within_its_estimate():
    """The solve's own tensors fit the estimate: with max_memory set to it the solve runs, and the Anderson
    history, Krylov basis and trajectory are the only state-sized buffers (tracked by the largest live
    allocation count is not portable; the estimate is checked against the sizes it is made of)."""
    model = _ForwardOnly()
    x0 = _images(1, torch.float64)
    g = grids.named("quadratic_open", SCH, 10)
    need = estimate_memory(x0, g, "euler")
    enc = encode_exact(model, x0, g, "euler", max_memory=need)
    assert enc.info["memory_bytes"] == need
    assert _mse(probflow.decode(model, enc.x, g, "euler").x, x0) <= 1e-24


def test_step_at_its_own_roundoff_ends_without_a_search():
    """A float32 step whose evaluation carries ~2 ulps of |y| of rounding-like error (a large-σ step: |x̄_i| ≫
    |x̄_{i+1}|, so 1 ulp of the target is below what the step can resolve) ends once its residual is within 4 ulps of
    |y|_∞ and stops improving, not after a plain-iteration search for a luckier rounding (kept for networks in a lower
    precision than the state, `floor_eps`, whose output is piecewise constant): fewer calls, the same residual."""
    import types

    from probflow.inversion.steps import _solve_step

    eps = torch.finfo(torch.float32).eps

    def step(field, y, s, s_next, state=None):  # 0.1·y + a smooth nonlinearity + deterministic "rounding"
        return 0.1 * y + 1.5 * torch.tanh(y / 50) + 2 * eps * y.abs().amax() * torch.sin(1e7 * y.double()).float(), None

    m = types.SimpleNamespace(backend="probflow", name="fake", step=step)
    ystar = 100 * torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    target = 0.1 * ystar + 1.5 * torch.tanh(ystar / 50)
    args = (DDIMField(lambda x, s: x), m, target, ystar * 1.01, torch.tensor(5.0), torch.tensor(1.0),
            torch.full((2,), 0.1, dtype=torch.float64), eps, 100, 8)
    _, calls, r, _ = _solve_step(*args)
    _, calls_search, r_search, _ = _solve_step(*args, floor_eps=1e-9)
    assert bool((r <= 4 * eps * ystar.abs().amax()).all()) and bool((r > eps * target.abs().amax()).all())
    assert calls < calls_search and bool((r <= 1.5 * r_search).all())


def test_a_failed_step_says_which_end_of_the_grid_to_refine():
    """The error names what to try for the step that failed: the first decoder step (from σ_max) is refined by a
    shorter first step, not a shorter last one."""
    from probflow.inversion.steps import _step_error
    from probflow.solvers import get_method

    sig = grids.named("quadratic_open", SCH, 10)
    one = torch.ones(1, dtype=torch.float64)
    args = (get_method("euler"), sig)
    first = str(_step_error(*args, 0, 10, one, one / 2, "x calls", one / 8))
    last = str(_step_error(*args, 9, 10, one, one / 2, "x calls", one / 8))
    assert "σ = 157.4" in first and "shorter first step from σ_max" in first and "shorter last step" not in first
    assert "shorter last step" in last and "first step" not in last


def test_samples_a_batched_step_leaves_are_solved_again_alone(monkeypatch):
    """A step that the batched solve leaves unconverged for one sample (simulated: every batched solve reports
    sample 1 as failed) is solved again for that sample alone and checked in the batch: the latent exists and
    round-trips; without the retry encode_exact raises."""
    from probflow.inversion import steps
    from probflow.models import GaussianMixture

    gm = GaussianMixture.random(8, 3, seed=3)
    x0 = gm.sample(3, generator=torch.Generator().manual_seed(4)).double()
    sig = grids.named("quadratic_open", SCH, 10)
    real = steps._settle

    def flaky(field, m, target, *args, **kw):
        y, k, r, b, rec = real(field, m, target, *args, **kw)
        if len(target) > 1:
            r = r.clone()
            r[1] = float("inf")
        return y, k, r, b, rec

    monkeypatch.setattr(steps, "_settle", flaky)
    sol = encode_exact(gm, x0, sig, "euler")
    redone = [f for f in sol.info["newton_fallbacks"] if "one_at_a_time" in f]
    assert len(redone) == 10 and all(f["one_at_a_time"] == [1] and f["converged"] for f in redone)
    back = probflow.decode(gm, sol.x, sig, "euler").x
    assert float((back - x0).pow(2).mean()) <= 1e-24
    monkeypatch.setattr(steps, "_one_at_a_time", lambda *a: (a[-3], a[-2], 0, {"one_at_a_time": []}))  # no retry
    with pytest.raises(probflow.inversion.InversionError, match=r"step 9 of 10\) did not converge .*then alone"):
        encode_exact(gm, x0, sig, "euler")


def test_a_trajectory_solve_out_of_passes_says_whether_it_was_still_converging():
    """The error of a trajectory solve that ran out of passes tells a user whether more passes could help: it says
    "still converging" (with the factor of the last 10 passes) only where the best residual fell by half or more."""
    from probflow.inversion.trajectory import _still_falling, trajectory_error
    from probflow.solvers import get_method

    sig = grids.named("quadratic_open", SCH, 10)
    falling = [10.0 ** (-k / 5) for k in range(30)]  # ×10 every 5 passes: ×100 over the last 10
    flat = [1e-3 * (1 + 0.1 * (k % 3)) for k in range(30)]
    assert _still_falling(falling, 1e-12) == pytest.approx(100.0)
    assert _still_falling(flat, 1e-12) is None and _still_falling(falling[:15], 1e-12) is None
    r, b = torch.tensor([1e-6], dtype=torch.float64), torch.tensor([1e-11], dtype=torch.float64)
    said = str(trajectory_error(get_method("dpmpp_2m"), sig, r, b, 101, falling))
    assert "still converging (its best residual fell 100.0× over the last 10 passes" in said and "max_iter" in said
    assert "still converging" not in str(trajectory_error(get_method("dpmpp_2m"), sig, r, b, 101, flat))
