"""The cost of a likelihood request before it runs, its budget and its progress.

Evaluations of the augmented field per solve: counted exactly for fixed-grid methods by a dry run of the
method on a one-number state (what `integrate` will count), not known in advance for adaptive ones.
Seconds per evaluation come from a pilot on the request's own batch: one forward pass of the model with
gradients and one reverse pass, timed; an evaluation then costs forward + P × reverse (Hutchinson, P probes
sharing the forward) or ⌈D/chunk⌉ forward and reverse passes over `chunk` copies of the batch (exact; a pass
over the copies is timed itself when the pilot predicts it under 2 s, else extrapolated linearly from the
pilot's rows, which overestimates where batching pays). The pooled standard error's sign channels (`SE_CHANNELS`
numbers per sample in the state, a few arithmetic operations per call) cost no model call and no VJP.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field
from probflow.integrate import check_state, integrate
from probflow.likelihood.core import (
    check_grid_for,
    check_method,
    check_shape,
    choose_divergence,
    probe_count,
)
from probflow.solvers import Method

__all__ = ["Cost", "BudgetError", "estimate", "evaluations", "pilot_seconds", "Watch", "check_budget"]


class BudgetError(ValueError):
    """A request estimated (or found while running) to take longer than its budget."""


@dataclass
class Cost:
    """The estimated cost of a request: `samples` samples in batches of `batch`; per solve (one batch)
    `evaluations` of the augmented field (None: adaptive, not known in advance), each `seconds_per_evaluation`
    (pilot) with `vjps_per_evaluation` VJPs per sample; `seconds` for the whole request (None if adaptive)."""

    samples: int
    batch: int
    dim: int
    divergence: str
    probes: int
    method: str
    evaluations: int | None
    vjps_per_evaluation: int
    seconds_per_evaluation: float

    @property
    def solves(self) -> int:
        return math.ceil(self.samples / self.batch)

    @property
    def seconds(self) -> float | None:
        return None if self.evaluations is None else self.solves * self.evaluations * self.seconds_per_evaluation

    def describe(self) -> str:
        """One line: what the request will cost."""
        per = (f"{self.evaluations} model calls and {self.evaluations * self.vjps_per_evaluation} VJPs per sample"
               if self.evaluations is not None else
               f"an adaptive number of model calls ({self.vjps_per_evaluation} VJPs each)")
        tot = (f"≈ {_fmt(self.seconds)} in all" if self.seconds is not None else "total not known in advance")
        return (f"{self.samples} sample(s) × {per}, {self.divergence} divergence (D = {self.dim}"
                + (f", {self.probes} probe(s) per call" if self.divergence == "hutchinson" else "")
                + f"), {self.method}; {self.seconds_per_evaluation:.3g} s per call on a batch of {self.batch} "
                  f"(pilot); {tot}")


def _fmt(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def evaluations(m: Method, grid: Tensor) -> int | None:
    """Augmented-field evaluations of one solve on `grid`: None for adaptive methods. Fixed-grid methods make
    the same calls whatever the field, so a dry run on a one-number state with ε = 0 counts them exactly
    (including what a method does at the ends of an upward grid)."""
    if m.adaptive:
        return None
    dry = DDIMField(lambda x, s: torch.zeros_like(x))
    grid = grid.detach().to("cpu", torch.float64)
    return integrate(dry, torch.zeros(1, 1, dtype=torch.float64), grid, m).nfe


def _timed_pass(field: DDIMField, x: Tensor, sigma: Tensor) -> tuple[float, float]:
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        f = field(sigma, xg)
        t1 = time.perf_counter()
        if f.requires_grad:
            torch.autograd.grad(f, xg, torch.ones_like(f), allow_unused=True)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def pilot_seconds(field: DDIMField, x: Tensor, kind: str, probes: int, chunk: int) -> float:
    """Seconds of one augmented evaluation on the batch x (B, *S) from a timed forward and reverse pass after a
    warm-up call on one sample (the better of two when one is short)."""
    quiet = DDIMField(field.model, field.model_dtype)  # the pilot's calls are not the solve's NFE
    sigma = torch.tensor(1.0, dtype=x.dtype, device=x.device)
    _timed_pass(quiet, x[:1], sigma)  # warm-up: a first call's set-up is not its cost
    fwd, bwd = _timed_pass(quiet, x, sigma)
    if fwd + bwd < 1.0:
        f2, b2 = _timed_pass(quiet, x, sigma)
        fwd, bwd = min(fwd, f2), min(bwd, b2)
    if kind == "hutchinson":
        return fwd + probes * bwd
    d = int(np.prod(x.shape[1:]))
    k = min(chunk, d)
    per_pass = k * (fwd + bwd)
    if per_pass < 2.0:  # cheap enough to time a real pass over k copies
        rows = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        per_pass = sum(_timed_pass(quiet, rows, sigma))
    return math.ceil(d / k) * per_pass


def estimate(model: EpsModel | DDIMField, x0: Tensor, sigmas: Tensor | float, method: str | Method = "dopri5", *,
             divergence: str = "auto", probes_per_sample: int | None = None, chunk: int = 64,
             batch: int | None = None) -> Cost:
    """The cost of `likelihood(model, x0, sigmas, method, ...)` run in batches of `batch` (default: all of x0 at
    once), from a pilot on the first batch (a few model calls)."""
    field = as_field(model)
    x0 = check_state(x0, "x0")
    m = check_method(method)
    grid = check_grid_for(sigmas, m, x0)
    shape = tuple(x0.shape[1:])
    check_shape(field.model, shape)
    d = int(np.prod(shape))
    kind = choose_divergence(divergence, d)
    p = probe_count(probes_per_sample, kind)
    batch = len(x0) if batch is None else batch
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch: expected a positive integer, got {batch!r}")
    secs = pilot_seconds(field, x0[:batch], kind, p, max(1, int(chunk)))
    return Cost(len(x0), min(batch, len(x0)), d, kind, p, m.name, evaluations(m, grid),
                d if kind == "exact" else p, secs)


def check_budget(budget_seconds: float | None) -> None:
    if budget_seconds is None:
        return
    if isinstance(budget_seconds, bool) or not isinstance(budget_seconds, (int, float)) or \
            not (budget_seconds > 0):
        raise ValueError(f"budget_seconds: expected a positive number of seconds or None, got {budget_seconds!r}")


class Watch:
    """Called after every evaluation of the augmented field: advances a progress bar (`progress` True: a tqdm bar
    with ETA on stderr; a callable: progress(done, total)) and, for a solve whose length is not known in advance,
    stops it with BudgetError once its wall time passes `budget` seconds."""

    def __init__(self, total: int | None, budget: float | None, progress: bool | Callable | None,
                 desc: str = "likelihood") -> None:
        self.total, self.budget, self.done, self.start = total, budget, 0, time.perf_counter()
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="call", file=sys.stderr, leave=False)

    def __call__(self, _aug=None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(self.done, self.total)
        spent = time.perf_counter() - self.start
        if self.budget is not None and spent > self.budget:
            raise BudgetError(f"budget_seconds: the solve passed its budget of {self.budget:g} s after "
                              f"{self.done} model calls ({spent:.0f} s); raise the budget or use a fixed grid")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
