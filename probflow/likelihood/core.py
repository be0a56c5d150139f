"""The augmented field of the likelihood ODE and its divergence estimators (docs/MATH.md §8).

Divergence. "exact": ∇·f = Σ_i ∂f_i/∂x̄_i by D vector–Jacobian products with the unit vectors, `chunk` of them
at a time as one forward and one reverse pass over `chunk` copies of the batch (no vmap, so any autograd model
works): one evaluation of g costs D VJPs. A model whose ε does not depend on x̄ at some σ (a constant ε) has
divergence 0 there; autograd's "unused input" is read as that zero, not raised.

"hutchinson": ∇·f ≈ vᵀ(∂f/∂x̄)v with E[vvᵀ] = I (Rademacher ±1 or standard normal v). The P probes of an
evaluation share its one forward pass: P reverse passes over the same graph (`retain_graph`), so P probes cost
one model call and P VJPs (vmap's batched gradients are not used: diffusers' UNets do not support them). Each
probe index j has its own accumulator ℓ_j; the estimate is their mean. Probes come from a stream seeded by
(seed, sample index), so a sample's estimate does not depend on the batch it is in, and are either

- fixed along the solve (`fresh=False`): each ℓ_j is one probe's integral ∫ vᵀ(∂f/∂x̄)v dσ, P independent
  estimates, so the standard error is their standard deviation / sqrt(P) (P − 1 degrees of freedom; NaN for
  P = 1); the pooled form below does not apply, the calls' estimates being correlated through the shared probes;
- fresh at every evaluation (`fresh=True`): each ℓ_j is the solver's weighted sum Σ_c a_c d_{c,j} of independent
  one-probe estimates d_{c,j} (call c, probe j), which is unbiased for the exact-divergence value of the same
  solve as long as the x̄ path does not depend on ℓ (every method's x̄ update ignores ℓ; adaptive methods must
  leave ℓ out of their error norm, `path_norm`), and its variance Σ_c a_c² σ_c²/P is a sum over evaluations
  (σ_c²: one probe's variance at call c) instead of the square of a sum.

Pooled standard error (fresh probes, P ≥ 2; (L2) of docs/MATH.md §13). s_c², the sample variance of the P probes at call
c, is unbiased for σ_c², so V = Σ_c a_c² s_c²/P is unbiased for the estimate's variance and pools C·(P − 1)
degrees of freedom over the C calls (std_j ℓ_j/sqrt(P) has P − 1). The solver's weights a_c are not known to
the field, so K = `SE_CHANNELS` more accumulators u_k are integrated along, with derivative r_{c,k}·s_c/sqrt(P)
at call c, r_{c,k} independent Rademacher signs from their own stream (seed, sample index): the solver forms
the same linear combination of them, u_k = Σ_c a_c r_{c,k} s_c/sqrt(P), and E_r[u_k²] = Σ_c a_c² s_c²/P (the
cross terms have mean 0), so mean_k u_k² estimates V without bias, to a relative standard deviation below
sqrt(2/K). No model call, no VJP: K numbers per sample in the state, left out of adaptive step control like ℓ.
The pooling adds degrees of freedom only as far as the variance is spread over the calls: about
(P − 1)(Σ_c w_c)²/Σ_c w_c², w_c = a_c²σ_c² (Satterthwaite), which falls to P − 1 when one call carries it all (a
coarse grid whose first step is long and starts near σ = 0, where the divergence is large); benchmarks/LIKELIHOOD.md
measures it per grid. Where it is small, more probes (P) are what makes one sample's standard error reliable.

Batched VJPs assume the model treats the samples of a batch independently (no batch statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.grids import check_grid
from probflow.solvers import Method, get_method

__all__ = ["AugmentedField", "Likelihood", "probes", "ProbeStream", "per_sample_norm", "path_norm",
           "choose_divergence", "check_method", "check_grid_for", "check_shape", "probe_count", "EXACT_MAX_DIM",
           "DEFAULT_PROBES", "SE_CHANNELS"]

# divergence="auto": exact up to this many dimensions, Hutchinson above (benchmarks/LIKELIHOOD.md, "exact or
# Hutchinson": the measured cost ratio of the two at equal standard error).
EXACT_MAX_DIM = 256
# Hutchinson probes per evaluation by default, all sharing one forward pass. With fresh probes a sample's standard
# error pools the calls' spreads (module docstring): reliable where the variance is spread over many calls (the
# default 20-step grid), not on coarse grids where one call carries it (P − 1 = 3 degrees of freedom;
# benchmarks/LIKELIHOOD.md); the standard error of a mean over many samples pools them in any case.
DEFAULT_PROBES = 4
# Sign channels of the pooled standard error (module docstring): its relative error from the signs is below
# sqrt(2/K)/2 ≈ 6% at K = 128, small beside the probes' own (pooled) sampling error, for 128 numbers per sample.
SE_CHANNELS = 128
# stream tags: probes, dequantisation noise and the standard error's signs never share a stream
_PROBE_STREAM, DEQUANT_STREAM, _SIGN_STREAM = 1, 2, 3


def stream(seed: int, i: int, tag: int) -> torch.Generator:
    """The generator of sample i (and stream `tag`), as `probflow.flows.noise` seeds its latents."""
    s = int(np.random.SeedSequence([seed, i, tag]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(s)


def _draw(g: torch.Generator, count: int, dim: int, kind: str) -> Tensor:
    if kind == "gaussian":
        return torch.randn(count, dim, generator=g, dtype=torch.float64)
    return torch.randint(0, 2, (count, dim), generator=g).to(torch.float64) * 2 - 1


def _check_kind(kind: str) -> None:
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe_kind: expected 'rademacher' or 'gaussian', got {kind!r}")


def probes(n: int, count: int, dim: int, kind: str = "rademacher", seed: int = 0, first: int = 0,
           dtype: torch.dtype = torch.float64) -> Tensor:
    """Hutchinson probes (count, n, dim): sample `first + i` gets `count` vectors from its own stream
    (seed, first + i), Rademacher (±1) or standard normal, so they do not depend on the batch."""
    return ProbeStream(n, count, dim, kind, seed, first, dtype).draw()


class ProbeStream:
    """Successive draws of `probes`: draw k gives every sample its k-th block of `count` vectors from its own
    stream (fresh probes at every evaluation, still independent of the batch). `channels`: the sign channels of
    the pooled standard error (module docstring; `SE_CHANNELS`, none with one probe), whose signs `signs` draws
    from each sample's own stream (seed, sample index) of another tag."""

    def __init__(self, n: int, count: int, dim: int, kind: str = "rademacher", seed: int = 0, first: int = 0,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 channels: int = SE_CHANNELS) -> None:
        _check_kind(kind)
        self.count, self.dim, self.kind, self.dtype, self.device = count, dim, kind, dtype, device
        self.channels = int(channels) if count >= 2 else 0
        self.gens = [stream(seed, first + i, _PROBE_STREAM) for i in range(n)]
        self.sign_gens = [stream(seed, first + i, _SIGN_STREAM) for i in range(n)] if self.channels else []

    def draw(self) -> Tensor:
        out = torch.stack([_draw(g, self.count, self.dim, self.kind) for g in self.gens])
        return out.transpose(0, 1).to(dtype=self.dtype, device=self.device)

    def signs(self) -> Tensor:
        """(B, channels) independent ±1, the next draw of each sample's sign stream."""
        out = torch.stack([_draw(g, 1, self.channels, "rademacher")[0] for g in self.sign_gens])
        return out.to(dtype=self.dtype, device=self.device)


class AugmentedField(DDIMField):
    """g(σ, y) = (f(σ, x̄), ∇·f(σ, x̄)) for y = [x̄ flattened, ℓ_1 … ℓ_P, u_1 … u_K] of shape (B, D + P + K)
    (docs/MATH.md §8, §13).

    A `DDIMField` (so `integrate` takes it as it is and counts its evaluations in `Solution.nfe`): `nfe` counts
    evaluations of g (one model call on the batch each for Hutchinson, ⌈D/chunk⌉ over copies for exact), `vjps`
    the vector–Jacobian products per sample. `hutchinson`: None for the exact divergence (P = 1), fixed probes
    (P, B, D), or a `ProbeStream` (fresh probes at every evaluation, with its K sign channels u_k of the pooled
    standard error; K = 0 otherwise). The accumulators hold ℓ/scale and u/scale (see `per_sample_norm`).
    `callback(self)` runs after every evaluation (progress, budget).
    """

    def __init__(self, field: DDIMField, shape: tuple[int, ...], hutchinson: Tensor | ProbeStream | None = None,
                 chunk: int = 64, scale: float = 1.0, callback: Callable | None = None) -> None:
        super().__init__(field.model, field.model_dtype)
        self.inner, self.shape, self.hutchinson, self.scale = field, tuple(shape), hutchinson, float(scale)
        self.dim = int(np.prod(self.shape))
        self.chunk = max(1, int(chunk))
        self.vjps = 0
        self.callback = callback

    @property
    def probes(self) -> int:
        """P: the divergence accumulators ℓ_j (1 for the exact divergence)."""
        h = self.hutchinson
        return 1 if h is None else (h.count if isinstance(h, ProbeStream) else h.shape[0])

    @property
    def channels(self) -> int:
        """K: the sign channels of the pooled standard error (fresh probes only)."""
        return self.hutchinson.channels if isinstance(self.hutchinson, ProbeStream) else 0

    @property
    def accumulators(self) -> int:
        """P + K: the numbers per sample after x̄ in the state."""
        return self.probes + self.channels

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
                v = self.hutchinson.draw() if isinstance(self.hutchinson, ProbeStream) else self.hutchinson
                xg = xbar.requires_grad_(True)
                f = self.inner(sigma, xg)
                div = self._hutchinson(f, xg, v)
                if self.channels:
                    div = torch.cat([div, self._sign_channels(div)], dim=1)
        out = torch.cat([f.detach().reshape(b, d), div.to(y.dtype) / self.scale], dim=1)
        if self.callback is not None:
            self.callback(self)
        return out

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
            g = _vjp(fr, xr, basis.reshape(fr.shape), retain=False)
            total = total + g.reshape(k, b, d)[torch.arange(k), :, idx].sum(0).to(total.dtype)
            f = fr.detach()[:b] if f is None else f
            self.vjps += k
        return f, total.unsqueeze(1)

    def _sign_channels(self, div: Tensor) -> Tensor:
        """r_{c,k}·s_c/sqrt(P) (B, K): s_c² the sample variance of this call's P probe estimates div (B, P)."""
        spread = (div.detach().var(1, correction=1) / div.shape[1]).sqrt()
        return self.hutchinson.signs().to(div) * spread.unsqueeze(1)

    def _hutchinson(self, f: Tensor, xbar: Tensor, v: Tensor) -> Tensor:
        """vᵀ(∂f/∂x̄)v for each probe v (P, B, D): one forward, P reverse passes. (B, P)."""
        v = v.to(dtype=f.dtype, device=f.device)
        p, b = v.shape[:2]
        out = torch.empty(b, p, dtype=f.dtype, device=f.device)
        for j in range(p):
            g = _vjp(f, xbar, v[j].reshape(f.shape), retain=j < p - 1)
            out[:, j] = (g.reshape(b, -1) * v[j]).sum(-1)
        self.vjps += p
        return out


def _vjp(out: Tensor, inp: Tensor, v: Tensor, retain: bool) -> Tensor:
    """vᵀ ∂out/∂inp; zero where out does not depend on inp (a constant ε has divergence 0)."""
    if not out.requires_grad:
        return torch.zeros_like(inp)
    (g,) = torch.autograd.grad(out, inp, v, retain_graph=retain, allow_unused=True, materialize_grads=True)
    return g


def per_sample_norm(dim: int) -> Callable[[Tensor], Tensor]:
    """The error norm of adaptive torchdiffeq solves of y = (x̄, ℓ/D) with the exact divergence: the largest over
    samples of the RMS of x̄'s scaled error and of D × each accumulator's scaled error.

    torchdiffeq hands the norm e = error/(atol + rtol·|y|). An accumulator u = ℓ/D thus contributes
    D·e_u = error_ℓ/(atol + rtol·|ℓ|/D): each sample's log-density is held to the absolute tolerance atol plus
    rtol times its per-dimension size |ℓ|/D. (ℓ itself grows like D·log σmax while log p does not, so a plain
    rtol·|ℓ| would let the error grow with D; and an RMS over D + 1 numbers would dilute it by sqrt(D + 1).)"""

    def norm(e: Tensor) -> Tensor:
        return torch.maximum(e[:, :dim].pow(2).mean(1).sqrt().max(), dim * e[:, dim:].abs().max())

    return norm


def path_norm(dim: int) -> Callable[[Tensor], Tensor]:
    """The error norm of adaptive solves with Hutchinson's divergence: x̄'s part only (largest per-sample RMS).
    The accumulators (ℓ and the standard error's sign channels) are left out so that their probe noise does not
    drive the step size (and, with fresh probes, so that the path, hence the estimate's expectation and the
    solver's weights a_c of the pooled standard error, do not depend on the probes)."""

    def norm(e: Tensor) -> Tensor:
        return e[:, :dim].pow(2).mean(1).sqrt().max()

    return norm


@dataclass
class Likelihood:
    """Result of `likelihood`, per sample (B,) in nats, log p_0(x_0) = prior + divergence (L1).

    latent: x_T = x̄(σmax)/sqrt(1 + σmax²) (B, *S). prior: log p_{σmax}(x̄_T) in x̄. divergence: ℓ(σmax), the
    mean over probes for Hutchinson; divergence_probes: (B, P) per-probe integrals; stderr: the Hutchinson
    standard error of `divergence` (0 for exact, NaN with one probe): pooled over the solve's calls with fresh
    probes (sqrt(mean_k u_k²), module docstring), std_j ℓ_j/sqrt(P) with fixed ones. nfe: evaluations of the
    augmented field; vjps: vector–Jacobian products per sample. divergence_kind: "exact" or "hutchinson";
    fresh_probes: whether the probes were redrawn at every evaluation; seconds: wall time of the solve.
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
    divergence_kind: str = "exact"
    fresh_probes: bool = False
    seconds: float = float("nan")


def choose_divergence(divergence: str, dim: int) -> str:
    """"exact" or "hutchinson"; "auto" is exact up to `EXACT_MAX_DIM` dimensions and Hutchinson above."""
    if divergence == "auto":
        return "exact" if dim <= EXACT_MAX_DIM else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence: expected 'auto', 'exact' or 'hutchinson', got {divergence!r}")
    return divergence


def probe_count(probes_per_sample: int | None, kind: str) -> int:
    """Accumulators: 1 for the exact divergence; `probes_per_sample` (default `DEFAULT_PROBES`) for Hutchinson."""
    if probes_per_sample is None:
        return 1 if kind == "exact" else DEFAULT_PROBES
    if isinstance(probes_per_sample, bool) or not (isinstance(probes_per_sample, int) and probes_per_sample >= 1):
        raise ValueError(f"probes_per_sample: expected a positive integer, got {probes_per_sample!r}")
    if probes_per_sample > 4096:
        raise ValueError(f"probes_per_sample: {probes_per_sample} is above the bound 4096 (each probe is a reverse "
                         "pass and a D-vector per sample)")
    return 1 if kind == "exact" else probes_per_sample


def check_method(method: str | Method) -> Method:
    """The method, refused (naming why) when it cannot integrate the likelihood's augmented state upwards."""
    m = method if isinstance(method, Method) else get_method(method)
    why = []
    if m.stochastic:
        why.append("it draws noise, and (L1) holds along the deterministic flow of Eq. 12 only")
    elif not m.augmented:
        why.append("it cannot carry the augmented state (x̄ and the divergence accumulators)")
    if "up" not in m.directions:
        why.append("it integrates downwards only (generation), and the likelihood integrates from σ = 0 up — use "
                   "dopri5 or a fixed-grid method")
    if why:
        raise ValueError(f"method: {m.name!r} cannot give a likelihood: {'; '.join(why)}")
    return m


def check_grid_for(sigmas: Tensor | float, m: Method, like: Tensor) -> Tensor:
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


def check_shape(model, shape: tuple[int, ...]) -> None:
    """x0's sample shape against the model's (`sample_shape` of image models, `dim` of analytic ones)."""
    want = getattr(model, "sample_shape", None)
    if want is not None and tuple(want) != shape:
        raise ValueError(f"x0: expected samples of the model's shape {tuple(want)}, got {shape}")
    dim = getattr(model, "dim", None)
    if want is None and isinstance(dim, int) and int(np.prod(shape)) != dim:
        raise ValueError(f"x0: expected samples of {dim} numbers (the model's dimension), got shape {shape}")
