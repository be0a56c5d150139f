"""Log-likelihood through the ODE (MATH.md §8): Eq. 12 integrated from σ = 0 up to σ_max together with the
divergence of its field, by the one integrate path; and bits/dim of quantised images.

Instantaneous change of variables. Along a solution x̄(σ) of dx̄/dσ = f(σ, x̄) = ε(x̄/sqrt(1+σ²), σ),
d log p_σ(x̄(σ))/dσ = −∇·f, so with ℓ(σ) = ∫_0^σ ∇·f(s, x̄(s)) ds

    log p_0(x_0) = log p_{σmax}(x̄(σmax)) + ℓ(σmax),        x̄(0) = x_0                      (L1)

in nats, for x_0 in the model's variable x (x̄ = x at σ = 0). The pair y = (x̄, ℓ) solves one ODE, the
*augmented* field g(σ, y) = (f, ∇·f) of `AugmentedField`, which `integrate` runs like any field: the state is a
flat tensor (B, D + P) (x̄ flattened to D numbers, then P divergence accumulators), so torchdiffeq's methods,
the scipy reference and probflow's Runge–Kutta-type step functions carry it unchanged.

Divergence. "exact": ∇·f = Σ_i ∂f_i/∂x̄_i by D vector–Jacobian products with the unit vectors, `chunk` of them
at a time as one forward and one reverse pass over `chunk` copies of the batch (no vmap, so any autograd model
works), so one evaluation of g costs D VJPs: ≈ D times the model's forward-plus-backward cost on the batch.
"hutchinson": ∇·f ≈ vᵀ(∂f/∂x̄)v with E[vvᵀ] = I (Rademacher ±1 or standard normal v), one VJP per probe; the P
probes of a sample are fixed along the solve and drawn from a stream seeded by (seed, sample index), so a sample's
estimate does not depend on the batch it is in. Each probe has its own accumulator; the estimate is their mean and
its standard error is their standard deviation / sqrt(P) (NaN for P = 1: one probe carries no estimate of its own
spread). Batched VJPs assume the model treats the samples of a batch independently (no batch statistics).

Prior. "normal": p_{σmax} ≈ N(0, (1 + σmax²) I) in x̄ (N(0, I) for the latent x_T), exact for data of zero mean
and unit covariance and off by O(1/σmax²) otherwise; "exact": `model.log_prob(x̄, σmax)` for analytic models
(`GaussianMixture`: Σ_k w_k N(μ_k, Σ_k + σmax² I)), which isolates the solver's error; or a callable
prior(x̄_T (B, D), σmax) -> (B,).

Methods. Every registered method carries the augmented state (tests/test_likelihood.py measures each one
converging to the exact density): torchdiffeq's fixed-grid and adaptive methods and `scipy_dop853` see a plain
tensor; probflow's step functions only form linear combinations of states and field values, so they act on ℓ
componentwise — the exponential integrators' denoiser D = y − σ g becomes ℓ − σ ∇·f for the accumulator (smooth
in λ, and equal to ℓ at σ = 0, which their extrapolation to σ = 0 needs), and `reversible_heun`'s fixed point
holds ℓ (|ℓ| < 2**18 nats) like x̄. What cannot: the stochastic methods of `probflow.sde` (`UNSUPPORTED_PREFIXES`):
(L1) holds along the deterministic flow only, their noise would enter ℓ, and they step down in σ only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field
from probflow.grids import check_grid
from probflow.integrate import check_state, integrate
from probflow.solvers import Method, get_method

__all__ = ["AugmentedField", "Likelihood", "BitsPerDim", "likelihood", "bits_per_dim", "probes",
           "dequantise", "per_sample_norm", "UNSUPPORTED_PREFIXES"]

# method-name prefix: why that method cannot integrate the augmented state.
UNSUPPORTED_PREFIXES: dict[str, str] = {
    "ddim_eta=": "stochastic DDIM is not the ODE flow; (L1) needs the deterministic Eq. 12 (and it steps down only)",
    "reverse_sde_gamma=": "the reverse SDE is not the ODE flow; (L1) needs the deterministic Eq. 12 (and it steps "
                          "down only)",
    "adaptive_exp": "it integrates downwards only (generation; its σ = 0 landing has no upward twin); the likelihood "
                    "integrates from σ = 0 up — use dopri5 or a fixed-grid method",
}

_PROBE_STREAM, _DEQUANT_STREAM = 1, 2  # stream tags: probes and dequantisation noise never share a stream


def _stream(seed: int, i: int, tag: int) -> torch.Generator:
    """The generator of sample i (and stream `tag`), as `probflow.flows.noise` seeds its latents."""
    s = int(np.random.SeedSequence([seed, i, tag]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(s)


def probes(n: int, count: int, dim: int, kind: str = "rademacher", seed: int = 0, first: int = 0,
           dtype: torch.dtype = torch.float64) -> Tensor:
    """Hutchinson probes (count, n, dim): sample `first + i` gets `count` vectors from its own stream
    (seed, first + i), Rademacher (±1) or standard normal, so they do not depend on the batch."""
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe_kind: expected 'rademacher' or 'gaussian', got {kind!r}")
    out = torch.empty((n, count, dim), dtype=torch.float64)
    for i in range(n):
        g = _stream(seed, first + i, _PROBE_STREAM)
        if kind == "gaussian":
            out[i] = torch.randn(count, dim, generator=g, dtype=torch.float64)
        else:
            out[i] = torch.randint(0, 2, (count, dim), generator=g).to(torch.float64) * 2 - 1
    return out.transpose(0, 1).to(dtype)


class AugmentedField(DDIMField):
    """g(σ, y) = (f(σ, x̄), ∇·f(σ, x̄)) for y = [x̄ flattened, ℓ_1 … ℓ_P] of shape (B, D + P) (MATH.md §8).

    A `DDIMField` (so `integrate` takes it as it is and counts its evaluations in `Solution.nfe`): `nfe` counts
    evaluations of g (one model forward each), `vjps` the vector–Jacobian products (each a reverse pass over
    the batch). `hutchinson` is None for the exact divergence (P = 1) or the fixed probes (P, B, D). The
    accumulators hold ℓ/scale (see `per_sample_norm`).
    """

    def __init__(self, field: DDIMField, shape: tuple[int, ...], hutchinson: Tensor | None = None,
                 chunk: int = 64, scale: float = 1.0) -> None:
        super().__init__(field.model, field.model_dtype)
        self.inner, self.shape, self.hutchinson, self.scale = field, tuple(shape), hutchinson, float(scale)
        self.dim = int(np.prod(self.shape))
        self.chunk = max(1, int(chunk))
        self.vjps = 0

    @property
    def accumulators(self) -> int:
        return 1 if self.hutchinson is None else self.hutchinson.shape[0]

    def __call__(self, sigma: Tensor | float, y: Tensor) -> Tensor:
        self.nfe += 1
        b, d = y.shape[0], self.dim
        if y.shape[1:] != (d + self.accumulators,):
            raise ValueError(f"y: expected the augmented state (B, {d + self.accumulators}), got {tuple(y.shape)}")
        xbar = y[:, :d].detach().reshape(b, *self.shape)
        with torch.enable_grad():
            if self.hutchinson is None:
                f, div = self._exact(sigma, xbar)
            else:
                xg = xbar.requires_grad_(True)
                f = self.inner(sigma, xg)
                div = self._hutchinson(f, xg)
        return torch.cat([f.detach().reshape(b, d), div.to(y.dtype) / self.scale], dim=1)

    def _exact(self, sigma: Tensor | float, xbar: Tensor) -> tuple[Tensor, Tensor]:
        """f and Σ_i ∂f_i/∂x̄_i: the batch is copied k = `chunk` times, copy j's output is pulled back along the
        unit vector e_{lo+j} (one reverse pass for the k·B rows: k VJPs per sample) and the diagonal entries
        kept; ⌈D/chunk⌉ forward and reverse passes in all. Returns f (B, *S) and the divergence (B, 1)."""
        b, d = xbar.shape[0], self.dim
        total, f = torch.zeros(b, dtype=xbar.dtype, device=xbar.device), None
        for lo in range(0, d, self.chunk):
            k = min(self.chunk, d - lo)
            idx = torch.arange(lo, lo + k, device=xbar.device)
            xr = xbar.unsqueeze(0).expand(k, *xbar.shape).reshape(k * b, *self.shape).clone().requires_grad_(True)
            fr = self.inner(sigma, xr)
            basis = torch.zeros(k, b, d, dtype=fr.dtype, device=fr.device)
            basis[torch.arange(k), :, idx] = 1
            (g,) = torch.autograd.grad(fr, xr, basis.reshape(fr.shape))
            total = total + g.reshape(k, b, d)[torch.arange(k), :, idx].sum(0).to(total.dtype)
            f = fr.detach()[:b] if f is None else f
            self.vjps += k
        return f, total.unsqueeze(1)

    def _hutchinson(self, f: Tensor, xbar: Tensor) -> Tensor:
        """vᵀ(∂f/∂x̄)v for each fixed probe v: one VJP per probe. (B, P)."""
        v = self.hutchinson.to(dtype=f.dtype, device=f.device)
        p, b = v.shape[:2]
        (g,) = torch.autograd.grad(f, xbar, v.reshape(p, b, *self.shape), is_grads_batched=p > 1) \
            if p > 1 else torch.autograd.grad(f, xbar, v[0].reshape(b, *self.shape))
        self.vjps += p
        return (g.reshape(p, b, -1) * v).sum(-1).T


def per_sample_norm(dim: int) -> Callable[[Tensor], Tensor]:
    """The error norm of adaptive torchdiffeq solves of y = (x̄, ℓ/D): the largest over samples of the RMS of
    x̄'s scaled error and of D × each accumulator's scaled error.

    torchdiffeq hands the norm e = error/(atol + rtol·|y|). An accumulator u = ℓ/D thus contributes
    D·e_u = error_ℓ/(atol + rtol·|ℓ|/D): each sample's log-density is held to the absolute tolerance atol plus
    rtol times its per-dimension size |ℓ|/D. (ℓ itself grows like D·log σmax while log p does not, so a plain
    rtol·|ℓ| would let the error grow with D; and an RMS over D + 1 numbers would dilute it by sqrt(D + 1).)"""

    def norm(e: Tensor) -> Tensor:
        return torch.maximum(e[:, :dim].pow(2).mean(1).sqrt().max(), dim * e[:, dim:].abs().max())

    return norm


@dataclass
class Likelihood:
    """Result of `likelihood`, per sample (B,) in nats, log p_0(x_0) = prior + divergence (L1).

    latent: x_T = x̄(σmax)/sqrt(1 + σmax²) (B, *S). prior: log p_{σmax}(x̄_T) in x̄. divergence: ℓ(σmax), the
    mean over probes for Hutchinson; divergence_probes: (B, P) per-probe integrals; stderr: the Hutchinson
    standard error of `divergence` (0 for exact, NaN with one probe). nfe: evaluations of the augmented field
    (one model forward each); vjps: vector–Jacobian products (each one batched reverse pass).
    """

    log_prob: Tensor
    latent: Tensor
    prior: Tensor
    divergence: Tensor
    divergence_probes: Tensor
    stderr: Tensor
    nfe: int
    vjps: int
    sigma_max: float
    method: str


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


def _grid(sigmas: Tensor | float, m: Method, like: Tensor) -> Tensor:
    """The increasing grid 0 … σmax: given, or [0, σmax] for adaptive methods."""
    if isinstance(sigmas, Tensor) and sigmas.ndim == 1:
        g = check_grid(sigmas)
    else:
        s = float(sigmas)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"sigmas: expected σmax > 0 or an increasing grid from 0, got {sigmas!r}")
        if not m.adaptive:
            raise ValueError(f"sigmas: the fixed-grid method {m.name!r} needs a grid; pass an increasing tensor "
                             "0 … σmax (e.g. probflow.grids.karras(σmax, σmin, n).flip(0))")
        g = torch.tensor([0.0, s], dtype=torch.float64)
    if g[0] != 0 or g[-1] <= g[0]:
        raise ValueError(f"sigmas: expected an increasing grid from σ = 0 to σmax, got {g[0].item()} … "
                         f"{g[-1].item()}")
    return g.to(dtype=like.dtype, device=like.device)


def _check_shape(model, shape: tuple[int, ...]) -> None:
    """x0's sample shape against the model's (`sample_shape` of image models, `dim` of analytic ones)."""
    want = getattr(model, "sample_shape", None)
    if want is not None and tuple(want) != shape:
        raise ValueError(f"x0: expected samples of the model's shape {tuple(want)}, got {shape}")
    dim = getattr(model, "dim", None)
    if want is None and isinstance(dim, int) and int(np.prod(shape)) != dim:
        raise ValueError(f"x0: expected samples of {dim} numbers (the model's dimension), got shape {shape}")


def _method(method: str | Method) -> Method:
    m = method if isinstance(method, Method) else get_method(method)
    for prefix, why in UNSUPPORTED_PREFIXES.items():
        if m.name.startswith(prefix):
            raise ValueError(f"method: {m.name!r} cannot give a likelihood: {why}")
    return m


def likelihood(
    model: EpsModel | DDIMField,
    x0: Tensor,
    sigmas: Tensor | float,
    method: str | Method = "dopri5",
    *,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    divergence: str = "exact",
    probes_per_sample: int = 1,
    probe_kind: str = "rademacher",
    seed: int = 0,
    first_index: int = 0,
    prior: str | Callable = "normal",
    chunk: int = 64,
    options: dict | None = None,
) -> Likelihood:
    """log p_0(x_0) in nats per sample by (L1): the augmented Eq. 12 integrated σ = 0 → σmax by `integrate`.

    x0: (B, *S) in the model's variable x. sigmas: σmax (adaptive methods) or an increasing grid 0 … σmax.
    divergence: "exact" (D VJPs per evaluation) or "hutchinson" (`probes_per_sample` VJPs per evaluation,
    `probe_kind` "rademacher" or "gaussian", probes of sample i from (seed, first_index + i)). prior: "normal",
    "exact" or a callable (module docstring). rtol/atol: adaptive methods, applied to the whole augmented
    state. chunk: unit vectors per batched VJP (memory ∝ chunk·B·D).
    """
    field = as_field(model)
    x0 = check_state(x0, "x0")
    m = _method(method)
    grid = _grid(sigmas, m, x0)
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence: expected 'exact' or 'hutchinson', got {divergence!r}")
    if not (isinstance(probes_per_sample, int) and probes_per_sample >= 1):
        raise ValueError(f"probes_per_sample: expected a positive integer, got {probes_per_sample!r}")
    b, shape = x0.shape[0], tuple(x0.shape[1:])
    _check_shape(field.model, shape)
    d = int(np.prod(shape))
    v = None
    if divergence == "hutchinson":
        v = probes(b, probes_per_sample, d, probe_kind, seed, first_index, x0.dtype).to(x0.device)
    per_sample = m.adaptive and m.backend == "torchdiffeq"
    aug = AugmentedField(field, shape, v, chunk, scale=d if per_sample else 1.0)
    y0 = torch.cat([x0.reshape(b, d), x0.new_zeros(b, aug.accumulators)], dim=1)
    if per_sample:
        options = {"norm": per_sample_norm(d), **(options or {})}
    sol = integrate(aug, y0, grid, m, rtol=rtol, atol=atol, options=options)
    sigma_max = float(grid[-1])
    xbar_t, ells = sol.x[:, :d], sol.x[:, d:] * aug.scale
    lp_prior = _prior(prior, field.model, xbar_t, sigma_max)
    div = ells.mean(1)
    if v is None:
        se = torch.zeros_like(div)
    elif ells.shape[1] > 1:
        se = ells.std(1) / math.sqrt(ells.shape[1])
    else:
        se = torch.full_like(div, float("nan"))
    latent = (xbar_t / math.sqrt(1.0 + sigma_max**2)).reshape(b, *shape)
    return Likelihood(lp_prior + div, latent, lp_prior, div, ells, se, sol.nfe, aug.vjps, sigma_max, m.name)


def _levels(x: Tensor, levels: int, data_range: tuple[float, float]) -> Tensor:
    """The integer level k of every pixel of x = lo + k·Δ, Δ = (hi − lo)/(levels − 1); refuses other data."""
    lo, hi = float(data_range[0]), float(data_range[1])
    if not (isinstance(levels, int) and levels >= 2):
        raise ValueError(f"levels: expected an integer >= 2 (256 for 8-bit images), got {levels!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range: expected (lo, hi) with lo < hi, got {data_range!r}")
    k = (x.double() - lo) * ((levels - 1) / (hi - lo))
    kr = torch.round(k)
    tol = 1e-3 if x.dtype != torch.float64 else 1e-6
    if (kr < 0).any() or (kr > levels - 1).any() or ((k - kr).abs() > tol).any():
        bad = ((k - kr).abs() > tol) | (kr < 0) | (kr > levels - 1)
        v = x.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]].item()
        raise ValueError(f"x: bits/dim needs {levels}-level data lo + k·(hi − lo)/{levels - 1} in {data_range} "
                         f"(e.g. 8-bit images converted by probflow.io.images); found the value {v!r}")
    return kr


def dequantise(x: Tensor, draws: int = 1, levels: int = 256, data_range: tuple[float, float] = (-1.0, 1.0),
               seed: int = 0, first_index: int = 0) -> Tensor:
    """(draws, B, *S): x_k + (u − ½)·Δ, u ~ U[0, 1) per pixel, Δ = (hi − lo)/(levels − 1), sample i's draws from
    its own stream (seed, first_index + i): uniform over the bin of width Δ centred on each level."""
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f"draws: expected a positive integer, got {draws!r}")
    k = _levels(check_state(x, "x"), levels, data_range)
    lo, hi = float(data_range[0]), float(data_range[1])
    delta = (hi - lo) / (levels - 1)
    u = torch.empty((x.shape[0], draws, *x.shape[1:]), dtype=torch.float64)
    for i in range(x.shape[0]):
        u[i] = torch.rand((draws, *x.shape[1:]), generator=_stream(seed, first_index + i, _DEQUANT_STREAM),
                          dtype=torch.float64)
    out = lo + (k.cpu().unsqueeze(0) + u.transpose(0, 1) - 0.5) * delta
    return out.to(dtype=x.dtype, device=x.device)


@dataclass
class BitsPerDim:
    """Result of `bits_per_dim`. bpd: (B,) per image, averaged over the dequantisation draws; bpd_draws:
    (draws, B); mean and stderr: over images (the SE of the mean over B images, each its draws' average, so
    dequantisation and Hutchinson noise are in it; NaN for one image); offset: the constant −log2 Δ added per
    dimension; x_dequantised: (draws, B, *S); likelihood: the `Likelihood` of the B·draws dequantised images,
    image-major (row i·draws + r is draw r of image i)."""

    bpd: Tensor
    bpd_draws: Tensor
    mean: float
    stderr: float
    offset: float
    x_dequantised: Tensor
    likelihood: Likelihood


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
    """Uniformly dequantised bits/dim of quantised images x (B, *S) under the model, by `likelihood`.

    Convention. A pixel at level k ∈ {0 … L−1} (L = `levels`, 256 for 8-bit) is x_k = lo + k·Δ in the model's
    range, Δ = (hi − lo)/(L − 1) (how probflow.io.images reads 8-bit files: x = v/127.5 − 1). Its
    dequantised value is y = k + u, u ~ U[0, 1), a point of [0, L) with unit bins, placed in the model's range
    by the affine map x = lo + (y − ½)·Δ (each bin centred on its level). With D pixels,

        bpd = −log2 p_Y(y)/D = −log p_x(x)/(D ln 2) − log2 Δ                                          (B1)

    (p_Y(y) = p_x(x)·Δ^D); −log2 Δ = log2 127.5 ≈ 6.994 for 8-bit data in [−1, 1]. E_u[bpd] ≥ −log2 P(k)/D, the
    bits/dim of the model's discretised probability of the image (Jensen), which is why dequantised bits/dim are
    never negative for a normalised model. This is the literature's "uniformly dequantised bits/dim" (Theis et
    al. 2016; Ho et al. 2020; Song et al. 2021 use the bin map x = 2y/256 − 1, i.e. Δ = 2/256 and 7 bits, whose
    bins are not centred on the levels a model trained on v/127.5 − 1 has seen; the number is comparable, both
    being −log2 p_Y(y)/D for unit bins on [0, L)).

    draws: dequantisation draws per image (sample i's from the stream (seed, first_index + i)); Hutchinson probes
    (if `divergence="hutchinson"` in kwargs) of draw r of image i from (seed, (first_index + i)·draws + r). kwargs go
    to `likelihood` (rtol, atol, divergence, probes_per_sample, probe_kind, prior, chunk, options).
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
    se = float(bpd.std() / math.sqrt(b)) if b > 1 else float("nan")
    return BitsPerDim(bpd, per, float(bpd.mean()), se, offset, xq, res)
