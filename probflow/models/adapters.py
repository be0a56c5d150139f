"""Discrete-time (DDPM) networks as ε-models over continuous σ (docs/MATH.md §5), and diffusers checkpoints
loaded from a local folder.

A network `net(x, t)` trained on a table ᾱ_t, t = 0 … T−1, sees x in the model's variable
x = sqrt(ᾱ) x_0 + sqrt(1 − ᾱ) ε (docs/MATH.md §1). A solver of Eq. 12 asks for ε at any σ, so
`DiscreteTimeModel` maps σ → t(σ) (`Schedule.t`: piecewise linear in log σ, exact at the table's σ_t,
clamped to [0, T−1]) and converts the network's prediction to ε. σ is the only public time variable;
integer timesteps live here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probflow.schedules import Schedule, cosine, from_betas, linear, scaled_linear

__all__ = ["DiscreteTimeModel", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_PARAMETERS", "MAX_SAMPLE_PIXELS",
           "MAX_TIMESTEPS", "PREDICTION_TYPES", "check_diffusers_config", "check_state_dict", "count_parameters",
           "fingerprint", "from_diffusers", "json_depth", "loads_json", "read_json_object", "schedule_from_config"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def fingerprint(weights: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 (hex) of a state_dict: for each key in sorted order, the key, dtype, shape and the raw bytes
    of the contiguous CPU tensor. Independent of device, of insertion order and of the file format."""
    sd = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(f"|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


class DiscreteTimeModel:
    """ε(x, σ) from a network net(x, t) trained on the DDPM table of `schedule` (docs/MATH.md §5).

    With ᾱ = 1/(1 + σ²), a = sqrt(ᾱ) = 1/sqrt(1 + σ²) and b = sqrt(1 − ᾱ) = σ/sqrt(1 + σ²), so that
    x = a·x_0 + b·ε in the model's variable x, the network's output o at t = t(σ) becomes ε exactly:

        "epsilon":       ε = o
        "v_prediction":  o = v = a·ε − b·x_0    ⇒   ε = a·v + b·x          (a² + b² = 1)
        "sample":        o = x̂_0                 ⇒   ε = (x − a·x̂_0)/b      (= (x̄ − x̂_0)/σ, x̄ = x/a)

    "sample" is singular at σ = 0 (b = 0): below the table's σ_0 the conversion uses σ_0 (the network is
    evaluated at t = 0 there anyway). The conversion uses the σ that was asked for.

    t(σ) is a float in [0, T−1], broadcast to shape (B,) and passed to the network in float32 (float64 when
    x is float64); σ below σ_0, σ = 0 included, maps to t = 0. With `round_t=True` t is rounded to the
    nearest integer (an int64 tensor) for networks that only accept integer timesteps: the network then
    sees the noise level σ_{round(t)} instead of σ, an error of at most half a table step in t, i.e. an
    error in log σ of up to ½·|Δlog σ| between neighbouring entries (on the linear T = 1000 table: 0.005 near
    σ_max, 0.20 between σ_0 and σ_1, a 22 % error in σ), which makes ε piecewise constant in σ and spoils the
    order of convergence of higher-order solvers on fine grids; it is exact at the table's own σ_t (DDIM grids).

    Attributes used elsewhere: `schedule`, `net`, `prediction_type`, `sample_shape` ((C, H, W) or None),
    `name`, `fingerprint` (sha256 of the weights when `net` is an nn.Module, else None), `model_dtype`
    (the dtype the network runs in: x is cast to it here and ε cast back, while σ and t(σ) are computed in
    float64, so there is no need to give it to `DDIMField`) and `data_range` ((−1.0, 1.0)).
    """

    def __init__(
        self,
        net: Callable[[Tensor, Tensor], Tensor],
        schedule: Schedule,
        prediction_type: str = "epsilon",
        *,
        round_t: bool = False,
        sample_shape: tuple[int, ...] | None = None,
        name: str = "",
        model_dtype: torch.dtype | None = None,
        data_range: tuple[float, float] = (-1.0, 1.0),
        card: dict | None = None,
    ) -> None:
        if not callable(net):
            raise TypeError(f"net: expected a callable net(x, t), got {type(net).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a probflow Schedule, got {type(schedule).__name__}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.net, self.schedule, self.prediction_type = net, schedule, prediction_type
        self.round_t = bool(round_t)
        self.sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else None
        self.name = str(name)
        if model_dtype is None and isinstance(net, nn.Module):
            p = next(iter(net.parameters()), None)
            model_dtype = p.dtype if p is not None else None
        self.model_dtype = model_dtype
        self.data_range = (float(data_range[0]), float(data_range[1]))
        self.fingerprint = fingerprint(net) if isinstance(net, nn.Module) else None
        self.card = card

    def timestep(self, sigma: Tensor | float) -> Tensor:
        """t(σ) as passed to the network (float64 here; rounded when `round_t`)."""
        t = self.schedule.t(torch.as_tensor(sigma, dtype=torch.float64).detach().cpu())
        return torch.round(t) if self.round_t else t

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """ε(x, σ) for a batch x (B, *S) in the model's variable and a 0-d σ."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim != 0:
            raise ValueError(f"sigma: expected one noise level (0-d tensor) for the batch, "
                             f"got shape {tuple(sigma.shape)}")
        if not isinstance(x, Tensor) or x.ndim < 1 or (self.sample_shape is not None
                                                         and tuple(x.shape[1:]) != self.sample_shape):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a batch of shape (B, {', '.join(map(str, self.sample_shape or ('...',)))}) "
                             f"for {self.name or 'this model'}, got {got}")
        t = self.timestep(sigma)
        if self.round_t:
            tb = t.to(torch.int64).to(x.device).expand(x.shape[0])
        else:
            tb = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32).to(x.device).expand(x.shape[0])
        xin = x if self.model_dtype is None else x.to(self.model_dtype)
        out = self.net(xin, tb)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise TypeError(f"net: returned {type(out).__name__ if not isinstance(out, Tensor) else out.dtype}, "
                            "expected a floating-point tensor")
        out = out.to(x.dtype)
        if out.shape != x.shape:
            raise ValueError(f"net: returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}")
        if self.prediction_type == "epsilon":
            return out
        s = float(sigma)
        if self.prediction_type == "sample":
            s = max(s, self.schedule.sigma_min)
        a = (1.0 + s * s) ** -0.5
        b = s * a
        if self.prediction_type == "v_prediction":
            return a * out + b * x
        return (x - a * out) / b

    def to(self, device: torch.device | str) -> DiscreteTimeModel:
        """Move the network to `device` (in place; returns self). ε follows x's device."""
        if isinstance(self.net, nn.Module):
            self.net.to(device)
        return self

    def __repr__(self) -> str:
        return (f"DiscreteTimeModel(name={self.name!r}, schedule={self.schedule.name!r}, T={self.schedule.T}, "
                f"prediction_type={self.prediction_type!r}, sample_shape={self.sample_shape})")


MAX_PARAMETERS = 10**9  # default bound on a checkpoint's network size (4 GB in float32), checked before building it
MAX_TIMESTEPS = 100_000  # default bound on a scheduler config's table length T


def _config_number(config: Mapping[str, Any], key: str, default: float) -> float:
    v = config.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"scheduler config: {key}: expected a finite number, got {v!r}")
    return float(v)


def _config_timesteps(config: Mapping[str, Any], max_timesteps: int | None) -> int:
    T = _config_number(config, "num_train_timesteps", 1000)  # noqa: N806
    if T != int(T) or T < 2:
        raise ValueError(f"scheduler config: num_train_timesteps: expected an integer >= 2, got "
                         f"{config.get('num_train_timesteps')!r}")
    if max_timesteps is not None and T > max_timesteps:
        raise ValueError(f"scheduler config: num_train_timesteps {int(T)} is above the limit of {max_timesteps} "
                         "(max_timesteps=; --no-limits in the CLI)")
    return int(T)


def schedule_from_config(config: Mapping[str, Any], max_timesteps: int | None = MAX_TIMESTEPS) -> Schedule:
    """A probflow Schedule from a diffusers scheduler config (DDPMScheduler/DDIMScheduler keys):
    `beta_schedule` ∈ {linear, scaled_linear, squaredcos_cap_v2} or `trained_betas`, `num_train_timesteps`,
    `beta_start`, `beta_end`. Built in float64 (diffusers builds the same table in float32). Every field is
    checked for its type and range (ValueError naming it); a table longer than `max_timesteps` (None: no
    bound) is refused before it is built."""
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config: expected a JSON object, got {type(config).__name__}")
    T = _config_timesteps(config, max_timesteps)  # noqa: N806
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler config: rescale_betas_zero_snr=True makes σ_max infinite; not supported")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, (list, tuple)) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
            raise ValueError("scheduler config: trained_betas: expected a list of numbers")
        if max_timesteps is not None and len(betas) > max_timesteps:
            raise ValueError(f"scheduler config: trained_betas has {len(betas)} entries, above the limit of "
                             f"{max_timesteps} (max_timesteps=; --no-limits in the CLI)")
        return from_betas(torch.tensor(betas, dtype=torch.float64), "trained_betas")
    kind = config.get("beta_schedule", "linear")
    bs, be = _config_number(config, "beta_start", 1e-4), _config_number(config, "beta_end", 0.02)
    if kind == "linear":
        return linear(T, bs, be)
    if kind == "scaled_linear":
        return scaled_linear(T, bs, be)
    if kind == "squaredcos_cap_v2":
        return cosine(T)
    raise ValueError(f"scheduler config: beta_schedule {kind!r} is not supported; expected linear, scaled_linear "
                     "or squaredcos_cap_v2")


def check_state_dict(net: nn.Module, sd: Mapping[str, Tensor], where: str) -> None:
    """Refuse, in one line, a state_dict with non-tensor or non-finite values, or whose keys or shapes differ
    from the network's (`where`: the file)."""
    own = net.state_dict()
    odd = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if odd:
        raise ValueError(f"weights: {where}: {odd[0]!r} is not a tensor")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"weights: {where} holds NaN or Inf values (in {len(bad)} tensors, e.g. {bad[0]})")
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    for what, items in (("missing key(s)", missing), ("unexpected key(s)", extra),
                        ("shape mismatch(es) (file vs config)", shapes)):
        if items:
            raise ValueError(f"weights: {where} does not match its config: {len(items)} {what}, e.g. "
                             f"{', '.join(items[:2])}")


def count_parameters(build: Callable[[], nn.Module], what: str, max_parameters: int | None) -> int:
    """The parameter count of `build()`, built on the meta device (no memory), refused above `max_parameters`."""
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in build().parameters())
    except Exception as e:  # a bad config raises TypeError/ValueError/AttributeError/… from the constructor
        raise ValueError(f"{what}: cannot build the network from it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if max_parameters is not None and n > max_parameters:
        gib = 4 * n / 2**30
        raise ValueError(f"{what}: the network would have {n:.3g} parameters ({gib:.3g} GiB in float32), "
                         f"above the limit of {max_parameters:.3g} (max_parameters=; --no-limits in the CLI)")
    return n


MAX_SAMPLE_PIXELS = 4096 * 4096  # default bound on a checkpoint's sample_size (height × width), as for images
MAX_BLOCKS = 16  # resolutions of a UNet (len(block_out_channels)); 2^16 is beyond any image side
MAX_LAYERS = 64  # residual layers per block
MAX_CHANNELS = 1 << 16  # channels of one block, and input channels


def _config_int(config: Mapping[str, Any], key: str, default: Any, lo: int, hi: int, where: str) -> int:
    v = config.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where}: {key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def check_diffusers_config(config: Mapping[str, Any], where: str,
                           max_pixels: int | None = MAX_SAMPLE_PIXELS) -> tuple[int, int, int] | None:
    """Bound a UNet2DModel config before anything is built from it (diffusers' defaults where a key is
    absent): at most MAX_BLOCKS resolutions of at most MAX_CHANNELS channels, MAX_LAYERS layers per block,
    as many down and up block types as resolutions, out_channels = in_channels (ε has x's shape), and a
    sample_size of at most `max_pixels` pixels (None: no bound) divisible by 2^(resolutions − 1), the
    network's downsampling. Returns the sample shape (C, H, W), or None when the config has no sample_size."""
    boc = config.get("block_out_channels", (224, 448, 672, 896))
    if (not isinstance(boc, (list, tuple)) or not 1 <= len(boc) <= MAX_BLOCKS
            or not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= MAX_CHANNELS for c in boc)):
        shown = f"{len(boc)} entries" if isinstance(boc, (list, tuple)) and len(boc) > 8 else repr(boc)
        raise ValueError(f"{where}: block_out_channels: expected 1 to {MAX_BLOCKS} integers in [1, {MAX_CHANNELS}], "
                         f"got {shown}")
    for key in ("down_block_types", "up_block_types"):
        v = config.get(key)
        if v is not None and (not isinstance(v, (list, tuple)) or len(v) != len(boc)
                              or not all(isinstance(b, str) for b in v)):
            n = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
            raise ValueError(f"{where}: {key}: expected {len(boc)} block names (one per block_out_channels), got {n}")
    lpb = config.get("layers_per_block", 2)
    for v in (lpb if isinstance(lpb, (list, tuple)) and len(lpb) <= MAX_BLOCKS else [lpb]):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_LAYERS:
            raise ValueError(f"{where}: layers_per_block: expected an integer in [1, {MAX_LAYERS}], got "
                             f"{lpb if not isinstance(lpb, (list, tuple)) else f'a list of {len(lpb)}'}")
    cin = _config_int(config, "in_channels", 3, 1, MAX_CHANNELS, where)
    cout = config.get("out_channels", 3)
    if cout != cin:
        raise ValueError(f"{where}: out_channels: expected {cin} (= in_channels: the network predicts ε of x's "
                         f"shape), got {cout!r}")
    size = config.get("sample_size")
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else ()
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ValueError(f"{where}: sample_size: expected a positive integer or [height, width], got {size!r}")
    if max_pixels is not None and hw[0] * hw[1] > max_pixels:
        raise ValueError(f"{where}: sample_size: {hw[0]}×{hw[1]} = {hw[0] * hw[1]} pixels is above the limit of "
                         f"{max_pixels} (max_pixels=; --no-limits in the CLI)")
    down = 2 ** (len(boc) - 1)
    if hw[0] % down or hw[1] % down:
        raise ValueError(f"{where}: sample_size: {hw[0]}×{hw[1]} does not fit the network's {len(boc)} resolutions "
                         f"(each side must be divisible by 2^{len(boc) - 1} = {down})")
    return (cin, *hw)


class _DiffusersUNet(nn.Module):
    """net(x, t) = unet(x, t).sample, so that the adapter sees a plain tensor function."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


MAX_JSON_BYTES = 1 << 20  # a config, card or latent header larger than 1 MiB is not one probflow wrote
MAX_JSON_DEPTH = 32  # nesting beyond this is refused before parsing (json's recursion would raise RecursionError)


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in a JSON text, strings skipped (linear time, no recursion)."""
    import numpy as np

    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    b = np.frombuffer(bare.encode("utf-8", "replace"), dtype=np.uint8)
    step = np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}"))).astype(np.int64)
    return int(np.cumsum(step).max()) if len(step) else 0


def loads_json(text: str | bytes, what: str, *, max_bytes: int | None = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH):
    """json.loads with its size and nesting bounded first; a one-line ValueError naming `what` otherwise."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not valid JSON: {e}") from None
    if max_bytes is not None and len(text) > max_bytes:
        raise ValueError(f"{what}: {len(text)} characters of JSON, above the limit of {max_bytes}")
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{what}: JSON nested {depth} deep, above the limit of {max_depth}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{what} is not valid JSON: {str(e).splitlines()[0]}") from None


def read_json_object(path: Path, what: str, max_bytes: int | None = MAX_JSON_BYTES) -> dict:
    """The JSON object in `path` (its size checked before it is read, its nesting before it is parsed);
    a one-line ValueError naming `what` and the file otherwise."""
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{what}: {path} is {size} bytes, above the limit of {max_bytes} for a JSON file")
    with open(path, "rb") as f:
        cfg = loads_json(f.read(), f"{what}: {path}", max_bytes=max_bytes)
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: {path} does not hold a JSON object (got {type(cfg).__name__})")
    return cfg


def _load_weights(folder: Path) -> dict[str, Tensor]:
    """A state_dict from diffusion_pytorch_model.safetensors, else from the .bin with weights_only=True."""
    st = folder / "diffusion_pytorch_model.safetensors"
    binf = folder / "diffusion_pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu")
        except Exception as e:  # safetensors raises its own error type for a corrupt header or truncated data
            raise ValueError(f"weights: could not read {st} (corrupt or truncated safetensors file): {e}") from e
    if binf.is_file():
        try:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"weights: could not read {binf} with torch.load(weights_only=True): {e}") from e
        if not isinstance(sd, dict):
            raise ValueError(f"weights: {binf} does not hold a state_dict")
        return sd
    raise ValueError(f"weights: no diffusion_pytorch_model.safetensors (or .bin) in {folder}")


def from_diffusers(
    folder: str | os.PathLike,
    *,
    prediction_type: str | None = None,
    schedule: Schedule | None = None,
    round_t: bool = False,
    max_parameters: int | None = MAX_PARAMETERS,
    max_timesteps: int | None = MAX_TIMESTEPS,
    max_pixels: int | None = MAX_SAMPLE_PIXELS,
) -> DiscreteTimeModel:
    """Load a diffusers `UNet2DModel` and its scheduler config from a LOCAL folder as a DiscreteTimeModel.

    Layouts (diffusers' `save_pretrained`): a pipeline folder with `unet/config.json` + weights and
    `scheduler/scheduler_config.json` (e.g. a downloaded google/ddpm-cifar10-32), or a UNet folder with
    `config.json` + weights and optionally `scheduler_config.json` beside it. The schedule and
    `prediction_type` come from the scheduler config (`schedule_from_config`) unless given here. The
    network is built from its config (`from_config`, no hub look-up) and the weights are read with
    safetensors, or `torch.load(weights_only=True)` for a .bin: no network access, no arbitrary unpickling.
    Runs in float32 on the CPU, in eval mode. Before anything is allocated, the network's parameter count
    (built on the meta device) and the table length are checked against `max_parameters` / `max_timesteps`,
    and the config's sizes against `check_diffusers_config` (`max_pixels` for sample_size) (None: no bound);
    every config field, and the weights' keys and shapes, fail as a one-line ValueError.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"folder: {str(folder)!r} is not an existing local folder")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"folder: no config.json in {root} or {root / 'unet'} (diffusers save_pretrained layout)")
    config = read_json_object(unet_dir / "config.json", "config")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"config: only UNet2DModel checkpoints are supported, {unet_dir / 'config.json'} is {cls!r}")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ValueError("config: class-conditional UNet2DModel checkpoints are not supported")
    shape = check_diffusers_config(config, f"config: {unet_dir / 'config.json'}", max_pixels)
    sched_cfg: dict = {}
    for p in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"):
        if p.is_file():
            sched_cfg = read_json_object(p, "scheduler config")
            break
    else:
        if schedule is None:
            raise ValueError(f"scheduler config: no scheduler/scheduler_config.json in {root}; pass schedule=")
    sched = schedule if schedule is not None else schedule_from_config(sched_cfg, max_timesteps)
    pred = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    if not isinstance(pred, str):
        raise ValueError(f"scheduler config: prediction_type: expected one of {PREDICTION_TYPES}, got {pred!r}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the probe build would repeat diffusers' notes on ignored keys
    try:
        count_parameters(lambda: UNet2DModel.from_config(config), f"config: {unet_dir / 'config.json'}", max_parameters)
    finally:
        dlogging.set_verbosity(level)
    unet = UNet2DModel.from_config(config)
    sd = _load_weights(unet_dir)
    check_state_dict(unet, sd, str(unet_dir))
    try:
        unet.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights: the state_dict in {unet_dir} does not match its config.json: "
                         f"{str(e).splitlines()[0]}") from None
    net = _DiffusersUNet(unet.float().eval()).requires_grad_(False)
    return DiscreteTimeModel(net, sched, pred, round_t=round_t, sample_shape=shape, name=root.resolve().name,
                             model_dtype=torch.float32)
