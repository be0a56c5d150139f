"""Solvers of Eq. 12 by name: one registry for torchdiffeq's methods, scipy's reference and probflow's own.

A probflow method is a plain step function

    step(field, x̄, σ, σ_next, state) -> (x̄_next, state)

with explicit `state` (None before the first step), so multistep and reversible methods fit the same
signature; `integrate` runs the one loop over the grid. The grid's order is the direction: the same step
encodes on the flipped grid. torchdiffeq's methods are run by `torchdiffeq.odeint` on the field directly
(fixed-grid methods step exactly on the grid, so `euler` *is* DDIM, MATH.md §3); adaptive methods use the
grid only as output points and take rtol/atol.

To add a method: write its step function and `register(Method(name, order, step=...))`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from probflow.field import DDIMField

__all__ = ["Method", "Step", "METHODS", "register", "get_method", "method_names"]

Step = Callable[[DDIMField, Tensor, Tensor, Tensor, Any], tuple[Tensor, Any]]


@dataclass(frozen=True)
class Method:
    """A named solver.

    backend: "probflow" (a `step` run by probflow's loop), "torchdiffeq" (odeint by name) or "scipy".
    order: the declared order of convergence (tests measure it).
    stages: model evaluations per step on a fixed grid (nominal; the field counts the real NFE).
    adaptive: takes rtol/atol and chooses its own steps; the grid is only where the solution is reported.
    reversible: stepping the flipped grid from the final state inverts the solve algebraically.
    uniform_steps: the method's coefficients assume equal steps in σ (torchdiffeq's Adams methods);
        integrate refuses other grids rather than return a silently wrong answer.
    default_options: options passed to the backend unless the caller overrides them.
    extra_calls: model calls a fixed-grid solve makes beyond stages × steps, the same for every step count
        (dpmpp_3m: one for its start; torchdiffeq's explicit Adams: its Runge–Kutta start-up); the benchmark
        chooses steps = round((NFE − extra_calls) / stages) so that the counted NFE meets a target.
    stochastic: the method draws noise (no deterministic order of convergence to measure against the ODE).
    multistep: a step's state carries a history of earlier model values into the next step (DPM-Solver++ 2M/3M,
        UniPC): one step cannot be inverted on its own (`probflow.inversion` solves the whole trajectory).
    directions: the directions of σ it can integrate, a subset of {"down", "up"} (generation; encoding and the
        likelihood integrate upwards).
    augmented: it can integrate an augmented state (x̄ and a scalar accumulator per sample, `probflow.likelihood`).
    """

    name: str
    order: int
    stages: int = 1
    adaptive: bool = False
    backend: str = "probflow"
    step: Step | None = None
    reversible: bool = False
    description: str = ""
    uniform_steps: bool = False
    default_options: dict = field(default_factory=dict)
    extra_calls: int = 0
    stochastic: bool = False
    multistep: bool = False
    directions: frozenset[str] = frozenset({"down", "up"})
    augmented: bool = True

    def __post_init__(self) -> None:
        if self.backend == "probflow" and self.step is None:
            raise ValueError(f"method {self.name!r}: a probflow method needs a step function")
        if not self.directions or not set(self.directions) <= {"down", "up"}:
            raise ValueError(f"method {self.name!r}: directions must be a non-empty subset of {{'down', 'up'}}, "
                             f"got {set(self.directions)}")

    def steps_for_nfe(self, nfe: int) -> int:
        """Steps of a fixed-grid solve whose counted NFE (stages × steps + extra_calls) comes closest to `nfe`,
        at least 1: the one rule for turning an NFE budget into steps."""
        return max(1, int(round((nfe - self.extra_calls) / max(1, self.stages))))


METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry under its name (refuses to shadow one unless `replace`)."""
    if method.name in METHODS and not replace:
        raise ValueError(f"method: {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method: unknown solver {name!r}; expected one of {method_names()}")
    return METHODS[name]


def method_names(adaptive: bool | None = None) -> list[str]:
    """Registered names, optionally only the adaptive (True) or fixed-grid (False) ones."""
    return [n for n, m in METHODS.items() if adaptive is None or m.adaptive == adaptive]


_TORCHDIFFEQ_FIXED = {  # name: (order, stages)
    "euler": (1, 1),
    "midpoint": (2, 2),
    "heun2": (2, 2),
    "heun3": (3, 3),
    "rk4": (4, 4),
}
# torchdiffeq's fixed Adams methods use constant-step coefficients: on a non-uniform grid they are wrong
# (explicit_adams diverges on a log-σ grid). With its default max_order = 12, explicit Adams is unstable
# even on uniform grids; max_order = 4 gives the stable 3-step Adams–Bashforth (order 3, measured 2.96)
# and a predictor–corrector of order 4 (measured 3.95).
_TORCHDIFFEQ_ADAMS = {"explicit_adams": (3, 1), "implicit_adams": (4, 2)}
# explicit Adams (max_order 4) starts with Runge–Kutta steps: 6 calls beyond one per step, whatever the step count;
# implicit Adams' corrector iterations vary with the problem, so it declares none (its NFE is counted anyway).
_ADAMS_EXTRA_CALLS = {"explicit_adams": 6}
_TORCHDIFFEQ_ADAPTIVE = {"dopri5": 5, "dopri8": 8, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2}

for _name, (_order, _stages) in _TORCHDIFFEQ_FIXED.items():
    register(Method(_name, _order, _stages, backend="torchdiffeq",
                    description="torchdiffeq fixed-grid; euler is DDIM (MATH.md §3)" if _name == "euler"
                    else "torchdiffeq fixed-grid"))
for _name, (_order, _stages) in _TORCHDIFFEQ_ADAMS.items():
    register(Method(_name, _order, _stages, backend="torchdiffeq", uniform_steps=True,
                    default_options={"max_order": 4}, extra_calls=_ADAMS_EXTRA_CALLS.get(_name, 0),
                    description="torchdiffeq fixed-grid Adams (equal steps in σ only)"))
for _name, _order in _TORCHDIFFEQ_ADAPTIVE.items():
    register(Method(_name, _order, adaptive=True, backend="torchdiffeq", description="torchdiffeq adaptive"))
register(Method("scipy_dop853", 8, adaptive=True, backend="scipy",
                description="scipy.integrate.solve_ivp DOP853 in float64, per sample: the ground-truth reference"))
