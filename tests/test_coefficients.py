"""`probflow.coefficients`: UniPC's per-interval factors. Zero factors are the published method bit for bit;
a = b = −1 removes every higher-order part, leaving DDIM (Euler, docs/MATH.md §3) on a grid that stays above 0;
the gradient that `integrate(..., differentiable=True)` carries equals a finite difference; a fit on one batch
lowers the error on noise it never saw; bad input is refused by name."""

import math

import pytest
import torch

from probflow import fit as C
from probflow.bench.heldout import DiagonalMixture
from probflow.coefficients import SCALED_METHODS, fit_scales, scales_state
from probflow.exponential import ExpState
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.integrate import integrate
from probflow.schedules import linear


def _mixture():
    """Three sharp anisotropic components 2 apart (no sample switches component at these step counts)."""
    g = torch.Generator().manual_seed(3)
    k, d = 3, 8
    std = 0.03 * torch.exp(torch.rand(k, d, generator=g, dtype=torch.float64) * math.log(5.0))
    return DiagonalMixture(torch.ones(k, dtype=torch.float64), 2.0 * torch.eye(k, d, dtype=torch.float64), std**2)


def _setup(n, seed, steps=10):
    sch, model = linear(), _mixture()
    xb = noise(n, (8,), seed) * math.sqrt(1 + sch.sigma_max**2)
    grid = C.candidate_grids(sch, steps)["t^2/0.05"]
    ends = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    ref = integrate(model, xb, ends, "scipy_dop853", rtol=1e-11, atol=1e-11, options={"group": n}).x
    return model, xb, grid, ref


@pytest.mark.parametrize("method", SCALED_METHODS)
def test_zero_factors_are_the_published_method_bit_for_bit(method):
    model, xb, grid, _ = _setup(4, 1)
    plain = integrate(DDIMField(model), xb, grid, method).x
    zero = integrate(DDIMField(model), xb, grid, method, state=scales_state([(0.0, 0.0)] * (len(grid) - 1), grid)).x
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("method", SCALED_METHODS)
def test_minus_one_factors_leave_ddim(method):
    model, xb, grid, _ = _setup(4, 2)
    grid = grid[:-1]  # ends at σ = 0.05: no (E3) step into 0, so every step is the first-order exponential step
    pairs = [(-1.0, -1.0)] * (len(grid) - 1)
    out = integrate(DDIMField(model), xb, grid, method, state=scales_state(pairs, grid)).x
    ddim = integrate(DDIMField(model), xb, grid, "euler").x
    assert float((out - ddim).abs().max()) < 1e-12 * float(ddim.abs().max())
    assert float((integrate(DDIMField(model), xb, grid, method).x - ddim).abs().max()) > 1e-4  # the factors act


def test_the_gradient_through_integrate_equals_a_finite_difference():
    model, xb, grid, ref = _setup(4, 3)
    n = len(grid) - 1
    k, which = 4, 0

    def loss(delta, grad):
        p = torch.zeros(n, 2, dtype=torch.float64, requires_grad=grad)
        q = p + torch.nn.functional.one_hot(torch.tensor(k), n).double()[:, None] * torch.tensor([delta, 0.0])
        pairs = tuple((q[i, 0], q[i, 1]) for i in range(n))
        with torch.enable_grad():
            x = integrate(DDIMField(model), xb, grid, "unipc_3", state=ExpState(scales=pairs), differentiable=True).x
            v = (x - ref).pow(2).mean()
        if grad:
            v.backward()
            return float(v.detach()), float(p.grad[k, which])
        return float(v.detach())

    _, g = loss(0.0, True)
    h = 1e-5
    fd = (loss(h, False) - loss(-h, False)) / (2 * h)
    assert g == pytest.approx(fd, rel=1e-5), (g, fd)
    assert abs(g) > 0


def test_fitted_factors_lower_the_error_on_noise_never_fitted_on():
    torch.set_num_threads(1)
    model, xb, grid, ref = _setup(32, 11, steps=8)
    scales, before, after = fit_scales(model, xb, ref, grid, "unipc_3", iters=100, lr=0.01)
    assert after < 0.7 * before, (before, after)
    _, xf, _, rf = _setup(128, 99, steps=8)

    def err(state):
        return float((integrate(DDIMField(model), xf, grid, "unipc_3", state=state).x - rf).pow(2).mean().sqrt())

    e0, e1 = err(None), err(scales_state(scales, grid))
    assert e1 < 0.8 * e0, (e0, e1)


def test_fit_recipe_keeps_validated_factors_and_counts_their_cost():
    torch.set_num_threads(1)
    model, x, xv = _mixture(), noise(16, (8,), 11), noise(16, (8,), 12)
    f = C.fit_recipe(model, x, xv, linear(), 20, max_evals=40, coef_iters=40, coef_lr=0.01)
    assert f.backward == 40 * 20
    if f.scales is not None:
        assert len(f.scales) == len(f.grid) - 1 and isinstance(f.state, ExpState)
    g = C.fit_recipe(model, x, xv, linear(), 20, max_evals=40, coef_iters=0)
    assert g.scales is None and g.backward == 0 and g.state is None
    assert torch.equal(f.grid, g.grid)
    h = C.fit_recipe(model, x, xv, linear(), 10, max_evals=40, coef_iters=40)  # below COEF_MIN_STEPS: no factors
    assert C.COEF_MIN_STEPS > 10 and h.scales is None and h.backward == 0


def test_bad_input_is_refused_by_name():
    model, xb, grid, ref = _setup(4, 5)
    with pytest.raises(ValueError, match="^method: "):
        fit_scales(model, xb, ref, grid, "dpmpp_2m")
    for kw, name in (({"iters": 0}, "iters"), ({"iters": 2.5}, "iters"), ({"lr": -1.0}, "lr"),
                     ({"drop_worst": 4}, "drop_worst")):
        with pytest.raises(ValueError, match=f"^{name}: "):
            fit_scales(model, xb, ref, grid, "unipc", **kw)
    with pytest.raises(ValueError, match="^reference: "):
        fit_scales(model, xb, ref[:2], grid)
    with pytest.raises(ValueError, match="^scales: "):
        scales_state([(0.0, 0.0)] * 3, grid)
    with pytest.raises(ValueError, match="^scales: "):
        scales_state([(0.0,)] * (len(grid) - 1))
    with pytest.raises(ValueError, match="^state.scales: "):
        integrate(DDIMField(model), xb, grid, "unipc", state=scales_state([(0.0, 0.0)] * 3))
    with pytest.raises(ValueError, match="^state.scales: "):
        integrate(DDIMField(model), xb, grid, "dpmpp_2m", state=scales_state([(0.0, 0.0)] * (len(grid) - 1)))
    with pytest.raises(ValueError, match="^differentiable: "):
        integrate(DDIMField(model), xb, grid[:-1], "dopri5", differentiable=True)
    for kw, name in (({"coef_iters": -1}, "coef_iters"), ({"coef_lr": 0.0}, "coef_lr")):
        with pytest.raises(ValueError, match=f"^{name}: "):
            C.fit_recipe(model, noise(4, (8,), 1), noise(4, (8,), 2), linear(), 10, **kw)
