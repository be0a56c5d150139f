"""An adaptive exponential integrator of Eq. 12 in λ = −log σ that reaches σ = 0: `adaptive_exp`.

Variables as in `probflow.exponential`: state x̄, denoiser D = x̄ − σ ε, and over a step h = λ_next − λ

    x̄_next = e^{−h} x̄ + ∫_0^h e^{−(h−u)} D(λ + u) du                                          (E1)

with D replaced by a polynomial through known values, integrated exactly (`exp_weights`, (E2)).

The embedded pair (one model call per accepted step). From x̄_n with the history D_n, D_{n−1}, … at the
accepted λ's (variable spacing):

    predictor   x̃ = (E1) with the polynomial through the last p history values          (order p)
    evaluate    D̃ = D(x̃, σ_next)                                                          (1 NFE)
    corrector   x̂ = (E1) with the polynomial through the same values and D̃              (order p + 1)

the exponential analogue of an Adams PEC pair (and of UniPC's predictor–corrector). x̂ − x̃ = O(h^{p+1}) is
the local error estimate of the predictor; the step is accepted when its weighted norm

    err = max over samples of RMS( (x̂ − x̃) / (atol + rtol·max(|x̄_n|, |x̂|)) )  ≤ 1

(a max over samples, so one hard sample in a batch is not averaged away), and the solution continues from
x̂ (local extrapolation) with D̃ kept in the history. A rejected step costs one NFE. Step sizes follow a PI
controller (Gustafsson; Hairer & Wanner II §IV.2): h_new = h·0.9·err^{−0.7/k}·err_prev^{0.4/k}, k = p + 1,
the ratio clamped to [0.2, 5] and h ≤ 3; after a rejection h·max(0.2, 0.9·err^{−1/k}). The first step has one history
value (p = 1 predictor, p = 2 corrector); p grows to `order` as the history fills.

Reaching σ = 0 (λ = +∞). (E1) has the limit x̄(0) = D(x̄(0), 0); x̄ and D are smooth in s = σ² along the
solution (probflow.exponential, (E3)), so x̄(0) ≈ Σ_j ℓ_j(0) D_j, the Lagrange extrapolation in s through the
last history values. Once σ_n ≤ `finish_below` (default 0.1: a tenth of the scale of normalised data; a jump
from σ ≈ 1 can miss its tolerance by far, benchmarks/DESIGN.md) and D has
entered its smooth-in-σ² regime (per sample, |ΔD|/Δλ decays by at least e^{−h} over the last two steps; it
decays like e^{−2h} once σ is below the data's scale, while above it D still moves towards D(0), so an
extrapolation from there would be blind to the structure still ahead), every accepted point tries this jump
with 3 nodes against 2 nodes as its error estimate (the 2-node error is ≈ |∂²D/∂s²|·s_n·s_{n−1}, the 3-node
one smaller by a further factor ≈ s_{n−2}·|∂³D/∂s³|/|∂²D/∂s²|), with the same norm; if err ≤ 0.1 (an
extrapolation's estimate, so with a safety factor of 10) the 3-node value is returned (no model call at
σ = 0), else the method keeps stepping in λ, where Π s_j shrinks geometrically, so the jump is accepted
after finitely many steps.

Settings come as the first state, which integrate makes by `start_state` (the method's `start`) from the step-size
control, its monitor and the options; options:
`order` (predictor order p, 1…4, default 3: a 3(4) pair), `first_step` (λ, default 0.1), `finish_below`
(σ, default 0.1). Order 4 (a 4(5) pair) needs fewer model calls at tight tolerances and ends further below its
tolerance; 3 stays the default because it keeps closer to the tolerance asked for and was no cheaper at the errors
of DPM-Solver's adaptive recipe (the measurements: benchmarks/DESIGN.md and benchmarks/HELDOUT.md). The
mathematics: docs/MATH.md §10.
Generation only (decreasing grids, σ_max > 0); the grid's interior points are landed on exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from probflow.exponential import exp_weights, zero_weights
from probflow.field import DDIMField
from probflow.method import Method

__all__ = ["AdaptiveState", "adaptive_step", "start_state", "error_norm", "DECLARED"]

_SAFETY, _ALPHA, _BETA, _MIN_RATIO, _MAX_RATIO = 0.9, 0.7, 0.4, 0.2, 5.0
# The jump to σ = 0 is an extrapolation: accepted at a tenth of the tolerance (accepting at 1 jumped too early
# and missed the tolerance on tuning problems; benchmarks/DESIGN.md).
_JUMP_SAFETY = 0.1
_MAX_H = 3.0  # at most a factor e³ ≈ 20 in σ per step: a flat stretch of D must not launch λ towards +∞


@dataclass
class AdaptiveState:
    """The controller's explicit state: tolerances, the proposed next λ step, the accepted history
    (σ_j, D_j), most recent last, the previous error (for the PI controller) and counters."""

    rtol: float
    atol: float
    order: int = 3
    h: float = 0.1
    finish_below: float = 0.1
    monitor: Any = None
    sigmas: list[float] = field(default_factory=list)
    denoised: list[Tensor] = field(default_factory=list)
    err_prev: float = 1.0
    accepted: int = 0
    rejected: int = 0

    def push(self, sigma: float, d: Tensor) -> None:
        keep = max(self.order + 1, 3)  # the jump to σ = 0 needs 3 nodes
        self.sigmas = [*self.sigmas, sigma][-keep:]
        self.denoised = [*self.denoised, d][-keep:]


def _make_state(settings: dict) -> AdaptiveState:
    known = {"rtol", "atol", "monitor", "order", "first_step", "finish_below"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"options: adaptive_exp takes {sorted(known - {'rtol', 'atol', 'monitor'})}, "
                         f"got unknown {sorted(unknown)}")
    order = settings.get("order", 3)
    if order not in (1, 2, 3, 4):
        raise ValueError(f"options['order']: expected a predictor order 1, 2, 3 or 4, got {order!r}")
    h = float(settings.get("first_step", 0.1))
    fb = float(settings.get("finish_below", 0.1))
    if not (h > 0 and fb > 0):
        raise ValueError(f"options: first_step and finish_below must be positive, got {h}, {fb}")
    return AdaptiveState(float(settings["rtol"]), float(settings["atol"]), order, h, fb, settings.get("monitor"))


def start_state(rtol: float, atol: float, monitor: Any, options: dict) -> AdaptiveState:
    """The first state of a solve (`Method.start`): the tolerances, integrate's monitor and the options, checked."""
    return _make_state({**options, "rtol": rtol, "atol": atol, "monitor": monitor})


def error_norm(diff: Tensor, x0: Tensor, x1: Tensor, rtol: float, atol: float, sigma: float = 0.0) -> float:
    """max over samples of RMS over the sample of diff / (atol·sqrt(1+σ²) + rtol·max(|x0|, |x1|)): the
    tolerance of the model's variable x = x̄/sqrt(1+σ²) at the step's end σ."""
    scale = atol * math.sqrt(1.0 + sigma * sigma) + rtol * torch.maximum(x0.abs(), x1.abs())
    r = (diff / scale).reshape(diff.shape[0], -1)
    return float(r.pow(2).mean(1).sqrt().max())


def _denoise(field: DDIMField, xbar: Tensor, sigma: float) -> Tensor:
    """D = x̄ − σ ε(x̄/sqrt(1+σ²), σ) (one NFE)."""
    s = torch.tensor(sigma, dtype=xbar.dtype, device=xbar.device)
    return xbar - sigma * field(s, xbar)


def _exp_step(xbar: Tensor, sigma: float, sigma_next: float, sigmas: list[float], ds: list[Tensor]) -> Tensor:
    """(E1)–(E2) from σ to σ_next with D interpolated at `sigmas` (in λ = −log σ) and integrated exactly."""
    decay, w = exp_weights(-math.log(sigma), -math.log(sigma_next), [-math.log(s) for s in sigmas])
    out = xbar * decay
    for wj, dj in zip(w, ds, strict=True):
        out.add_(dj, alpha=wj)
    return out


def _past_transition(st: AdaptiveState) -> bool:
    """Whether D is in its smooth-in-σ² regime: per sample, the slope |ΔD|/Δλ of the last interval is at most
    e^{−h} times that of the one before (+ atol). Along a solution D − D(0) ∝ σ² for σ below the data's
    scale (slope decaying like e^{−2h}), while above it D approaches D(0) from afar (slope growing or flat)."""
    lam = [-math.log(x) for x in st.sigmas[-3:]]
    d = st.denoised[-3:]
    g1 = (d[1] - d[0]).reshape(len(d[0]), -1).pow(2).mean(1).sqrt() / (lam[1] - lam[0])
    g2 = (d[2] - d[1]).reshape(len(d[0]), -1).pow(2).mean(1).sqrt() / (lam[2] - lam[1])
    return bool((g2 <= g1 * math.exp(-(lam[2] - lam[1])) + st.atol).all())


def _try_finish(st: AdaptiveState, xbar: Tensor) -> Tensor | None:
    """The jump to σ = 0 by extrapolation in s = σ² ((E3)): 3 nodes, checked against 2; None if err > 1 or
    D is not yet in its smooth-in-σ² regime (`_past_transition`)."""
    if len(st.sigmas) < 3 or st.sigmas[-1] > st.finish_below or not _past_transition(st):
        return None
    hi = sum(w * d for w, d in zip(zero_weights(st.sigmas[-3:]), st.denoised[-3:], strict=True))
    lo = sum(w * d for w, d in zip(zero_weights(st.sigmas[-2:]), st.denoised[-2:], strict=True))
    return hi if error_norm(hi - lo, xbar, hi, st.rtol, st.atol) <= _JUMP_SAFETY else None


def _propose(st: AdaptiveState, h: float, err: float, k: int, accepted: bool) -> float:
    """PI step-size controller on the error of an order-(k−1) predictor (local error O(h^k))."""
    err = max(err, 1e-10)
    if accepted:
        ratio = _SAFETY * err ** (-_ALPHA / k) * max(st.err_prev, 1e-10) ** (_BETA / k)
        st.err_prev = err
    else:
        ratio = _SAFETY * err ** (-1.0 / k)
    return min(_MAX_H, h * min(_MAX_RATIO, max(_MIN_RATIO, ratio)))


def _advance(field: DDIMField, xbar: Tensor, sigma: float, target: float, st: AdaptiveState) -> tuple[Tensor, float]:
    """One attempted-and-accepted step from σ towards `target` (> 0 or 0); returns (x̄, σ) reached."""
    while True:
        h, sn = st.h, sigma * math.exp(-st.h)
        if target > 0 and 1.25 * h >= math.log(sigma / target):  # land on the grid point, no sliver steps
            h, sn = math.log(sigma / target), target
        if st.monitor is not None:
            st.monitor.step(sigma)
        p = min(st.order, len(st.sigmas))
        pred = _exp_step(xbar, sigma, sn, st.sigmas[-p:], st.denoised[-p:])
        d_new = _denoise(field, pred, sn)
        corr = _exp_step(xbar, sigma, sn, [*st.sigmas[-p:], sn], [*st.denoised[-p:], d_new])
        err = error_norm(corr - pred, xbar, corr, st.rtol, st.atol, sn)
        ok = err <= 1.0 and bool(torch.isfinite(corr).all())
        proposal = _propose(st, h, err if math.isfinite(err) else 1e10, p + 1, ok)
        if ok:
            if not (target > 0 and sn == target and h < st.h):  # a landing step keeps the longer proposal
                st.h = proposal
            st.push(sn, d_new)
            st.accepted += 1
            if st.monitor is not None:
                st.monitor.accept(sn)
            return corr, sn
        st.h = proposal
        st.rejected += 1


def adaptive_step(field: DDIMField, xbar: Tensor, sigma: Tensor, sigma_next: Tensor, state: Any):
    """From grid point σ to σ_next (< σ; 0 allowed) through as many controlled steps as the tolerance needs.
    `state`: the settings dict on the first call (from `integrate`), then an `AdaptiveState`."""
    s, target = float(sigma), float(sigma_next)
    if not (s > target >= 0.0):
        raise ValueError(f"sigmas: adaptive_exp integrates downwards from σ > 0 (generation); got {s} → {target}")
    st = state if isinstance(state, AdaptiveState) else _make_state(dict(state or {}))
    if not st.sigmas or st.sigmas[-1] != s:  # first call (or a state from elsewhere): D at the start
        st.sigmas, st.denoised = [], []
        st.push(s, _denoise(field, xbar, s))
    while True:
        if target == 0.0:
            done = _try_finish(st, xbar)
            if done is not None:
                if st.monitor is not None:
                    st.monitor.accept(0.0)
                return done, st
        xbar, s = _advance(field, xbar, s, target, st)
        if target > 0 and s == target:
            return xbar, st


# Declared here, registered by `probflow.solvers` (the one place that builds the registry).
DECLARED = (
    Method("adaptive_exp", 4, adaptive=True, step=adaptive_step, start=start_state, directions=frozenset({"down"}),
           augmented=False,
           description="adaptive exponential predictor–corrector in λ (order 3(4), 1 NFE per step, "
                       "PI controller), closed jump to σ = 0 by extrapolation in σ²"),
)
