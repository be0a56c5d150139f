"""Uniformly dequantised bits/dim of quantised images under an ε-model, through `likelihood`.

Convention. A pixel at level k ∈ {0 … L−1} (L = `levels`, 256 for 8-bit) is x_k = lo + k·Δ in the model's
range, Δ = (hi − lo)/(L − 1) (how probflow.files.images reads 8-bit files: x = v/127.5 − 1). Its dequantised value
is y = k + u, u ~ U[0, 1), a point of [0, L) with unit bins, placed in the model's range by the affine map
x = lo + (y − ½)·Δ (each bin centred on its level). With D pixels,

    bpd = −log2 p_Y(y)/D = −log p_x(x)/(D ln 2) − log2 Δ                                          (B1)

(p_Y(y) = p_x(x)·Δ^D); −log2 Δ = log2 127.5 ≈ 6.994 for 8-bit data in [−1, 1]. E_u[bpd] ≥ −log2 P(k)/D, the
bits/dim of the model's discretised probability of the image (Jensen), which is why dequantised bits/dim are
never negative for a normalised model. This is the literature's "uniformly dequantised bits/dim" (Theis et al.
2016; Ho et al. 2020; Song et al. 2021 use the bin map x = 2y/256 − 1, i.e. Δ = 2/256 and 7 bits, whose bins are
not centred on the levels a model trained on v/127.5 − 1 has seen; the number is comparable, both being
−log2 p_Y(y)/D for unit bins on [0, L)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel
from probflow.integrate import check_state
from probflow.likelihood.api import likelihood
from probflow.likelihood.core import DEQUANT_STREAM, Likelihood, stream
from probflow.solvers import Method

__all__ = ["BitsPerDim", "bits_per_dim", "dequantise", "levels_of"]


def levels_of(x: Tensor, levels: int, data_range: tuple[float, float]) -> Tensor:
    """The integer level k of every pixel of x = lo + k·Δ, Δ = (hi − lo)/(levels − 1); refuses other data."""
    lo, hi = float(data_range[0]), float(data_range[1])
    if isinstance(levels, bool) or not (isinstance(levels, int) and levels >= 2):
        raise ValueError(f"levels: expected an integer >= 2 (256 for 8-bit images), got {levels!r}")
    if levels > 2**16:
        raise ValueError(f"levels: {levels} is above the bound 65536 (16-bit data)")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range: expected (lo, hi) with lo < hi, got {data_range!r}")
    k = (x.double() - lo) * ((levels - 1) / (hi - lo))
    kr = torch.round(k)
    tol = 1e-3 if x.dtype != torch.float64 else 1e-6
    bad = ((k - kr).abs() > tol) | (kr < 0) | (kr > levels - 1)
    if bad.any():
        v = x.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]].item()
        raise ValueError(f"x: bits/dim needs {levels}-level data lo + k·(hi − lo)/{levels - 1} in {data_range} "
                         f"(e.g. 8-bit images converted by probflow.files.images); found the value {v!r}")
    return kr


def dequantise(x: Tensor, draws: int = 1, levels: int = 256, data_range: tuple[float, float] = (-1.0, 1.0),
               seed: int = 0, first_index: int = 0) -> Tensor:
    """(draws, B, *S): x_k + (u − ½)·Δ, u ~ U[0, 1) per pixel, Δ = (hi − lo)/(levels − 1), sample i's draws from
    its own stream (seed, first_index + i): uniform over the bin of width Δ centred on each level."""
    if isinstance(draws, bool) or not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws: expected a positive integer, got {draws!r}")
    if draws > 4096:
        raise ValueError(f"draws: {draws} is above the bound 4096 (each draw is a whole likelihood solve)")
    k = levels_of(check_state(x, "x"), levels, data_range)
    lo, hi = float(data_range[0]), float(data_range[1])
    delta = (hi - lo) / (levels - 1)
    u = torch.empty((x.shape[0], draws, *x.shape[1:]), dtype=torch.float64)
    for i in range(x.shape[0]):
        u[i] = torch.rand((draws, *x.shape[1:]), generator=stream(seed, first_index + i, DEQUANT_STREAM),
                          dtype=torch.float64)
    out = lo + (k.cpu().unsqueeze(0) + u.transpose(0, 1) - 0.5) * delta
    return out.to(dtype=x.dtype, device=x.device)


@dataclass
class BitsPerDim:
    """Result of `bits_per_dim`. bpd: (B,) per image, averaged over the dequantisation draws; bpd_draws:
    (draws, B); bpd_stderr: (B,) the standard error of each image's bpd from the divergence estimator
    (Hutchinson; 0 for the exact divergence, NaN with one probe; the solver's discretisation error is not in
    it); mean: over images; stderr: the standard error of the mean over B images as a sample of the data (each
    its draws' average, so dequantisation and Hutchinson noise are in it; NaN for one image);
    estimator_stderr: the standard error of `mean` as an estimate of these B images' own average,
    sqrt(Σ bpd_stderr²)/B; offset: the constant −log2 Δ added per dimension; x_dequantised: (draws, B, *S);
    likelihood: the `Likelihood` of the B·draws dequantised images, image-major (row i·draws + r is draw r of
    image i)."""

    bpd: Tensor
    bpd_draws: Tensor
    mean: float
    stderr: float
    offset: float
    x_dequantised: Tensor
    likelihood: Likelihood
    bpd_stderr: Tensor | None = None
    estimator_stderr: float = float("nan")


def bits_per_dim(
    model: EpsModel | DDIMField,
    x: Tensor,
    sigmas: Tensor | float,
    method: str | Method = "dopri5",
    *,
    levels: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
    draws: int = 1,
    seed: int = 0,
    first_index: int = 0,
    **kwargs,
) -> BitsPerDim:
    """Uniformly dequantised bits/dim (B1) of quantised images x (B, *S) under the model, by `likelihood`.

    levels: the data's grey levels (256 for 8-bit; the digits model's data have 17). draws: dequantisation
    draws per image (sample i's from the stream (seed, first_index + i)); Hutchinson probes of draw r of image i
    from (seed, (first_index + i)·draws + r). kwargs go to `likelihood` (rtol, atol, divergence,
    probes_per_sample, probe_kind, fresh_probes, prior, chunk, options, budget_seconds, progress).
    """
    xq = dequantise(x, draws, levels, data_range, seed, first_index)  # (R, B, *S)
    b, d = x.shape[0], int(np.prod(x.shape[1:]))
    stacked = xq.transpose(0, 1).reshape(b * draws, *x.shape[1:])  # image-major: row (i, r) = i·draws + r
    kwargs.setdefault("seed", seed)
    kwargs.setdefault("first_index", first_index * draws)
    res = likelihood(model, stacked, sigmas, method, **kwargs)
    delta = (float(data_range[1]) - float(data_range[0])) / (levels - 1)
    offset = -math.log2(delta)
    per = (-res.log_prob / (d * math.log(2)) + offset).reshape(b, draws).T
    bpd = per.mean(0)
    se_draws = (res.stderr / (d * math.log(2))).reshape(b, draws)
    bpd_se = se_draws.pow(2).sum(1).sqrt() / draws
    se = float(bpd.std() / math.sqrt(b)) if b > 1 else float("nan")
    est_se = float(bpd_se.pow(2).sum().sqrt() / b)
    return BitsPerDim(bpd, per, float(bpd.mean()), se, offset, xq, res, bpd_se, est_se)
