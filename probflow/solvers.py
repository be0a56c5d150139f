"""Solvers of Eq. 12 by name: one registry for torchdiffeq's methods, scipy's reference and probflow's own.

A method is a `probflow.method.Method`: a step function `step(field, x̄, σ, σ_next, state) -> (x̄_next, state)`
(or a backend's name) with its declared capabilities. torchdiffeq's methods are run by `torchdiffeq.odeint` on
the field directly (fixed-grid methods step exactly on the grid, so `euler` *is* DDIM, docs/MATH.md §3);
adaptive methods use the grid only as output points and take rtol/atol.

The registry is built here, in one list, from the declarations of the step modules (`exponential`, `reversible`,
`adaptive`), which import `Method` from `probflow.method` and never this module: `get_method` sees every method
whatever was imported first. To add a method: write its step function and `register(Method(name, order,
step=...))`.
"""

from __future__ import annotations

from probflow import adaptive as _adaptive
from probflow import exponential as _exponential
from probflow import reversible as _reversible
from probflow.method import Method, Step, steps_for_nfe

__all__ = ["Method", "Step", "METHODS", "register", "get_method", "method_names", "steps_for_nfe"]

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
# Methods whose error on Eq. 12 runs far above the requested tolerance (benchmarks/FAIR.md, held-out mixtures,
# σ_max → 0 at rtol = atol = 1e-3 and 1e-4): declared, so that `integrate` names the better choice.
_CAUTIONS = {
    "fehlberg2": "its error on Eq. 12 ran 276–964× the requested tolerance on held-out mixtures "
                 "(benchmarks/FAIR.md); use adaptive_exp or dopri5",
    "bosh3": "its error on Eq. 12 ran 4.0–23× the requested tolerance on held-out mixtures (benchmarks/FAIR.md); "
             "use adaptive_exp",
    "dopri5": "at rtol = atol = 1e-3 its error on Eq. 12 ran 2.2–23.6× the tolerance on held-out mixtures (1.1–1.9× "
              "at 1e-4; benchmarks/FAIR.md); use adaptive_exp (0.29–0.46× there) or a tolerance of 1e-4 or tighter",
    "adaptive_heun": "at rtol = atol = 1e-3 its error on Eq. 12 ran 1.5–44× the tolerance on held-out mixtures "
                     "(1.2–2.6× at 1e-4; benchmarks/FAIR.md); use adaptive_exp (0.29–0.46× there) or a tolerance of "
                     "1e-4 or tighter",
}
# dopri5 and adaptive_heun keep to their tolerance at 1e-4 and tighter: their caution is for looser ones only
_CAUTION_ABOVE = {"dopri5": 1e-4, "adaptive_heun": 1e-4}


def _backend_methods() -> list[Method]:
    """torchdiffeq's and scipy's methods, declared (run by `probflow.integrate` through their libraries)."""
    out = [Method(name, order, stages, backend="torchdiffeq",
                  description="torchdiffeq fixed-grid; euler is DDIM (docs/MATH.md §3)" if name == "euler"
                  else "torchdiffeq fixed-grid")
           for name, (order, stages) in _TORCHDIFFEQ_FIXED.items()]
    out += [Method(name, order, stages, backend="torchdiffeq", uniform_steps=True, default_options={"max_order": 4},
                   extra_calls=_ADAMS_EXTRA_CALLS.get(name, 0),
                   description="torchdiffeq fixed-grid Adams (equal steps in σ only)")
            for name, (order, stages) in _TORCHDIFFEQ_ADAMS.items()]
    out += [Method(name, order, adaptive=True, backend="torchdiffeq", description="torchdiffeq adaptive",
                   caution=_CAUTIONS.get(name, ""), caution_above=_CAUTION_ABOVE.get(name, 0.0))
            for name, order in _TORCHDIFFEQ_ADAPTIVE.items()]
    out.append(Method("scipy_dop853", 8, adaptive=True, backend="scipy",
                      description="scipy.integrate.solve_ivp DOP853 in float64, per sample: the ground-truth "
                                  "reference"))
    return out


# Every built-in method, registered here and only here (the order is the listing order of `method_names`).
for _method in (*_backend_methods(), *_exponential.DECLARED, *_reversible.DECLARED, *_adaptive.DECLARED):
    register(_method)
