"""What a solver is and what it can do: `Method`, the declaration every consumer reads.

A probflow method is a plain step function

    step(field, x̄, σ, σ_next, state) -> (x̄_next, state)

with explicit `state` (None before the first step), so multistep and reversible methods fit the same
signature; `probflow.integrate` runs the one loop over the grid, whose order is the direction (the same step
encodes on the flipped grid). Its capabilities are declared here, never inferred from its name or by running
it: the likelihood, exact inversion, the benchmark and the command line read these fields.

This module holds the declaration only; the registry (name → Method) is `probflow.solvers`, which imports every
step module and registers their methods in one list.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from probflow.field import DDIMField

__all__ = ["Method", "MethodCaution", "Step", "Start", "steps_for_nfe"]

Step = Callable[[DDIMField, Tensor, Tensor, Tensor, Any], tuple[Tensor, Any]]
# start(rtol, atol, monitor, options) -> the first state of an adaptive probflow method (checked before any step)
Start = Callable[[float, float, Any, dict], Any]


def steps_for_nfe(nfe: int, stages: int = 1, extra_calls: int = 0) -> int:
    """The step count n ≥ 1 whose model calls stages·n + extra_calls come closest to `nfe`; of two equally close,
    the smaller (never over the budget on a tie). The one rule for turning an NFE budget into steps, used for
    probflow's methods (`Method.steps_for_nfe`) and for diffusers' schedulers (`probflow.bench.peers`)."""
    try:
        n = operator.index(nfe)
    except TypeError:
        n = 0
    if n < 1 or isinstance(nfe, bool):
        raise ValueError(f"nfe: expected a positive integer, got {nfe!r}")
    stages = max(1, int(stages))
    lo = max(1, (n - extra_calls) // stages)
    return min((lo, lo + 1), key=lambda k: (abs(stages * k + extra_calls - n), k))


class MethodCaution(UserWarning):
    """A method's known weakness (`Method.caution`), warned by `integrate`; code that measures and reports the
    error itself (the demo's and the benchmark's tolerance sweeps) filters it."""


@dataclass(frozen=True)
class Method:
    """A named solver and its declared capabilities.

    backend: "probflow" (a `step` run by probflow's loop), "torchdiffeq" (odeint by name) or "scipy".
    order: the declared order of convergence (tests measure it).
    stages: model evaluations per step on a fixed grid (nominal; the field counts the real NFE).
    adaptive: takes rtol/atol and chooses its own steps; the grid is only where the solution is reported.
    reversible: stepping the flipped grid from the final state inverts the solve algebraically.
    uniform_steps: the method's coefficients assume equal steps in σ (torchdiffeq's Adams methods);
        integrate refuses other grids rather than return a silently wrong answer.
    default_options: options passed to the backend unless the caller overrides them.
    extra_calls: model calls a fixed-grid solve makes beyond stages × steps, the same for every step count
        (dpmpp_3m: one for its start; torchdiffeq's explicit Adams: its Runge–Kutta start-up).
    stochastic: the method draws noise (no deterministic order of convergence to measure against the ODE).
    multistep: a step's state carries a history of earlier model values into the next step (DPM-Solver++ 2M/3M,
        UniPC): one step cannot be inverted on its own (`probflow.inversion` solves the whole trajectory).
    directions: the directions of σ it can integrate, a subset of {"down", "up"} (generation; encoding and the
        likelihood integrate upwards).
    augmented: it can integrate an augmented state (x̄ and a scalar accumulator per sample, `probflow.likelihood`).
    start: for an adaptive probflow method, its first state from the step-size control and the backend options,
        `start(rtol, atol, monitor, options)` (`monitor.step(σ)` before each attempted step, for max_steps;
        `monitor.accept(σ)` after each accepted one, for progress); without it the step gets these as a dict.
    caution: a known weakness a user should hear about when choosing it (`integrate` warns once with it), e.g.
        an adaptive method whose error runs far from the requested tolerance; empty for none.
    caution_above: the caution holds only where max(rtol, atol) exceeds this (0: at every tolerance).
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
    start: Start | None = None
    caution: str = ""
    caution_above: float = 0.0

    def __post_init__(self) -> None:
        if self.backend == "probflow" and self.step is None:
            raise ValueError(f"method {self.name!r}: a probflow method needs a step function")
        if not self.directions or not set(self.directions) <= {"down", "up"}:
            raise ValueError(f"method {self.name!r}: directions must be a non-empty subset of {{'down', 'up'}}, "
                             f"got {set(self.directions)}")

    def steps_for_nfe(self, nfe: int) -> int:
        """Steps of a fixed-grid solve whose counted NFE (stages × steps + extra_calls) comes closest to `nfe`
        (`steps_for_nfe`: at least 1, the smaller on a tie)."""
        return steps_for_nfe(nfe, self.stages, self.extra_calls)
