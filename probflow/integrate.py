"""The one integrate path: Eq. 12 from the first to the last σ of a grid, by any registered method.

Sampling, encoding, benchmarks and the reference all come through `integrate`; it works in x̄ (docs/MATH.md
§1); `probflow.flows` converts to and from the model's variable x.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field, check_tolerances
from probflow.grids import check_grid
from probflow.method import MethodCaution
from probflow.solvers import Method, get_method

__all__ = ["Solution", "Control", "SolveOptions", "integrate", "check_state", "scale_in", "scale_out",
           "MaxStepsError", "SIGMA_FLOOR", "MAX_STEPS"]

# Adaptive solves: torchdiffeq's controllers work in u = log σ above SIGMA_FLOOR and in σ below it;
# every adaptive solve stops with MaxStepsError after MAX_STEPS attempted steps unless told otherwise.
SIGMA_FLOOR = 1e-3
MAX_STEPS = 100_000
# Longest step in u = log σ (torchdiffeq's `max_step`, overridable in options): dopri5 at rtol = atol = 1e-2
# took steps of several e-folds and ended 17× its tolerance off on a sharp D = 64 mixture; with 1, 0.24×.
LOG_MAX_STEP = 1.0


@dataclass
class Solution:
    """Result of a solve.

    x: the state at the last σ of the grid. nfe: model evaluations this solve made (rejected adaptive
    steps included). sigmas: the grid, in the state's dtype. trajectory: the state at every grid point,
    shape (len(sigmas), *x.shape), when asked for. state: the solver's final state (for reversible and
    multistep methods; pass it back to continue or to invert exactly), None for torchdiffeq methods.
    method: the solver's name. info: statistics of solves that have them (`probflow.inversion.encode_exact`:
    per-step iterations and residuals), else None.
    """

    x: Tensor
    nfe: int
    sigmas: Tensor
    trajectory: Tensor | None = None
    state: Any = None
    method: str = ""
    info: dict | None = None


Progress = Callable[[float, int], None]
Norm = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Control:
    """Step-size control of the adaptive methods, validated once, when it is made (fixed-grid methods ignore it).

    rtol, atol: each sample's local error is held below atol + rtol·|x̄| (positive numbers). max_steps: the solve
    stops with `MaxStepsError`, naming the σ it reached, after this many steps (None: no limit). norm: the error
    norm of torchdiffeq's controllers, a callable on the scaled error (default: the largest per-sample RMS, so one
    hard sample is not averaged away). Per backend:

    - torchdiffeq (dopri5, …): rtol, atol, norm; max_steps counts attempted steps (rejected ones included).
    - scipy_dop853: rtol, atol (divided by sqrt(n) for a group of n numbers solved jointly, so each sample keeps
      its bound); max_steps counts accepted steps (scipy does not expose rejected ones); its norm is scipy's RMS,
      so `norm` is refused.
    - probflow's adaptive methods (adaptive_exp): rtol, atol, max_steps (attempted steps); their norm is their
      own per-sample maximum (docs/MATH.md (A2)), so `norm` is refused.
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int | None = MAX_STEPS
    norm: Norm | None = None

    def __post_init__(self) -> None:
        def ok(v: Any) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0 and math.isfinite(v)

        if not (ok(self.rtol) and ok(self.atol)):
            raise ValueError(f"rtol, atol: expected finite positive tolerances, got {self.rtol!r}, {self.atol!r}")
        m = self.max_steps
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_steps: expected a positive integer or None, got {m!r}")
        if self.norm is not None and not callable(self.norm):
            raise TypeError(f"norm: expected a callable on the scaled error or None, got {type(self.norm).__name__}")


class SolveOptions(TypedDict, total=False):
    """The keywords `integrate` takes besides the model, state, grid and method; `probflow.flows` passes them
    through unchanged (`**solve`), so they are written once, here and in `integrate`."""

    control: Control
    rtol: float
    atol: float
    max_steps: int | None
    trajectory: bool
    state: Any
    options: dict | None
    variable: str
    progress: bool | Progress | None


_UNSET: Any = object()  # a keyword not passed (so that it cannot silently disagree with `control`)


def _control(control: Control | None, rtol: Any, atol: Any, max_steps: Any) -> Control:
    """The step-size control of a solve: `control`, or one made from the rtol/atol/max_steps keywords."""
    given = {k: v for k, v in (("rtol", rtol), ("atol", atol), ("max_steps", max_steps)) if v is not _UNSET}
    if control is None:
        return Control(**given)
    if not isinstance(control, Control):
        raise TypeError(f"control: expected a probflow.integrate.Control, got {type(control).__name__}")
    if given:
        raise ValueError(f"control: pass {', '.join(given)} in `control` or as keywords, not both")
    return control


def check_state(x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch of shape (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def integrate(model: EpsModel | DDIMField, xbar: Tensor, sigmas: Tensor, method: str | Method = "euler", *,
              control: Control | None = None, rtol: float = _UNSET, atol: float = _UNSET,
              max_steps: int | None = _UNSET, trajectory: bool = False, state: Any = None,
              options: dict | None = None, variable: str = "log_sigma",
              progress: bool | Progress | None = None, differentiable: bool = False) -> Solution:
    """Integrate dx̄/dσ = ε(x̄/sqrt(1+σ²), σ) (Eq. 12) along `sigmas`, in x̄, with `method`.

    The parts of a solve, each typed and checked once here:

    - the solver: `method`, a registered name (`probflow.solvers.method_names()`) or a `Method` object (e.g. a
      stochastic step built with its own noise source, which should not live in the global registry); `sigmas`,
      a strictly monotone grid, decreasing to generate, increasing to encode, in a direction the method declares.
      Fixed-grid methods step exactly on it; adaptive ones report at its points. `state`: a probflow method's
      state to start from (e.g. the final state of an encode, to decode exactly). `options`: backend settings
      (torchdiffeq's solver options such as `first_step`; for scipy_dop853, `group`, the samples solved jointly;
      for torchdiffeq's adaptive methods, `sigma_floor` (default `SIGMA_FLOOR`, see `variable`); probflow's
      adaptive methods take theirs, `probflow.adaptive`). `variable`: the time variable of torchdiffeq's adaptive
      methods, "log_sigma" (default: u = log σ down to σ_floor, then σ on [σ_floor, 0], `_odeint_split`) or
      "sigma" (σ throughout; its controller is badly scaled on σ_max … 0 and stops early at loose tolerances).
    - step-size control (adaptive methods): `control`, a `Control` (rtol, atol, max_steps, norm, documented per
      backend there), or the keywords rtol, atol (default 1e-5) and max_steps (default `MAX_STEPS`), not both.
    - what to save: the state at the last σ always; with `trajectory`, the state at every grid point.
    - progress (adaptive solves): True draws a line on stderr, a callable gets (σ, nfe) after every accepted step.
    - `differentiable`: probflow's own step methods record autograd through the solve (the model's backward
      pass; for fitting solver coefficients held as tensors in `state`, `probflow.coefficients`); by default
      nothing is recorded.
    """
    field = as_field(model)
    m: Method = method if isinstance(method, Method) else get_method(method)
    ctl = _control(control, rtol, atol, max_steps)
    if m.caution and max(ctl.rtol, ctl.atol) > m.caution_above:
        warnings.warn(f"method {m.name!r}: {m.caution}", MethodCaution, stacklevel=2)
    xbar = check_state(xbar, "x")
    sigmas = check_grid(sigmas).to(dtype=xbar.dtype, device=xbar.device)
    if m.adaptive:  # finite, within [floor, 1] for the state's dtype and the model (probflow.field.check_tolerances)
        check_tolerances(ctl.rtol, ctl.atol, xbar.dtype, field)
    _check_method(m, sigmas, state, ctl)
    if variable not in ("log_sigma", "sigma"):
        raise ValueError(f"variable: expected 'log_sigma' or 'sigma', got {variable!r}")
    if differentiable and (m.backend != "probflow" or m.adaptive):
        raise ValueError(f"differentiable: applies to probflow's fixed-grid step methods, not {m.name} ({m.backend})")
    options = {**m.default_options, **(options or {})}
    nfe0 = field.nfe
    monitor = _Monitor(m.name, field, sigmas, ctl.max_steps, progress) if m.adaptive else None
    try:
        x_end, traj, state = _run(m, field, xbar, sigmas, ctl, options, variable, monitor, state, trajectory,
                                  differentiable)
    finally:
        if monitor is not None:
            monitor.close()
    if not torch.isfinite(x_end).all():
        raise FloatingPointError(f"integrate: the {m.name} solve produced NaN or Inf (model or step size unstable)")
    return Solution(x_end, field.nfe - nfe0, sigmas, traj, state, m.name)


def _check_method(m: Method, sigmas: Tensor, state: Any, ctl: Control) -> None:
    """What the method declares against the grid, the state and the control (docs/MATH.md §14)."""
    if m.uniform_steps:
        d = sigmas.diff()
        if ((d - d.mean()).abs() > 1e-6 * d.abs().mean()).any():
            raise ValueError(f"sigmas: method {m.name!r} assumes equal steps in σ; got a non-uniform grid "
                             "(use e.g. torch.linspace, or a method without this restriction)")
    up = bool(sigmas[-1] > sigmas[0])
    if ("up" if up else "down") not in m.directions:
        raise ValueError(f"sigmas: method {m.name!r} integrates {' and '.join(sorted(m.directions))}wards only (its "
                         f"declared directions); got an {'increasing' if up else 'decreasing'} grid")
    if state is not None and m.backend != "probflow":
        raise ValueError(f"state: {m.name} ({m.backend}) keeps no solver state; state applies to probflow's own "
                         "step methods")
    if ctl.norm is not None and m.adaptive and m.backend != "torchdiffeq":
        raise ValueError(f"control: {m.name} uses its own error norm (see probflow.integrate.Control); norm applies "
                         "to torchdiffeq's adaptive methods")


def _run(m: Method, field: DDIMField, xbar: Tensor, sigmas: Tensor, ctl: Control, options: dict, variable: str,
         monitor: _Monitor | None, state: Any, keep: bool,
         differentiable: bool = False) -> tuple[Tensor, Tensor | None, Any]:
    """The solve on the method's backend: (x at the last σ, the trajectory if `keep`, the final state)."""
    if m.backend == "torchdiffeq":
        floor = float(options.pop("sigma_floor", SIGMA_FLOOR))
        if m.adaptive and not floor > 0:
            raise ValueError(f"options['sigma_floor']: expected a positive σ, got {floor}")
        if m.adaptive and ctl.norm is not None:
            options = {"norm": ctl.norm, **options}
        with torch.no_grad():
            if m.adaptive and variable == "log_sigma":
                traj = _odeint_split(field, xbar, sigmas, m.name, ctl.rtol, ctl.atol, options, floor, monitor)
            else:
                traj = _odeint(field, xbar, sigmas, m.name, ctl.rtol, ctl.atol, options, monitor, log=False)
        return traj[-1], (traj if keep else None), None
    if m.backend == "scipy":
        traj = _solve_scipy(field, xbar, sigmas, ctl.rtol, ctl.atol, monitor, **options)
        return traj[-1], (traj if keep else None), None
    if m.adaptive and state is None:  # probflow's adaptive methods start from their settings (Method.start)
        state = (m.start(ctl.rtol, ctl.atol, monitor, options) if m.start is not None
                 else {"rtol": ctl.rtol, "atol": ctl.atol, "monitor": monitor, **options})
    return _step_loop(m, field, xbar, sigmas, state, keep, differentiable)


class MaxStepsError(RuntimeError):
    """An adaptive solve that took `max_steps` steps before reaching the end; `sigma` is where it stopped.
    A bound the user set, so bad input to the command line and over torchrun's ranks (`user_error`)."""

    user_error = True

    def __init__(self, message: str, sigma: float) -> None:
        super().__init__(message)
        self.sigma = sigma


class _Monitor:
    """Counts the attempted steps of an adaptive solve (`step(σ)`, raising MaxStepsError past max_steps) and
    reports accepted ones (`accept(σ)`) to a progress callback or a line on stderr."""

    def __init__(self, name: str, field: DDIMField, sigmas: Tensor, max_steps: int | None, progress) -> None:
        self.name, self.field, self.max_steps, self.steps = name, field, max_steps, 0
        self.start, self.end = float(sigmas[0]), float(sigmas[-1])
        self.nfe0 = field.nfe
        self.callback = progress if callable(progress) else (self._draw if progress else None)
        self._drawn = False

    def step(self, sigma: float) -> None:
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            raise MaxStepsError(f"max_steps: the {self.name} solve took {self.max_steps} steps and stopped at "
                                f"σ = {sigma:.6g} on its way from {self.start:.6g} to {self.end:.6g}; raise "
                                "max_steps or loosen rtol/atol", sigma)

    def accept(self, sigma: float) -> None:
        if self.callback is not None:
            self.callback(float(sigma), self.field.nfe - self.nfe0)

    def _draw(self, sigma: float, nfe: int) -> None:
        """A progress bar in log σ (σ = 0 counts as the end), rewritten in place on stderr."""
        import sys

        tiny = min([v for v in (self.start, self.end) if v > 0] + [SIGMA_FLOOR])
        a, b, c = (math.log(max(v, tiny)) for v in (self.start, self.end, sigma))
        frac = min(max((a - c) / (a - b), 0.0), 1.0) if a != b else 1.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{self.name} [{bar:<30}] σ = {sigma:.3e}  NFE {nfe}")
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            import sys

            sys.stderr.write("\n")
            self._drawn = False


class _TimeVariable:
    """Eq. 12 in u = log σ (log=True): dx̄/du = σ ε(x̄/sqrt(1+σ²), σ), σ = e^u; or in σ itself (log=False).
    Carries torchdiffeq's step callbacks to the monitor (max_steps, progress)."""

    def __init__(self, field: DDIMField, log: bool, monitor: _Monitor | None, t_end: float = 0.0,
                 sign: float = -1.0) -> None:
        self.field, self.log, self.monitor = field, log, monitor
        self.t_end, self.sign = t_end, sign  # the last time of this solve and the sign of its direction

    def __call__(self, t: Tensor, xbar: Tensor) -> Tensor:
        if not self.log:
            return self.field(t, xbar)
        sigma = torch.exp(t)
        return sigma * self.field(sigma, xbar)

    def _sigma(self, t: Tensor) -> float:
        return math.exp(float(t)) if self.log else float(t)

    def callback_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        if self.monitor is not None:
            self.monitor.step(self._sigma(t0))

    def callback_accept_step(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        if self.monitor is not None:
            t1 = float(t0) + self.sign * float(dt)  # torchdiffeq's dt is > 0 either way; its last step may overshoot
            t1 = max(t1, self.t_end) if self.sign < 0 else min(t1, self.t_end)
            self.monitor.accept(self._sigma(torch.tensor(t1)))


def _sample_max_rms(t: Tensor) -> Tensor:
    """torchdiffeq's error norm for a batch (B, ...): the largest per-sample RMS, so one hard sample's error is
    not averaged away by the easy ones (its default RMS over the whole batch let max errors reach 14× the
    tolerance on a 32-sample D = 64 mixture)."""
    if t.ndim < 2:
        return t.pow(2).mean().sqrt()
    return t.reshape(t.shape[0], -1).pow(2).mean(1).sqrt().max()


def _odeint(field: DDIMField, xbar: Tensor, sigmas: Tensor, name: str, rtol: float, atol: float, options: dict,
            monitor: _Monitor | None, log: bool) -> Tensor:
    """torchdiffeq.odeint of Eq. 12 in σ, or in u = log σ (log=True, all σ > 0), reported at `sigmas`."""
    import torchdiffeq

    t = torch.log(sigmas) if log else sigmas
    sign = 1.0 if float(t[-1]) > float(t[0]) else -1.0
    func = _TimeVariable(field, log, monitor, float(t[-1]), sign) if (log or monitor is not None) else field
    if log:  # steps of at most one e-fold of σ: beyond it the embedded estimate is not yet asymptotic
        options = {"max_step": LOG_MAX_STEP, **options}
    if monitor is not None:  # adaptive: every sample keeps its own bound
        options = {"norm": _sample_max_rms, **options}
    return torchdiffeq.odeint(func, xbar, t, method=name, rtol=rtol, atol=atol, options=options)


def _odeint_split(field: DDIMField, xbar: Tensor, sigmas: Tensor, name: str, rtol: float, atol: float,
                  options: dict, floor: float, monitor: _Monitor | None) -> Tensor:
    """An adaptive torchdiffeq solve in u = log σ where σ > floor and in σ on [0, floor], joined at σ = floor.

    Why: for σ above the data's scale ε changes on a scale ∝ σ, so steps uniform in error are uniform in log σ,
    and the σ-controller (σ_max … 0 in one variable) is badly served. log σ cannot reach 0 (u = −∞), but on
    [0, floor] Eq. 12 in ε-form is regular (no 1/σ) and the interval is short, so the same method and
    tolerances in σ finish it; the embedded error estimate is a valid local error estimate in either
    variable, so the global error bound of the solve is the usual one (sum of controlled local errors), with
    no unestimated last step. The state x̄ is continuous at the junction; only the variable changes.
    """
    big = sigmas > floor
    if bool(big.all()):
        return _odeint(field, xbar, sigmas, name, rtol, atol, options, monitor, log=True)
    if not bool(big.any()):
        return _odeint(field, xbar, sigmas, name, rtol, atol, options, monitor, log=False)
    f = sigmas.new_tensor([floor])
    hi, lo = sigmas[big], sigmas[~big]
    decreasing = bool(sigmas[0] > sigmas[-1])
    # decreasing: [hi …, floor] in log σ, then [floor, lo …] in σ; increasing: the mirror image
    lo_has_floor = bool(lo[0 if decreasing else -1] == floor)
    lo_pts = lo if lo_has_floor else (torch.cat([f, lo]) if decreasing else torch.cat([lo, f]))
    hi_pts = torch.cat([hi, f]) if decreasing else torch.cat([f, hi])
    if decreasing:
        a = _odeint(field, xbar, hi_pts, name, rtol, atol, options, monitor, log=True)
        b = _odeint(field, a[-1], lo_pts, name, rtol, atol, options, monitor, log=False)
        return torch.cat([a[:-1], b if lo_has_floor else b[1:]])
    b = _odeint(field, xbar, lo_pts, name, rtol, atol, options, monitor, log=False)
    a = _odeint(field, b[-1], hi_pts, name, rtol, atol, options, monitor, log=True)
    return torch.cat([b if lo_has_floor else b[:-1], a[1:]])


def _step_loop(m: Method, field: DDIMField, x: Tensor, sigmas: Tensor, state: Any, keep: bool,
               differentiable: bool = False):
    """The loop of probflow's own methods: one `step` per grid interval (no autograd unless `differentiable`)."""
    traj = [x] if keep else None
    step = m.step
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for i in range(len(sigmas) - 1):
            x, state = step(field, x, sigmas[i], sigmas[i + 1], state)
            if keep:
                traj.append(x)
    return x, (torch.stack(traj) if keep else None), state


def _solve_scipy(field: DDIMField, xbar: Tensor, sigmas: Tensor, rtol: float, atol: float,
                 monitor: _Monitor | None = None, group: int = 1) -> Tensor:
    """DOP853 (scipy.integrate) in float64, `group` samples at a time (default one).

    scipy's error norm is an RMS over the whole state, so a jointly solved group of n numbers could average
    one hard sample's error away; with group > 1 the tolerances are divided by sqrt(n), which bounds every
    component's local error as a solve of that sample alone would.
    """
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"options['group']: expected a positive number of samples, got {group!r}")
    s = sigmas.detach().cpu().double().numpy()
    x64 = xbar.detach().cpu().double()
    shape = x64.shape[1:]
    out = torch.empty((len(s), *x64.shape), dtype=torch.float64)
    n = group * int(np.prod(shape))
    rtol, atol = rtol / math.sqrt(n), atol / math.sqrt(n)
    rtol = max(rtol, 100 * np.finfo(float).eps)  # DOP853's own floor; below it scipy would warn and clamp

    def f(sig: float, y: np.ndarray) -> np.ndarray:
        e = field(torch.tensor(sig, dtype=torch.float64), torch.from_numpy(y).view(-1, *shape))
        return e.detach().reshape(-1).double().numpy()

    with torch.no_grad():
        for b in range(0, x64.shape[0], group):
            xb = x64[b:b + group]
            if monitor is not None:  # max_steps bounds each independent solve
                monitor.steps = 0
            try:
                ys = _dop853(f, s, xb.reshape(-1).numpy(), rtol, atol, monitor)
            except FloatingPointError as e:
                raise FloatingPointError(f"scipy_dop853: samples {b}… failed: {e}") from None
            out[:, b:b + group] = torch.from_numpy(ys).view(len(s), *xb.shape)
    return out.to(dtype=xbar.dtype, device=xbar.device)


def _dop853(f: Callable, s: np.ndarray, y0: np.ndarray, rtol: float, atol: float,
            monitor: _Monitor | None) -> np.ndarray:
    """`scipy.integrate.solve_ivp(f, (s[0], s[-1]), y0, "DOP853", t_eval=s)`'s loop, step by step, so that the
    monitor counts its steps (max_steps) and reports them (progress); values at `s` from each step's dense output,
    as solve_ivp computes them. Returns (len(s), len(y0))."""
    from scipy.integrate import DOP853

    solver = DOP853(f, float(s[0]), y0, float(s[-1]), rtol=rtol, atol=atol)
    sign = 1.0 if s[-1] > s[0] else -1.0
    ys, k = [], 0
    while k < len(s):
        if monitor is not None:
            monitor.step(float(solver.t))
        if solver.status != "running":
            raise FloatingPointError(f"the solver stopped at σ = {solver.t:.6g} ({solver.status})")
        message = solver.step()
        if solver.status == "failed":
            raise FloatingPointError(message)
        end = k
        while end < len(s) and sign * (s[end] - solver.t) <= 0:  # the points this step reached (its end included)
            end += 1
        if end > k:
            ys.append(solver.dense_output()(s[k:end]).T)
            k = end
        if monitor is not None:
            monitor.accept(float(solver.t))
    return np.concatenate(ys)


def scale_in(x: Tensor, sigma: Tensor | float) -> Tensor:
    """x → x̄ = x·sqrt(1 + σ²) (docs/MATH.md §1)."""
    return x * math.sqrt(1.0 + float(sigma) ** 2)


def scale_out(xbar: Tensor, sigma: Tensor | float) -> Tensor:
    """x̄ → x = x̄ / sqrt(1 + σ²)."""
    return xbar / math.sqrt(1.0 + float(sigma) ** 2)
