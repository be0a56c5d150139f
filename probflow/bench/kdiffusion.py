"""k-diffusion's samplers as peers: `k_diffusion.sampling` driven as its users call it, on a probflow ε-model.

A k-diffusion user writes a denoiser D(x, σ) in the VE convention (x = x_0 + σ·n) and calls, for example,

    x_0 = sample_dpmpp_2m(D, sigmas[0] * z, sigmas)          # sigmas: decreasing, ending in 0

k-diffusion's x is probflow's x̄ = x·sqrt(1 + σ²) (docs/MATH.md §1–2), and its ODE dx/dσ = (x − D(x, σ))/σ
(`to_d`) is Eq. 12, dx̄/dσ = ε(x̄/sqrt(1 + σ²), σ), exactly when

    D(x̄, σ) = x̄ − σ·ε(x̄/sqrt(1 + σ²), σ)                                                 (`denoiser`)

so `run_kpeer` starts at x̄_T = x_T·sqrt(1 + σ_max²) (the same x_T as every other solver; at σ_max = 157 of
the DDPM table that is ≈ σ_max·z) and its x at σ = 0 is x_0 = x̄(0). Any σ grid of probflow's (decreasing, ending
in 0) is passed as is: k-diffusion's samplers take any `sigmas` tensor, so every peer gets every grid.

Peers (`KPEERS`; NFE = model calls on a grid of n steps ending in 0):
    k_dpmpp_2m    `sample_dpmpp_2m` (DPM-Solver++(2M); first-order last step into σ = 0)            n
    k_dpmpp_3m    `sample_dpmpp_3m_sde` with eta = 0 (the deterministic DPM-Solver++(3M); last step D)  n
    k_lms         `sample_lms`, order 4 (linear multistep in σ, coefficients by scipy.quad)         n
    k_heun        `sample_heun` (Karras' 2nd-order Heun; an Euler last step into σ = 0)           2n − 1
    k_dpmpp_2s    `sample_dpmpp_2s_ancestral` with eta = 0 (deterministic DPM-Solver++(2S))         2n − 1
    k_euler       `sample_euler` (first order; for the order checks)                                n
and `run_dpm_adaptive` (`sample_dpm_adaptive`, DPM-Solver-23 with its own step-size controller; it ends at
σ_min > 0 and reports its model calls).

Loading. `k_diffusion/__init__.py` imports torchvision (never a dependency here), so only `sampling.py` is
loaded, by file path, as a module of a stand-in package whose `utils` holds the one function it uses
(`append_dims`, copied: k-diffusion is MIT). `sampling.py` imports torchsde at the top for its SDE noise only;
when torchsde is absent a stand-in module is used while loading (no sampler here draws noise: every call gets
a zero `noise_sampler`). `available()` says whether the file exists and loads (any Exception counts as absent).
Install: `pip install --no-deps k-diffusion` (the Makefile does).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KPEERS", "KPeerResult", "available", "load_sampling", "denoiser", "kpeer_names", "run_kpeer",
           "steps_for_nfe", "run_dpm_adaptive"]

_PKG = "_probflow_kdiffusion"
_cache: dict[str, types.ModuleType] = {}


def _append_dims(x: Tensor, target_dims: int) -> Tensor:
    """k_diffusion.utils.append_dims (MIT): x with singleton dimensions appended up to target_dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def _sampling_path() -> str:
    spec = importlib.util.find_spec("k_diffusion")  # finds the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k_diffusion is not installed (pip install --no-deps k-diffusion)")
    return str(next(iter(spec.submodule_search_locations))) + "/sampling.py"


def load_sampling() -> types.ModuleType:
    """k-diffusion's `sampling.py` as a module, without its package `__init__` (see the module doc)."""
    if "sampling" in _cache:
        return _cache["sampling"]
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = []  # a package, so that `from . import utils` resolves against it
    utils = types.ModuleType(f"{_PKG}.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    added = {_PKG: pkg, f"{_PKG}.utils": utils}
    try:
        import torchsde  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: the samplers used here never touch it
        added["torchsde"] = types.ModuleType("torchsde")
    saved = {k: sys.modules.get(k) for k in added}
    sys.modules.update(added)
    try:
        spec = importlib.util.spec_from_file_location(f"{_PKG}.sampling", _sampling_path())
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    _cache["sampling"] = mod
    return mod


def available() -> bool:
    """Whether k-diffusion's sampling.py loads here (any failure counts as absent)."""
    try:
        load_sampling()
    except Exception:  # noqa: BLE001 - a broken optional dependency is an absent one
        return False
    return True


@dataclass(frozen=True)
class KPeer:
    fn: str
    kwargs: dict
    description: str
    two_stage: bool = False  # 2 calls per step, 1 for the last step into σ = 0
    order: int = 1  # declared order of convergence (in steps)


KPEERS: dict[str, KPeer] = {
    "k_dpmpp_2m": KPeer("sample_dpmpp_2m", {}, "k-diffusion DPM-Solver++(2M)", order=2),
    "k_dpmpp_3m": KPeer("sample_dpmpp_3m_sde", {"eta": 0.0}, "k-diffusion DPM-Solver++(3M), eta = 0", order=3),
    "k_lms": KPeer("sample_lms", {"order": 4}, "k-diffusion LMS, order 4", order=4),
    "k_heun": KPeer("sample_heun", {}, "k-diffusion Heun (Karras et al. 2022)", True, order=2),
    "k_dpmpp_2s": KPeer("sample_dpmpp_2s_ancestral", {"eta": 0.0}, "k-diffusion DPM-Solver++(2S), eta = 0",
                        True, order=2),
    "k_euler": KPeer("sample_euler", {}, "k-diffusion Euler", order=1),
}
_NOISE_ARG = ("sample_dpmpp_3m_sde", "sample_dpmpp_2s_ancestral")


def kpeer_names() -> list[str]:
    return list(KPEERS)


def _kpeer(name: str) -> KPeer:
    if name not in KPEERS:
        raise ValueError(f"peer: unknown k-diffusion peer {name!r}; expected one of {list(KPEERS)}")
    return KPEERS[name]


def steps_for_nfe(name: str, nfe: int) -> int:
    """Steps (grid intervals, the last into σ = 0) whose model calls are at most `nfe` (2n − 1 for 2-stage)."""
    if _kpeer(name).two_stage:
        return max(1, (nfe + 1) // 2)
    return max(1, nfe)


def denoiser(model: Callable[[Tensor, Tensor], Tensor], counter: list[int] | None = None):
    """D(x̄, σ) = x̄ − σ·ε(x̄/sqrt(1 + σ²), σ) for a probflow ε-model (σ a scalar or per-sample (B,) tensor)."""

    def d(xbar: Tensor, sigma: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device).reshape(-1)
        if s.numel() > 1 and not bool((s == s[0]).all()):
            raise ValueError("sigma: expected one σ for the whole batch")
        s0 = s[0]
        if counter is not None:
            counter[0] += 1
        if float(s0) == 0.0:
            return xbar  # D(x̄, 0) = x̄ (ε is finite, σ·ε = 0)
        return xbar - s0 * model(xbar / torch.sqrt(1.0 + s0 * s0), s0)

    return d


@dataclass
class KPeerResult:
    """x: the end point in the model's variable (x_0 = x̄ at σ = 0); nfe: model calls; sigmas: the grid."""

    x: Tensor
    nfe: int
    sigmas: Tensor


def _zero_noise(x: Tensor):
    return lambda sigma, sigma_next: torch.zeros_like(x)


def run_kpeer(name: str, model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, sigmas: Tensor) -> KPeerResult:
    """x_T → x_0 with k-diffusion's sampler `name` on the decreasing grid `sigmas` (σ_max first, 0 last; a grid
    ending at σ > 0 returns x(σ_end) = x̄/sqrt(1 + σ_end²), in the model's variable as well).

    model: a probflow ε-model; noise: x_T in the model's variable (B, *S), float64 for accuracy studies.
    The sampler is called exactly as a k-diffusion user calls it, with the denoiser of `denoiser`."""
    spec = _kpeer(name)
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise: expected a floating-point batch (B, ...) of x_T")
    sig = torch.as_tensor(sigmas, dtype=noise.dtype).flatten()
    if sig.numel() < 2 or float(sig[-1]) < 0.0 or not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError("sigmas: expected a strictly decreasing grid of σ ≥ 0 (σ_max first, usually 0 last)")
    sampling = load_sampling()
    calls = [0]
    kw = dict(spec.kwargs, disable=True)
    xbar = noise * math.sqrt(1.0 + float(sig[0]) ** 2)
    if spec.fn in _NOISE_ARG:
        kw["noise_sampler"] = _zero_noise(xbar)
    with torch.no_grad():
        x = getattr(sampling, spec.fn)(denoiser(model, calls), xbar, sig, **kw)
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"peer {name}: produced NaN or Inf")
    x = x / math.sqrt(1.0 + float(sig[-1]) ** 2)  # x̄ → the model's variable (a no-op at σ = 0)
    return KPeerResult(x.to(noise.dtype), calls[0], sig)


def run_dpm_adaptive(model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, sigma_max: float, sigma_min: float,
                     rtol: float, atol: float, order: int = 3, to_zero: bool = False) -> KPeerResult:
    """k-diffusion's `sample_dpm_adaptive` (DPM-Solver-23 adaptive) from σ_max to σ_min > 0, as its users call
    it; with `to_zero`, then one last step into σ = 0 (x_0 = D(x̄, σ_min), the last step of k-diffusion's
    fixed-grid samplers, one more call). Returns x̄ at σ_min (or x_0), and the model calls."""
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"sigma_min: expected 0 < sigma_min < sigma_max, got {sigma_min!r}, {sigma_max!r}")
    sampling = load_sampling()
    calls = [0]
    d = denoiser(model, calls)
    xbar = noise * math.sqrt(1.0 + sigma_max**2)
    with torch.no_grad():
        x = sampling.sample_dpm_adaptive(d, xbar, sigma_min, sigma_max, order=order, rtol=rtol, atol=atol,
                                         disable=True)
        if to_zero:
            x = d(x, torch.tensor(sigma_min, dtype=x.dtype))
    grid = torch.tensor([sigma_max, sigma_min] + ([0.0] if to_zero else []), dtype=torch.float64)
    return KPeerResult(x.to(noise.dtype), calls[0], grid)
