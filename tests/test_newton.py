"""probflow.newton: per-sample Newton with Levenberg–Marquardt damping, on maps with known roots (or none)."""

import torch

from probflow.newton import jacobian, newton_solve


def test_solves_where_a_root_exists_and_gives_up_where_none_does():
    """z² + 1 = 5 from z = 1 converges to 2; z² + 1 = 0 has no real root: that sample is returned not done,
    at its least residual (|r| = 1 at z = 0), long before max_iter — and the other sample is unaffected."""
    target = torch.tensor([[5.0], [0.0]], dtype=torch.float64)
    z0 = torch.ones(2, 1, dtype=torch.float64)
    bound = torch.full((2,), 1e-14, dtype=torch.float64)
    nt = newton_solve(lambda z: z * z + 1, target, z0, bound, 1e3 * bound, max_iter=200)
    assert nt.done.tolist() == [True, False]
    assert abs(float(nt.z[0, 0]) - 2.0) < 1e-13
    assert abs(float(nt.res[1]) - 1.0) < 1e-6 and int(nt.iterations[1]) < 200


def test_damped_steps_converge_on_a_curved_map_where_full_newton_steps_overshoot():
    """tanh(z) = 0.9 per component, from z = 3: the Newton step from there overshoots far past the root
    (tanh' is 0.01 at 3), so the solve needs the damped steps; the root is atanh(0.9)."""
    target = torch.full((3, 4), 0.9, dtype=torch.float64)
    z0 = torch.full((3, 4), 3.0, dtype=torch.float64)
    bound = torch.full((3,), 1e-14, dtype=torch.float64)
    nt = newton_solve(torch.tanh, target, z0, bound, 1e3 * bound, max_iter=200)
    assert bool(nt.done.all())
    assert float((nt.z - torch.atanh(torch.tensor(0.9, dtype=torch.float64))).abs().max()) < 1e-12


def test_jacobian_matches_the_closed_form():
    z = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    j, how = jacobian(lambda v: torch.stack([v[:, 0] * v[:, 1], v[:, 0] ** 2], 1), z)
    want = torch.stack([torch.tensor([[2.0, 1.0], [2.0, 0.0]]), torch.tensor([[-1.0, 3.0], [6.0, 0.0]])]).double()
    assert how == "ad" and torch.allclose(j, want)


def test_a_crawling_broyden_jacobian_is_rebuilt(monkeypatch):
    """A linear map A z = b given the Jacobian A·diag(1 … 31.6): every step is accepted, but it removes only part of
    the residual, and Broyden's rank-one updates repair the Jacobian one direction at a time (up to 2·D steps on a
    linear map), so the solve crawls; the rule that rebuilds a Jacobian after 8 accepted steps in a row that do not
    halve |r|₂ converges within 30 iterations on 1 fresh Jacobian. With the rule switched off it does not."""
    import probflow.newton as nw

    d = 64
    g = torch.Generator().manual_seed(0)
    a = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    want = torch.randn(2, d, generator=g, dtype=torch.float64)
    target = want @ a.T
    bound = torch.full((2,), 1e-12, dtype=torch.float64)
    j0 = a @ torch.diag(torch.logspace(0, 1.5, d, dtype=torch.float64))

    def run():
        return newton_solve(lambda z: z @ a.T, target, torch.zeros(2, d, dtype=torch.float64), bound, 1e3 * bound,
                            max_iter=30, jac=j0.expand(2, d, d).clone())

    nt = run()
    assert bool(nt.done.all()) and nt.jacobians.tolist() == [1, 1]
    assert float((nt.z - want).abs().max()) < 1e-10
    monkeypatch.setattr(nw, "_MAX_SLOW", 10 ** 9)
    assert not bool(run().done.all())
