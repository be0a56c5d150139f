"""probflow.newton: matrix-free Anderson and Newton–Krylov, on maps with known roots (or none), forward calls only."""

import torch

from probflow.newton import Anderson, newton_krylov


def test_newton_krylov_solves_where_a_root_exists_and_gives_up_where_none_does():
    """z² + 1 = 5 from z = 1 converges to 2; z² + 1 = 0 has no real root: that sample is returned not done, and the
    other sample is unaffected."""
    target = torch.tensor([[5.0], [0.0]], dtype=torch.float64)
    z0 = torch.ones(2, 1, dtype=torch.float64)
    bound = torch.full((2,), 1e-12, dtype=torch.float64)
    nk = newton_krylov(lambda z: z * z + 1, target, z0, bound, 1e3 * bound, max_iter=60)
    assert nk.done.tolist() == [True, False]
    assert abs(float(nk.z[0, 0]) - 2.0) < 1e-11
    assert float(nk.res[1]) >= 1.0 - 1e-9  # |z² + 1| ≥ 1 for real z


def test_newton_krylov_on_a_coupled_nonlinear_map_matches_the_closed_form():
    """A z + 0.1 tanh(z) = A w + 0.1 tanh(w) per sample (A well conditioned, 32-D): the root is w, found from 0
    with forward differences of the map alone."""
    g = torch.Generator().manual_seed(0)
    d = 32
    a = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5

    def fn(z):
        return z @ a.T + 0.1 * torch.tanh(z)

    w = torch.randn(3, d, generator=g, dtype=torch.float64)
    bound = torch.full((3,), 1e-12, dtype=torch.float64)
    nk = newton_krylov(fn, fn(w), torch.zeros_like(w), bound, 1e3 * bound, krylov=d, max_iter=20)
    assert bool(nk.done.all()) and float((nk.z - w).abs().max()) < 1e-10


def test_anderson_accelerates_a_slow_linear_fixed_point():
    """y ← y + (b − M y) with M = diag(0.05 … 1.95): plain iteration contracts at 0.95 per step; Anderson (memory
    8) on the same map reaches 1e-12 in well under half the iterations (a Krylov method on a linear map)."""
    d = 40
    m = torch.linspace(0.05, 1.95, d, dtype=torch.float64)
    b = torch.ones(2, d, dtype=torch.float64)

    def run(memory):
        acc, y = Anderson(memory), torch.zeros(2, d, dtype=torch.float64)
        for k in range(400):
            g = b - m * y
            if float(g.abs().max()) <= 1e-12:
                return k
            y = acc.next(y, g)
        return 400

    fast, slow = run(8), run(0)
    assert fast < 150 and slow > 2 * fast


def test_newton_krylov_patience_ends_a_sample_stalled_at_its_noise_floor_only():
    """z + 1e-9·sin(1e9·z) = t (a map with a 1e-9 noise floor, as round-off is): with patience, a sample below
    stall_bound whose residual stops halving ends as done in fewer calls than without; a sample with no root
    (z² + 1 = 0, residual ≥ 1 above stall_bound) is not ended by patience."""
    def fn(z):
        return torch.cat([z[:1] + 1e-9 * torch.sin(1e9 * z[:1]), z[1:] * z[1:] + 1])

    target = torch.tensor([[0.7], [0.0]], dtype=torch.float64)
    z0 = torch.tensor([[0.2], [1.0]], dtype=torch.float64)
    bound, stall = torch.full((2,), 1e-16, dtype=torch.float64), torch.full((2,), 1e-7, dtype=torch.float64)
    plain = newton_krylov(fn, target, z0, bound, stall, max_iter=30, krylov=1)
    quick = newton_krylov(fn, target, z0, bound, stall, max_iter=30, krylov=1, patience=2)
    assert quick.done.tolist() == [True, False] and float(quick.res[0]) <= 1e-7
    assert int(quick.iterations[0]) < int(plain.iterations[0])
    assert int(quick.iterations[1]) == int(plain.iterations[1])


def test_newton_krylov_give_up_ends_a_sample_that_is_not_converging():
    """1/ln z = 0 has no root: Newton's step z ← z(1 + ln z) lowers the residual ever more slowly (never halving
    it within 4 steps once z is large). With give_up = 4 the sample ends early, not done; without it the solve runs
    to max_iter. A sample with a regular root (z² = 4) converges either way."""
    def fn(z):
        return torch.cat([1 / torch.log(z[:1]), z[1:] * z[1:]])

    target = torch.tensor([[0.0], [4.0]], dtype=torch.float64)
    z0 = torch.tensor([[20.0], [1.0]], dtype=torch.float64)
    bound = torch.full((2,), 1e-12, dtype=torch.float64)
    plain = newton_krylov(fn, target, z0, bound, 1e3 * bound, max_iter=30, krylov=1)
    quick = newton_krylov(fn, target, z0, bound, 1e3 * bound, max_iter=30, krylov=1, give_up=4)
    assert int(plain.iterations[0]) == 30 and int(quick.iterations[0]) < 15
    assert quick.done.tolist() == [False, True] and plain.done.tolist() == [False, True]
    assert abs(float(quick.z[1, 0]) - 2.0) < 1e-11


def test_newton_krylov_rms_measures_and_stops_by_the_rms():
    """rms=True: residuals and bounds are per-sample RMS (a residual spread over many entries meets an RMS bound
    its max norm would miss), and the reported residual is the RMS of fn(z) − target at the returned z."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 50, generator=g, dtype=torch.float64) + 0.5
    target = torch.randn(2, 50, generator=g, dtype=torch.float64)

    def fn(z):  # a diagonal, mildly nonlinear map: Newton converges in a few steps
        return a * z + 0.1 * z**3

    z0 = torch.zeros_like(target)
    bound = torch.full((2,), 1e-3, dtype=torch.float64)
    nk = newton_krylov(fn, target, z0, bound, bound, max_iter=20, krylov=50, rms=True)
    r = fn(nk.z) - target
    assert torch.allclose(nk.res, r.pow(2).mean(1).sqrt(), rtol=1e-12, atol=0)
    assert bool((nk.res <= 1e-3).all()) and bool(nk.done.all())
    mx = newton_krylov(fn, target, z0, bound, bound, max_iter=20, krylov=50)
    assert torch.allclose(mx.res, (fn(mx.z) - target).abs().amax(1), rtol=1e-12, atol=0)
