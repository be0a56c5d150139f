"""Latent files: the x_T of `encode` (docs/MATH.md §2: x_T = x̄(σ_max)/sqrt(1+σ_max²), in the model's variable x) in
safetensors, with the provenance needed to decode them again.

Tensors: `latents` (B, *S), `sigmas` (the decreasing sampling grid, float64) and, for a reversible method, its final
state as `state.<name>` (reversible_heun's fixed-point pair). Metadata: one safetensors metadata key, "probflow",
holding a JSON object with sorted keys (so the same content gives the same bytes), every value a string: the format
tag, probflow's version, the model (name and sha256 `fingerprint` of its weights), the schedule (name, T, σ_max and
a sha256 of its ᾱ table), the method, the grid's name, rtol/atol, NFE, steps, dtype, shape, the data range, the
source images' names, `exact_for` (the decoder an exact latent is exact for, else ""), the environment its exactness
depends on (`env_torch`, `env_device`, `env_threads`, `env_deterministic`, `env_model_dtype`; the batch is `shape`
and `sources`), optionally the condition's sha256 and the guidance weight w (`condition_sha256`, `guidance`) and
`content_sha256`: a sha256 over every tensor AND every other metadata field (format probflow-latents/2).

What "exact" promises: a latent is decoded as exact only when the file says it was made exact for this decoder
(`exact_for`, or a reversible pair's state), is decoded with that method on its own grid, its content hash matches
(so no tensor and no field that changes the decoded image — data_range, invert, exact_for, method, grid, steps,
dtype, … — changed since it was written), and the environment it records matches (else a loud note). The hash
detects accidents (a damaged, edited or mixed-up file), not forgery: anyone can rewrite a file and its hash. A file
without a content hash, or in the older format probflow-latents/1 whose hash covered only the tensors, is never
called exact (`LatentFile.verified`).

`load_latents` validates every field's type and range and names the field it refuses. `check_compatible` refuses
another model or schedule unless `force`, and a grid that differs from the one its name and step count recompute.
`decode_exactness` says what a decode with a given method and grid can promise (the CLI's claim and warnings).
`environment_differences` lists what differs from the decoding machine. Files are written atomically and never
overwrite an existing file unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probflow.files.atomic import atomic_write
from probflow.models.adapters import loads_json
from probflow.version import __version__

__all__ = ["FORMAT", "LatentFile", "MAX_HEADER_BYTES", "MAX_LATENT_BYTES", "content_sha256", "model_identity",
           "schedule_identity", "save_latents", "load_latents", "check_compatible", "decode_exactness", "environment",
           "environment_differences"]

FORMAT = "probflow-latents/2"  # content_sha256 covers the tensors and every metadata field
OLD_FORMAT = "probflow-latents/1"  # content_sha256 covered the tensors only: read, never called exact
MAX_HEADER_BYTES = 1 << 20  # a safetensors header (JSON) above 1 MiB is not a latent file probflow wrote
MAX_LATENT_BYTES = 1 << 32  # default bound on a latent file's size (4 GiB), checked before it is read


def schedule_identity(schedule) -> dict[str, str]:
    """name, T, σ_max and sha256 of the float64 ᾱ table of a `probflow.schedules.Schedule`."""
    ab = schedule.alpha_bar.detach().cpu().to(torch.float64).contiguous()
    return {"schedule": schedule.name, "schedule_T": str(schedule.T), "sigma_max": repr(schedule.sigma_max),
            "schedule_sha256": hashlib.sha256(ab.numpy().tobytes()).hexdigest()}


def model_identity(model: Any) -> dict[str, str]:
    """The model's name and weights fingerprint (a DiscreteTimeModel's `fingerprint`, or the sha256 of an
    analytic model's tensors), and its schedule's identity when it has one. A conditional model's fingerprint
    covers its condition and w (`probflow.models.conditional`); it adds the fingerprint of the network alone
    (`network_fingerprint`) and its `condition` record (condition_sha256, guidance, class_label, …), so that
    another condition is told apart from another network; latent diffusion adds `autoencoder_fingerprint`."""
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
    condition = getattr(model, "condition", None) or {}
    if condition:
        out["network_fingerprint"] = fingerprint(model.net.unet)
        out.update({str(k): str(v) for k, v in condition.items()})
    ae = getattr(model, "autoencoder", None)
    if ae is not None:
        out["autoencoder_fingerprint"] = fingerprint(ae.vae)
    return out


@dataclass
class LatentFile:
    """A latent file's content: latents (B, *S), the decreasing grid, the method's state tensors (or {})
    and the metadata strings."""

    latents: Tensor
    sigmas: Tensor
    meta: dict[str, str]
    state: dict[str, Tensor] = field(default_factory=dict)
    verified: bool = True  # the content hash covers tensors and metadata and matches
    notes: list[str] = field(default_factory=list)  # why the file is not verified, for the user

    @property
    def sources(self) -> list[str]:
        return loads_json(self.meta.get("sources", "[]"), "sources", max_bytes=MAX_HEADER_BYTES)


def environment(device: str | torch.device = "cpu", model: Any = None) -> dict[str, str]:
    """What a bit-exact decode depends on besides the file: torch's version, the device type, the thread
    count, the deterministic-algorithms setting and the dtype the network computes in."""
    md = getattr(model, "model_dtype", None)
    return {"env_torch": torch.__version__, "env_device": torch.device(device).type,
            "env_threads": str(torch.get_num_threads()),
            "env_deterministic": json.dumps(bool(torch.are_deterministic_algorithms_enabled())),
            "env_model_dtype": "" if md is None else str(md).replace("torch.", "")}


def environment_differences(lf: LatentFile, device: str | torch.device = "cpu", model: Any = None) -> list[str]:
    """The recorded environment entries that differ here ("threads 2 → 1", …); [] when all match."""
    here = environment(device, model)
    out = []
    for k, v in here.items():
        if k in lf.meta and lf.meta[k] != v:
            out.append(f"{k[4:]} {lf.meta[k]} → {v}")
    missing = [k for k in here if k not in lf.meta]
    if missing:
        out.append(f"not recorded: {', '.join(k[4:] for k in missing)}")
    return out


def _tensor_sha256(tensors: dict[str, Tensor], h=None):
    h = h or hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{str(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def content_sha256(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes, in sorted order) and every metadata field but
    `content_sha256` itself (sorted JSON): what a latent file's `content_sha256` holds (format /2)."""
    h = _tensor_sha256(tensors, hashlib.sha256(f"{FORMAT}\n".encode()))
    rest = {k: v for k, v in meta.items() if k != "content_sha256"}
    h.update(json.dumps(rest, sort_keys=True, ensure_ascii=True).encode())
    return h.hexdigest()


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
    grid: str = "",
    exact_for: str = "",
    device: str | torch.device = "cpu",
    extra: dict[str, str] | None = None,
    condition_sha256: str | None = None,
    guidance: float | None = None,
    force: bool = False,
) -> Path:
    """Write `latents` with their provenance to a safetensors file at `path` (atomic; refuses to overwrite
    unless `force`). `sigmas` is the decreasing sampling grid they were encoded on and `grid` its name
    (`probflow.grids.named`; "" when it has none); `exact_for` the decoder an exact latent is exact for;
    `extra` adds metadata strings (e.g. the CLI's "invert", a JSON boolean); `condition_sha256` (the sha256 of
    the condition a conditional model was given) and `guidance` (its guidance weight w) are recorded when given.
    Every field and tensor is covered by `content_sha256`."""
    from safetensors.torch import save_file

    if not isinstance(latents, Tensor) or not latents.is_floating_point() or latents.ndim < 2:
        raise ValueError(f"latents: expected a floating-point batch (B, ...), got "
                         f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
    tensors = {"latents": latents.detach().cpu().contiguous(),
               "sigmas": sigmas.detach().cpu().to(torch.float64).contiguous()}
    for k, v in (state or {}).items():
        tensors[f"state.{k}"] = v.detach().cpu().contiguous()
    meta = {"format": FORMAT, "probflow_version": __version__, **model_identity(model),
            "method": str(method), "grid": str(grid), "exact_for": str(exact_for), "rtol": repr(rtol),
            "atol": repr(atol), "nfe": str(int(nfe)), "steps": str(len(sigmas) - 1),
            "dtype": str(latents.dtype).replace("torch.", ""), "shape": json.dumps(list(latents.shape)),
            "data_range": json.dumps([float(v) for v in data_range]), "sources": json.dumps(list(sources or [])),
            **environment(device, model), **{str(k): str(v) for k, v in (extra or {}).items()}}
    if condition_sha256 is not None:
        meta["condition_sha256"] = str(condition_sha256)
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise ValueError(f"guidance: expected a finite number, got {guidance!r}")
        meta["guidance"] = repr(float(guidance))
    meta["content_sha256"] = content_sha256(tensors, meta)
    _validate(meta, tensors["latents"], tensors["sigmas"], "latents")  # never write what load would refuse
    header = {"probflow": json.dumps(meta, sort_keys=True, ensure_ascii=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), force, name="--out")


def _json_field(meta: dict[str, str], key: str, where: str, kind: str):
    try:
        return loads_json(meta[key], key, max_bytes=MAX_HEADER_BYTES)
    except ValueError as e:
        shown = meta[key] if len(meta[key]) <= 80 else f"{meta[key][:40]}…"
        detail = "not valid JSON" if "not valid JSON" in str(e) else str(e).removeprefix(f"{key}: ")
        raise ValueError(f"{where}: metadata field {key!r} is {shown!r}, {detail} (expected {kind})") from None


def _number(meta: dict[str, str], key: str, where: str, *, integer: bool = False, positive: bool = False,
            optional: bool = False) -> float | None:
    v = meta[key]
    if optional and v in ("None", ""):
        return None
    try:
        x = int(v) if integer else float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: metadata field {key!r} is {v!r}, expected "
                         f"{'an integer' if integer else 'a number'}") from None
    if not math.isfinite(x) or x < 0 or (positive and x <= 0):
        sign = "positive" if positive else "non-negative"
        raise ValueError(f"{where}: metadata field {key!r} is {v!r}, expected a {sign} finite number")
    return x


_REQUIRED = ("format", "probflow_version", "model", "model_fingerprint", "method", "rtol", "atol", "nfe", "steps",
             "dtype", "shape", "data_range", "sources")


def _validate(meta: dict[str, str], lat: Tensor, sig: Tensor, where: str) -> None:
    """Every metadata field's type and range, and its agreement with the tensors; ValueError naming the field."""
    from probflow.solvers import get_method

    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{where}: metadata lacks the field(s) {missing} (the file is damaged or was not written "
                         "by probflow)")
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{where}: metadata field {bad[0]!r} is not a string")
    try:
        get_method(meta["method"])
    except ValueError:
        raise ValueError(f"{where}: metadata field 'method' is {meta['method']!r}, not a registered solver") from None
    if meta.get("exact_for"):
        try:
            ex = get_method(meta["exact_for"])
        except ValueError:
            raise ValueError(f"{where}: metadata field 'exact_for' is {meta['exact_for']!r}, not a registered "
                             "solver") from None
        if ex.name != meta["method"] or ex.adaptive or ex.stochastic or ex.reversible:
            raise ValueError(f"{where}: metadata field 'exact_for' is {meta['exact_for']!r}, but an exact latent is "
                             f"made for a fixed-step deterministic decoder by that method (method {meta['method']!r})")
    if "guidance" in meta:
        _number(meta, "guidance", where)
    for k in ("rtol", "atol"):
        _number(meta, k, where, positive=True, optional=True)
    _number(meta, "nfe", where, integer=True)
    if _number(meta, "steps", where, integer=True) != len(sig) - 1:
        raise ValueError(f"{where}: metadata field 'steps' is {meta['steps']!r} but the stored grid has "
                         f"{len(sig) - 1} steps")
    if "schedule_T" in meta:
        _number(meta, "schedule_T", where, integer=True, positive=True)
        _number(meta, "sigma_max", where, positive=True)
    for k in ("model_fingerprint", "schedule_sha256", "content_sha256", "condition_sha256", "negative_sha256",
              "network_fingerprint", "autoencoder_fingerprint"):
        if k in meta and not re.fullmatch(r"[0-9a-f]{64}", meta[k]):
            raise ValueError(f"{where}: metadata field {k!r} is {meta[k]!r}, expected a sha256 hex digest")
    if meta["dtype"] != str(lat.dtype).replace("torch.", ""):
        raise ValueError(f"{where}: metadata field 'dtype' is {meta['dtype']!r} but the latents are "
                         f"{str(lat.dtype).replace('torch.', '')}")
    shape = _json_field(meta, "shape", where, "a list of integers")
    if shape != list(lat.shape):
        raise ValueError(f"{where}: metadata field 'shape' is {meta['shape']} but the latents have shape "
                         f"{list(lat.shape)}")
    dr = _json_field(meta, "data_range", where, "[low, high]")
    if (not isinstance(dr, list) or len(dr) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            and math.isfinite(v) for v in dr) or not dr[0] < dr[1]):
        raise ValueError(f"{where}: metadata field 'data_range' is {meta['data_range']}, expected [low, high] with "
                         "finite low < high")
    src = _json_field(meta, "sources", where, "a list of file names")
    if not isinstance(src, list) or not all(isinstance(v, str) for v in src):
        raise ValueError(f"{where}: metadata field 'sources' is {meta['sources']}, expected a list of file names")
    for k in ("invert", "env_deterministic"):
        if k in meta and not isinstance(_json_field(meta, k, where, "true or false"), bool):
            raise ValueError(f"{where}: metadata field {k!r} is {meta[k]!r}, expected true or false")
    if "env_threads" in meta:
        _number(meta, "env_threads", where, integer=True, positive=True)
    if sig.ndim != 1 or len(sig) < 2 or not torch.isfinite(sig).all() or (sig < 0).any() \
            or not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"{where}: the stored grid 'sigmas' is not a strictly decreasing, finite, non-negative 1-D "
                         "σ grid")
    if not torch.isfinite(lat).all():
        raise ValueError(f"{where}: latents contain NaN or Inf")


def load_latents(path: str | os.PathLike, name: str = "latents",
                 max_bytes: int | None = MAX_LATENT_BYTES) -> LatentFile:
    """Read a latent file written by `save_latents` and validate it; a missing, corrupt, altered or foreign
    file raises an error naming the argument `name`, the path and the field. Its size (at most `max_bytes`,
    None: no bound) and header are checked before it is read. A file without a content hash, or in the older
    format, loads with `verified` False, `notes` saying why, and its `exact_for` claim removed."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path}: no such latent file")
    where = f"{name}: {path}"
    _check_size(path, where, max_bytes)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ValueError(f"{name}: {path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    meta = _meta(raw, where)
    for k in ("latents", "sigmas"):
        if k not in tensors:
            raise ValueError(f"{where} lacks the tensor {k!r}")
    notes = _check_hash(meta, tensors, where)
    lat, sig = tensors.pop("latents"), tensors.pop("sigmas")
    if sig.dtype != torch.float64:
        raise ValueError(f"{where}: the stored grid 'sigmas' is {sig.dtype}, expected float64")
    _validate(meta, lat, sig, where)
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    if notes and meta.get("exact_for"):  # never exact: the claim is not covered by a matching hash
        meta = {**meta, "exact_for": ""}
    if notes and "content_sha256" not in meta:
        state = {}  # an unchecked partner state would make a reversible decode look exact
    return LatentFile(lat, sig, meta, state, verified=not notes, notes=notes)


def _check_size(path: Path, where: str, max_bytes: int | None) -> None:
    """The file's size and its safetensors header length, before anything is read."""
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{where} is {size} bytes, above the limit of {max_bytes} for a latent file "
                         "(max_bytes=; --no-limits in the CLI)")
    with open(path, "rb") as f:
        head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(MAX_HEADER_BYTES, max(size - 8, 0)):
        raise ValueError(f"{where} is not a readable safetensors file (header length {n} for a file of {size} "
                         f"bytes; at most {MAX_HEADER_BYTES})")


def _meta(raw: dict[str, str], where: str) -> dict[str, str]:
    if "probflow" in raw:
        meta = loads_json(raw["probflow"], f"{where}: metadata field 'probflow'", max_bytes=MAX_HEADER_BYTES)
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: metadata field 'probflow' is not a JSON object")
    else:
        meta = raw  # files written before the metadata was one sorted JSON object
    if meta.get("format") not in (FORMAT, OLD_FORMAT):
        raise ValueError(f"{where} is not a probflow latent file (format {str(meta.get('format'))[:40]!r}, expected "
                         f"{FORMAT!r})")
    return meta


def _check_hash(meta: dict[str, str], tensors: dict[str, Tensor], where: str) -> list[str]:
    """Refuse a file whose content hash does not match; the reasons it cannot be called exact ([] if none)."""
    want = meta.get("content_sha256")
    if want is None:
        return [f"{where} has no content hash (metadata field 'content_sha256'): its latents and fields cannot be "
                "checked, so it is decoded as an ordinary latent, never as exact"]
    if meta["format"] == OLD_FORMAT:
        if _tensor_sha256(tensors).hexdigest() != want:
            raise ValueError(f"{where}: the tensors do not match the metadata field 'content_sha256' (latents, grid "
                             "or state were altered after encoding)")
        return [f"{where} is in the older format {OLD_FORMAT}, whose hash does not cover the metadata: decoded as an "
                "ordinary latent, never as exact (re-encode the images for an exact latent)"]
    if content_sha256(tensors, meta) != want:
        raise ValueError(f"{where}: the content does not match the metadata field 'content_sha256' (a tensor or a "
                         "metadata field was altered after encoding; the hash detects accidents, not forgery)")
    return []


def check_compatible(lf: LatentFile, model: Any, force: bool = False, name: str = "latents",
                     any_condition: bool = False) -> list[str]:
    """Refuse (ValueError) latents made with another model or schedule than `model`, unless `force`, and
    latents made with the same conditional network under another condition or guidance weight, unless
    `any_condition`; returns the list of mismatches (empty when compatible)."""
    here = model_identity(model)
    problems = []
    if lf.meta.get("model_fingerprint") != here["model_fingerprint"]:
        if "network_fingerprint" in here and lf.meta.get("network_fingerprint") == here["network_fingerprint"]:
            other = _condition_differences(lf.meta, here)
            if not any_condition:
                raise ValueError(f"{name}: made under another condition ({other}); pass the encode's condition, or "
                                 "--any-condition (any_condition=True) to decode them anyway (NOT exact)")
            problems.append(f"another condition ({other})")
        else:
            fp = lf.meta.get("model_fingerprint", "?")
            problems.append(f"model {lf.meta.get('model')!r} (weights sha256 {fp[:12]}…), "
                            f"not {here['model']!r} (sha256 {here['model_fingerprint'][:12]}…)")
    if lf.meta.get("autoencoder_fingerprint") != here.get("autoencoder_fingerprint"):
        problems.append(f"autoencoder sha256 {str(lf.meta.get('autoencoder_fingerprint', 'none'))[:12]}…, not "
                        f"{str(here.get('autoencoder_fingerprint', 'none'))[:12]}…")
    if "schedule_sha256" in here and lf.meta.get("schedule_sha256") != here["schedule_sha256"]:
        problems.append(f"schedule {lf.meta.get('schedule')!r} (T = {lf.meta.get('schedule_T')}, σ_max = "
                        f"{lf.meta.get('sigma_max')}), not {here['schedule']!r} (T = {here['schedule_T']}, "
                        f"σ_max = {here['sigma_max']}; ᾱ table sha256 {str(lf.meta.get('schedule_sha256', '?'))[:12]}… "
                        f"vs {here['schedule_sha256'][:12]}…)")
    real = [p for p in problems if not p.startswith("another condition")]
    if real and not force:
        raise ValueError(f"{name}: made with {'; '.join(real)}; pass --force (force=True) to decode anyway")
    _check_grid(lf, model, name)
    return problems


def _condition_differences(meta: dict[str, str], here: dict[str, str]) -> str:
    """'class 3 → 5; guidance 3 → 1' — what differs between a file's condition record and a model's."""
    out = []
    for key, what in (("class_label", "class"), ("negative_class_label", "negative class"), ("guidance", "guidance")):
        a, b = meta.get(key), here.get(key)
        if a != b:
            out.append(f"{what} {a if a is not None else 'none'} → {b if b is not None else 'none'}")
    for key, what, label in (("condition_sha256", "condition", "class_label"),
                             ("negative_sha256", "negative condition", "negative_class_label")):
        if meta.get(key) != here.get(key) and meta.get(label) == here.get(label):  # not said by the class
            out.append(f"{what} sha256 {str(meta.get(key, 'none'))[:12]}… → {str(here.get(key, 'none'))[:12]}…")
    return "; ".join(out) or "the condition's tensors differ"


def _check_grid(lf: LatentFile, model: Any, name: str) -> None:
    """The stored grid must be the one its recorded name and step count give on the model's schedule."""
    from probflow.grids import NAMED, named
    from probflow.solvers import get_method

    g, steps, sch = lf.meta.get("grid", ""), len(lf.sigmas) - 1, getattr(model, "schedule", None)
    if sch is None:
        return
    if get_method(lf.meta["method"]).adaptive and not lf.meta.get("exact_for"):
        expect = torch.tensor([sch.sigma_max, 0.0], dtype=torch.float64)
    elif g in NAMED:
        expect = named(g, sch, steps)
    else:
        return  # a grid with no name (calibrated, custom): only its shape and order are checked
    if not torch.equal(expect.to(torch.float64), lf.sigmas):
        raise ValueError(f"{name}: the stored grid 'sigmas' is not the {g or 'adaptive [σ_max, 0]'} grid of {steps} "
                         f"steps that the metadata names (altered?)")


def decode_exactness(lf: LatentFile, method: Any, sigmas: Tensor, *, state_used: bool = False,
                     device: str | torch.device = "cpu", model: Any = None, condition_sha256: str | None = None,
                     guidance: float | None = None, negative_sha256: str | None = None,
                     strict: bool = False) -> tuple[str, list[str]]:
    """What decoding `lf` with `method` on the grid `sigmas` can promise: (claim, notes). claim is "" or
    ", exact inverse (…)" for the CLI's summary line; notes are lines to show the user (why not exact, and a
    warning when the method, grid, condition or guidance differ from the encode's: an ordinary decode then).
    Exact needs: a verified file (`load_latents`), the latent's own method and grid, its `exact_for` (or its
    reversible state, `state_used`), the same condition and guidance, and the same environment (else a note).
    `negative_sha256` ("" for a model without one; None: not compared) likewise for the condition guided against.
    `strict`: raise ValueError instead of a warning when the decode is not the one the latent was made for."""
    from probflow.solvers import get_method

    m = method.name if hasattr(method, "name") else get_method(str(method)).name
    meta, notes = lf.meta, list(lf.notes)
    exact_for, made = meta.get("exact_for", ""), meta["method"]
    other = []
    if m != made:
        other.append(f"method {m} (the latents were made with {made})")
    if not (sigmas is lf.sigmas or (sigmas.shape == lf.sigmas.shape
                                    and torch.equal(sigmas.detach().cpu().to(torch.float64), lf.sigmas))):
        other.append(f"another grid ({len(sigmas) - 1} steps; the latents' own is {meta.get('grid') or 'unnamed'} "
                     f"with {len(lf.sigmas) - 1})")
    if meta.get("condition_sha256") != condition_sha256:
        other.append("another condition (condition_sha256 differs)")
    if guidance is not None and "guidance" in meta and float(meta["guidance"]) != float(guidance):
        other.append(f"guidance {guidance:g} (the latents were made with {float(meta['guidance']):g})")
    if negative_sha256 is not None and meta.get("negative_sha256", "") != negative_sha256:
        other.append("another negative condition (negative_sha256 differs)")
    exactable = bool(exact_for) or bool(lf.state)
    if other:
        msg = (f"{'WARNING: NOT EXACT: ' if exactable else 'note: '}decoding with {'; '.join(other)}: an ordinary "
               "decode, not the inverse of the encode")
        if strict:
            raise ValueError(f"method: {msg}")
        return "", [*notes, msg]
    if not exactable or (not exact_for and not state_used):
        if lf.state and not state_used:
            notes.append(f"note: {made} latents decoded without their partner state: an ordinary solve, not exact")
        return "", notes
    diff = environment_differences(lf, device, model)
    if not state_used:
        if not diff:
            return f", exact inverse ({meta.get('exact_to', 'round-off')})", notes
        notes.append(f"note: decoding on another environment than the encode ({'; '.join(diff)}): {exact_for} is an "
                     "ordinary stable decoder, so expect agreement to about the network's precision, not bit for bit")
        return ", ordinary decode of an exact latent (environment differs)", notes
    if diff:
        notes.append(f"WARNING: NOT EXACT: this reversible latent was made on another environment ({'; '.join(diff)}); "
                     "reversible_heun's retrace amplifies any change in ε (a relative 1e-7 moves pixels by whole grey "
                     "levels), so the images can differ from the encoded ones. Re-encode here, or use an exact latent")
        return ", reversible retrace on another environment: NOT exact", notes
    return ", exact inverse (reversible pair, same environment)", notes
