"""Latent files: the x_T of `encode` (MATH.md §2: x_T = x̄(σ_max)/sqrt(1+σ_max²), in the model's variable x)
in safetensors, with the provenance needed to decode them again.

Tensors: `latents` (B, *S), `sigmas` (the decreasing sampling grid, float64) and, for a reversible method,
its final state as `state.<name>` (reversible_heun's fixed-point pair). Metadata (all strings): the
format tag, probflow's version, the model (name and sha256 `fingerprint` of its weights), the schedule
(name, T, σ_max and a sha256 of its ᾱ table), the method, rtol/atol, NFE, steps, dtype, the data range
and the source images' names. `check_compatible` refuses to decode with another model or schedule
unless `force`. Files are written atomically and never overwrite an existing file unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probflow.io.atomic import atomic_write
from probflow.version import __version__

__all__ = ["FORMAT", "LatentFile", "model_identity", "schedule_identity", "save_latents", "load_latents",
           "check_compatible"]

FORMAT = "probflow-latents/1"


def schedule_identity(schedule) -> dict[str, str]:
    """name, T, σ_max and sha256 of the float64 ᾱ table of a `probflow.schedules.Schedule`."""
    ab = schedule.alpha_bar.detach().cpu().to(torch.float64).contiguous()
    return {"schedule": schedule.name, "schedule_T": str(schedule.T), "sigma_max": repr(schedule.sigma_max),
            "schedule_sha256": hashlib.sha256(ab.numpy().tobytes()).hexdigest()}


def model_identity(model: Any) -> dict[str, str]:
    """The model's name and weights fingerprint (a DiscreteTimeModel's `fingerprint`, or the sha256 of an
    analytic model's tensors), and its schedule's identity when it has one."""
    from probflow.models.adapters import fingerprint

    fp = getattr(model, "fingerprint", None)
    if fp is None:
        tensors = {k: v for k, v in vars(model).items() if isinstance(v, Tensor)} if hasattr(model, "__dict__") else {}
        if not tensors:
            raise ValueError(f"model: cannot fingerprint a {type(model).__name__} (no weights or tensors)")
        fp = fingerprint(tensors)
    out = {"model": str(getattr(model, "name", "") or type(model).__name__), "model_fingerprint": fp}
    if getattr(model, "schedule", None) is not None:
        out.update(schedule_identity(model.schedule))
    return out


@dataclass
class LatentFile:
    """A latent file's content: latents (B, *S), the decreasing grid, the method's state tensors (or {})
    and the metadata strings."""

    latents: Tensor
    sigmas: Tensor
    meta: dict[str, str]
    state: dict[str, Tensor] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        return json.loads(self.meta.get("sources", "[]"))


def save_latents(
    path: str | os.PathLike,
    latents: Tensor,
    sigmas: Tensor,
    model: Any,
    *,
    method: str,
    nfe: int,
    rtol: float | None = None,
    atol: float | None = None,
    state: dict[str, Tensor] | None = None,
    sources: list[str] | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    extra: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write `latents` with their provenance to a safetensors file at `path` (atomic; refuses to overwrite
    unless `force`). `sigmas` is the decreasing sampling grid they were encoded on; `extra` adds metadata
    strings (e.g. the CLI's "invert")."""
    from safetensors.torch import save_file


    if not isinstance(latents, Tensor) or not latents.is_floating_point() or latents.ndim < 2:
        raise ValueError(f"latents: expected a floating-point batch (B, ...), got "
                         f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
    meta = {"format": FORMAT, "probflow_version": __version__, **model_identity(model),
            "method": str(method), "rtol": repr(rtol), "atol": repr(atol), "nfe": str(int(nfe)),
            "steps": str(len(sigmas) - 1), "dtype": str(latents.dtype).replace("torch.", ""),
            "shape": json.dumps(list(latents.shape)), "data_range": json.dumps(list(data_range)),
            "sources": json.dumps(list(sources or [])), **{str(k): str(v) for k, v in (extra or {}).items()}}
    tensors = {"latents": latents.detach().cpu().contiguous(),
               "sigmas": sigmas.detach().cpu().to(torch.float64).contiguous()}
    for k, v in (state or {}).items():
        tensors[f"state.{k}"] = v.detach().cpu().contiguous()
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), force, name="--out")


def load_latents(path: str | os.PathLike, name: str = "latents") -> LatentFile:
    """Read a latent file written by `save_latents`; a missing, corrupt or foreign file raises an error
    naming the argument `name` and the path."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path}: no such latent file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{name}: {path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{name}: {path} is not a probflow latent file (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    for k in ("latents", "sigmas"):
        if k not in tensors:
            raise ValueError(f"{name}: {path} lacks the tensor {k!r}")
    lat, sig = tensors.pop("latents"), tensors.pop("sigmas")
    try:
        shape = json.loads(meta.get("shape", "null"))
    except json.JSONDecodeError:
        shape = None
    if not isinstance(shape, list):
        raise ValueError(f"{name}: {path}: metadata 'shape' is {meta.get('shape')!r}, expected a JSON list of "
                         f"integers (the file is damaged or was not written by probflow)")
    if shape != list(lat.shape):
        raise ValueError(f"{name}: {path}: latents of shape {list(lat.shape)} disagree with the metadata's {shape}")
    if sig.ndim != 1 or len(sig) < 2 or not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"{name}: {path}: the stored grid is not a decreasing 1-D σ grid")
    if not torch.isfinite(lat).all():
        raise ValueError(f"{name}: {path}: latents contain NaN or Inf")
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    return LatentFile(lat, sig, meta, state)


def check_compatible(lf: LatentFile, model: Any, force: bool = False, name: str = "latents") -> list[str]:
    """Refuse (ValueError) latents made with another model or schedule than `model`, unless `force`;
    returns the list of mismatches (empty when compatible)."""
    here = model_identity(model)
    problems = []
    if lf.meta.get("model_fingerprint") != here["model_fingerprint"]:
        fp = lf.meta.get("model_fingerprint", "?")
        problems.append(f"model {lf.meta.get('model')!r} (weights sha256 {fp[:12]}…), "
                        f"not {here['model']!r} (sha256 {here['model_fingerprint'][:12]}…)")
    if "schedule_sha256" in here and lf.meta.get("schedule_sha256") != here["schedule_sha256"]:
        problems.append(f"schedule {lf.meta.get('schedule')!r} (T = {lf.meta.get('schedule_T')}, σ_max = "
                        f"{lf.meta.get('sigma_max')}), not {here['schedule']!r} (T = {here['schedule_T']}, "
                        f"σ_max = {here['sigma_max']}; ᾱ table sha256 {str(lf.meta.get('schedule_sha256', '?'))[:12]}… "
                        f"vs {here['schedule_sha256'][:12]}…)")
    if problems and not force:
        raise ValueError(f"{name}: made with {'; '.join(problems)}; pass --force (force=True) to decode anyway")
    return problems
