"""`likelihood`: log p_0(x_0) by (L1) of docs/MATH.md §8, the augmented Eq. 12 integrated σ = 0 → σ_max by
`integrate`, with its cost checked against a budget and its progress shown.

Prior. "normal": p_{σmax} ≈ N(0, (1 + σmax²) I) in x̄ (N(0, I) for the latent x_T), exact for data of zero mean
and unit covariance and off by O(1/σmax²) otherwise; "exact": `model.log_prob(x̄, σmax)` for analytic models
(`GaussianMixture`: Σ_k w_k N(μ_k, Σ_k + σmax² I)), which isolates the solver's error; or a callable
prior(x̄_T (B, D), σmax) -> (B,).

Methods. Every method with `Method.augmented` and "up" in `Method.directions` carries the augmented state
(tests/test_likelihood.py measures each one converging to the exact density): torchdiffeq's methods and
`scipy_dop853` see a plain tensor; probflow's step functions only form linear combinations of states and field
values, so they act on ℓ componentwise (the exponential integrators' denoiser D = y − σ g becomes ℓ − σ ∇·f for
the accumulator). The stochastic methods of `probflow.sde` and `adaptive_exp` (downwards only) are refused.

Step-size control. Adaptive torchdiffeq solves use `per_sample_norm` with the exact divergence (ℓ is smooth and
held to the tolerance) and `path_norm` with Hutchinson's (x̄ only: the probes' noise must not drive the step
size). `scipy_dop853` puts ℓ in its norm, so it takes fixed probes only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field
from probflow.integrate import check_state, integrate
from probflow.likelihood.core import (
    AugmentedField,
    Likelihood,
    ProbeStream,
    check_grid_for,
    check_method,
    check_shape,
    choose_divergence,
    path_norm,
    per_sample_norm,
    probe_count,
)
from probflow.likelihood.cost import BudgetError, Watch, check_budget, estimate, evaluations
from probflow.solvers import Method

__all__ = ["likelihood", "BudgetError"]


def _prior(prior: str | Callable, model, xbar: Tensor, sigma_max: float) -> Tensor:
    d = xbar.shape[1]
    if callable(prior):
        out = prior(xbar, sigma_max)
    elif prior == "normal":
        var = 1.0 + sigma_max**2
        out = -0.5 * (xbar * xbar).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)
    elif prior == "exact":
        if not callable(getattr(model, "log_prob", None)):
            raise ValueError(f"prior: 'exact' needs an analytic model with log_prob(x̄, σ); "
                             f"{type(model).__name__} has none")
        out = model.log_prob(xbar, sigma_max)
    else:
        raise ValueError(f"prior: expected 'normal', 'exact' or a callable, got {prior!r}")
    out = torch.as_tensor(out)
    if out.shape != (xbar.shape[0],):
        raise ValueError(f"prior: expected per-sample log-densities of shape ({xbar.shape[0]},), got "
                         f"{tuple(out.shape)}")
    return out.to(xbar.dtype)


def _fresh(fresh_probes: bool | None, m: Method, kind: str) -> bool:
    """Fresh probes at every evaluation by default, except where the x̄ path could depend on them (scipy's norm)."""
    if kind == "exact":
        return False
    if fresh_probes is None:
        return m.backend != "scipy"
    if fresh_probes and m.backend == "scipy":
        raise ValueError("fresh_probes: scipy_dop853's error norm includes the accumulators, so its path would depend "
                         "on fresh probes; use fresh_probes=False or another method")
    return bool(fresh_probes)


def _stderr(kind: str, ells: Tensor, signs: Tensor) -> Tensor:
    """The standard error of the mean of the P accumulators ells (B, P): 0 for the exact divergence; with the
    K sign channels of fresh probes (B, K) the pooled one, sqrt(mean_k u_k²) (`probflow.likelihood.core`);
    otherwise std_j ℓ_j/sqrt(P) (fixed probes), NaN for one probe."""
    if kind == "exact":
        return torch.zeros_like(ells[:, 0])
    if signs.shape[1] > 0:
        return signs.pow(2).mean(1).sqrt()
    if ells.shape[1] > 1:
        return ells.std(1) / math.sqrt(ells.shape[1])
    return torch.full_like(ells[:, 0], float("nan"))


def likelihood(
    model: EpsModel | DDIMField,
    x0: Tensor,
    sigmas: Tensor | float,
    method: str | Method = "dopri5",
    *,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    divergence: str = "auto",
    probes_per_sample: int | None = None,
    probe_kind: str = "rademacher",
    fresh_probes: bool | None = None,
    seed: int = 0,
    first_index: int = 0,
    prior: str | Callable = "normal",
    chunk: int = 64,
    options: dict | None = None,
    budget_seconds: float | None = None,
    progress: bool | Callable[[int, int | None], None] | None = None,
) -> Likelihood:
    """log p_0(x_0) in nats per sample by (L1): the augmented Eq. 12 integrated σ = 0 → σmax by `integrate`.

    x0: (B, *S) in the model's variable x. sigmas: σmax (adaptive methods) or an increasing grid 0 … σmax.
    divergence: "auto" (exact up to `EXACT_MAX_DIM` dimensions, Hutchinson above), "exact" (D VJPs per
    evaluation) or "hutchinson" (`probes_per_sample` VJPs per evaluation sharing one model call, default
    `DEFAULT_PROBES`; `probe_kind` "rademacher" or "gaussian"; probes of sample i from (seed, first_index + i);
    `fresh_probes`: redrawn at every evaluation, default True except for scipy_dop853; the standard error
    `Likelihood.stderr` is then pooled over the solve's calls, C·(P − 1) degrees of freedom, else it has P − 1).
    prior: "normal", "exact" or a callable (module docstring). rtol/atol: adaptive methods. chunk: unit vectors
    per batched VJP of the exact divergence (memory ∝ chunk·B·D). budget_seconds: refuse (`BudgetError`, a
    ValueError) a fixed-grid request whose pilot estimate (`probflow.likelihood.estimate`) is over it, and stop an
    adaptive one when its wall time passes it. progress: True for a progress bar with ETA on stderr, or a callable
    (done, total).
    """
    field = as_field(model)
    x0 = check_state(x0, "x0")
    m = check_method(method)
    grid = check_grid_for(sigmas, m, x0)
    b, shape = x0.shape[0], tuple(x0.shape[1:])
    check_shape(field.model, shape)
    d = int(np.prod(shape))
    kind = choose_divergence(divergence, d)
    p = probe_count(probes_per_sample, kind)
    fresh = _fresh(fresh_probes, m, kind)
    check_budget(budget_seconds)
    total = evaluations(m, grid)
    if budget_seconds is not None and total is not None:
        cost = estimate(field, x0, grid, m, divergence=kind, probes_per_sample=p, chunk=chunk)
        if cost.seconds > budget_seconds:
            raise BudgetError(f"budget_seconds: the request is estimated at {cost.seconds:.0f} s, over the budget of "
                              f"{budget_seconds:g} s ({cost.describe()})")
    v = None
    if kind == "hutchinson":
        stream = ProbeStream(b, p, d, probe_kind, seed, first_index, x0.dtype, x0.device)
        v = stream if fresh else stream.draw()
    elif probe_kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe_kind: expected 'rademacher' or 'gaussian', got {probe_kind!r}")
    per_sample = m.adaptive and m.backend == "torchdiffeq"
    watch = Watch(total, budget_seconds if total is None else None, progress)
    aug = AugmentedField(field, shape, v, chunk, scale=d if per_sample else 1.0, callback=watch)
    y0 = torch.cat([x0.reshape(b, d), x0.new_zeros(b, aug.accumulators)], dim=1)
    if per_sample:
        norm = per_sample_norm(d) if kind == "exact" else path_norm(d)
        options = {"norm": norm, **(options or {})}
    t0 = time.perf_counter()
    try:
        sol = integrate(aug, y0, grid, m, rtol=rtol, atol=atol, options=options)
    finally:
        watch.close()
    seconds = time.perf_counter() - t0
    sigma_max = float(grid[-1])
    xbar_t, ells = sol.x[:, :d], sol.x[:, d:d + aug.probes] * aug.scale
    lp_prior = _prior(prior, field.model, xbar_t, sigma_max)
    div = ells.mean(1)
    se = _stderr(kind, ells, sol.x[:, d + aug.probes:] * aug.scale)
    latent = (xbar_t / math.sqrt(1.0 + sigma_max**2)).reshape(b, *shape)
    return Likelihood(lp_prior + div, latent, lp_prior, div, ells, se, sol.nfe, aug.vjps, sigma_max,
                      m.name, kind, fresh, seconds)

