"""Benchmark workloads: a model, its noise x_T and the reference x_0 from it (`reference.reference`).

Every solver starts from the same x_T at σ_max (t = T−1 of the model's schedule), x̄_T = x_T·sqrt(1 + σ_max²),
and integrates Eq. 12 down to σ = 0, where x̄ = x = x_0 (docs/MATH.md §1, §7).

Models by spec (`load_model_spec`): "mixture2d" (the built-in 2-D mixture, exact ε), "digits" (the shipped
digits ε-UNet), a local folder (a diffusers `save_pretrained` folder, or a digits checkpoint folder with
digits.safetensors), or a Python entry point "module:factory" (factory() returns an ε-model `model(x, σ)`).
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probflow.bench.reference import REFERENCE, default_reference, reference
from probflow.field import DDIMField
from probflow.flows import noise
from probflow.models import GaussianMixture
from probflow.schedules import Schedule, linear

__all__ = ["Workload", "sharp_mixture", "mixture_workload", "digits_workload", "model_workload", "load_model_spec",
           "sample_shape"]


@dataclass
class Workload:
    """Same noise, same start σ_max, same end σ = 0 for every solver. noise: x_T in the model's variable
    (float64); reference: x_0 from it; ref: how the reference was made and its convergence check."""

    name: str
    model: Any
    schedule: Schedule
    noise: Tensor
    reference: Tensor
    ref: dict
    model_dtype: torch.dtype | None = None
    extra: dict = field(default_factory=dict)

    @property
    def xbar(self) -> Tensor:
        return self.noise * math.sqrt(1.0 + self.schedule.sigma_max**2)

    def field(self) -> DDIMField:
        return DDIMField(self.model, model_dtype=self.model_dtype)


def sharp_mixture(dim: int, components: int = 8, seed: int = 0, std_range: tuple[float, float] = (0.05, 0.5)
                  ) -> GaussianMixture:
    """`GaussianMixture.random(dim, components, seed, std_range)`: full covariances, per-direction std
    log-uniform in `std_range` (down to 0.05: sharp components, like data near a manifold)."""
    return GaussianMixture.random(dim, components, seed, std_range=std_range)


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


@functools.lru_cache(maxsize=8)
def mixture_workload(dim: int = 64, n_samples: int = 128, seed: int = 0, components: int = 8,
                     std_range: tuple[float, float] = (0.05, 0.5), ref_tol: float = 1e-12,
                     check_tol: float = 1e-10, group: int | None = None) -> Workload:
    """A sharp Gaussian-mixture workload (`sharp_mixture(dim, components, seed)`), n_samples x_T =
    `probflow.noise(n, (dim,), seed + 1)`, reference DOP853 at `ref_tol` checked against `check_tol`.
    Cached per arguments (the reference is the expensive part)."""
    _positive("dim", dim)
    _positive("n_samples", n_samples)
    model = sharp_mixture(dim, components, seed, std_range)
    sch = linear()
    z = noise(n_samples, (dim,), seed + 1)
    group = group or max(1, min(n_samples, 1024 // dim))
    x0, info = reference(model, z * math.sqrt(1 + sch.sigma_max**2), sch, REFERENCE, ref_tol, check_tol, None,
                         {"group": group})
    return Workload(f"mixture D={dim}", model, sch, z, x0, info,
                    extra={"dim": dim, "components": components, "std_range": list(std_range), "seed": seed,
                           "n_samples": n_samples})


def sample_shape(model) -> tuple[int, ...]:
    """The shape of one sample: `model.sample_shape`, else (model.dim,); ValueError when the model has neither."""
    shape = getattr(model, "sample_shape", None)
    if shape is None and getattr(model, "dim", None) is not None:
        shape = (int(model.dim),)
    if not shape:
        raise ValueError(f"model: {type(model).__name__} has neither `sample_shape` nor `dim`; cannot draw its noise")
    return tuple(int(s) for s in shape)


def model_workload(model, n_samples: int, seed: int = 0, *, name: str | None = None, ref_method: str | None = None,
                   ref_tol: float | None = None, check_tol: float | None = None,
                   ref_dtype: torch.dtype | None = None, error_tol: float | None = None) -> Workload:
    """Any ε-model: x_T = `probflow.noise(n_samples, sample_shape(model), seed)`, σ_max of `model.schedule`
    (default the linear DDPM table) → 0; reference = a tight adaptive solve (`default_reference(model)` unless
    given: DOP853 at 1e-12 for closed-form models, dopri5 at 1e-5 for networks), checked against `check_tol`.
    ref_dtype: run the reference's network in this dtype (float64 for tolerances near float32 rounding).
    error_tol: measure the reference's own error against a solve at this tolerance (`reference.reference`)."""
    _positive("n_samples", n_samples)
    d_method, d_tol, d_check = default_reference(model)
    ref_method, ref_tol, check_tol = ref_method or d_method, ref_tol or d_tol, check_tol or d_check
    sch = getattr(model, "schedule", None) or linear()
    shape = sample_shape(model)
    z = noise(n_samples, shape, seed)
    md = getattr(model, "model_dtype", None)
    ref_model = with_dtype(model, ref_dtype) if ref_dtype is not None else model
    rd = getattr(ref_model, "model_dtype", None)
    opts = {"group": max(1, min(n_samples, 1024 // math.prod(shape)))} if ref_method == REFERENCE else None
    xbar = z * math.sqrt(1 + sch.sigma_max**2)
    x0, info = reference(ref_model, xbar, sch, ref_method, ref_tol, check_tol, rd, opts, error_tol)
    info["network_dtype"] = str(rd).replace("torch.", "") if rd is not None else None
    if rd != md:
        with torch.no_grad():
            fields = [DDIMField(m, model_dtype=d) for m, d in ((model, md), (ref_model, rd))]
            pts = [(sch.sigma_max, xbar), (1.0, x0 + z), (0.01, x0 + 0.01 * z)]  # x̄ ≈ x_0 + σ z on the way
            info["float32_field_diff"] = max(float((fields[0](s, xb) - fields[1](s, xb)).abs().max()) for s, xb in
                                             ((torch.tensor(v, dtype=torch.float64), xb) for v, xb in pts))
    return Workload(name or getattr(model, "name", "") or type(model).__name__, model, sch, z, x0, info, md,
                    extra={"n_samples": n_samples, "shape": list(shape), "seed": seed,
                           "network_dtype": str(md).replace("torch.", "") if md is not None else None,
                           "fingerprint": getattr(model, "fingerprint", None)})


def digits_workload(n_samples: int = 16, seed: int = 0, ref_method: str = "dopri5", ref_tol: float = 1e-5,
                    check_tol: float = 1e-4, folder: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, ref_dtype: torch.dtype | None = None) -> Workload:
    """The digits ε-UNet (`folder`: a digits checkpoint folder, default the shipped model), x_T =
    `probflow.noise(n, (1, 8, 8), seed)`; dtype: the network's dtype for the benchmarked solvers (None: the
    shipped float32); see `model_workload` for the reference."""
    model = load_model_spec(str(folder)) if folder is not None else load_model_spec("digits")
    if dtype is not None:
        model = with_dtype(model, dtype)
    return model_workload(model, n_samples, seed, name="digits", ref_method=ref_method, ref_tol=ref_tol,
                          check_tol=check_tol, ref_dtype=ref_dtype)


def with_dtype(model, dtype: torch.dtype):
    """A copy of a `DiscreteTimeModel` whose network runs in `dtype` (the original is left as it is)."""
    if not hasattr(model, "net"):
        return model
    out = copy.copy(model)
    out.net = copy.deepcopy(model.net).to(dtype)
    out.model_dtype = dtype
    return out


def load_model_spec(spec: str, **condition):
    """A model from a `--model` spec: "mixture2d", "digits", "digits32", a local folder (diffusers
    `save_pretrained` layout, or a digits checkpoint folder with digits.safetensors) or "module:factory" (a Python
    entry point; factory() returns an ε-model `model(x, σ)` with `sample_shape` or `dim`, and optionally
    `schedule`). `condition`: a conditional model's condition (`probflow.models.load`: class_label, prompt,
    prompt_embeds, negative, guidance). ValueError names the spec, or the condition's argument it refuses."""
    from probflow.models import CONDITION_ARGUMENTS, load

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--model: expected a model spec, got {spec!r}")
    path = Path(spec).expanduser()
    if spec in ("mixture2d", "digits", "digits32") or path.is_dir():
        try:
            return load(str(path) if path.is_dir() else spec, **condition)
        except ValueError as e:
            if str(e).split(":")[0] in CONDITION_ARGUMENTS:
                raise
            raise ValueError(f"--model {spec}: {e}") from None
    given = [k for k, v in condition.items() if v is not None]
    if given:
        raise ValueError(f"{given[0]}: model {spec!r} is not a conditional model folder; it takes no condition")
    if ":" in spec and not path.exists():
        return _entry_point(spec)
    raise ValueError(f"--model: {spec!r} is not 'mixture2d', 'digits', an existing local folder or 'module:factory'")


def _entry_point(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"--model: {spec!r}: expected 'module:factory'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"--model: cannot import module {mod_name!r} ({e})") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ValueError(f"--model: {mod_name!r} has no callable {attr!r}")
    model = factory()
    if not callable(model):
        raise ValueError(f"--model: {spec}() returned {type(model).__name__}, not an ε-model model(x, σ)")
    sample_shape(model)
    return model
