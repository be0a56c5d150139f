"""Discrete-time (DDPM) networks as ε-models over continuous σ (MATH.md §5), and diffusers checkpoints
loaded from a local folder.

A network `net(x, t)` trained on a table ᾱ_t, t = 0 … T−1, sees x in the model's variable
x = sqrt(ᾱ) x_0 + sqrt(1 − ᾱ) ε (MATH.md §1). A solver of Eq. 12 asks for ε at any σ, so
`DiscreteTimeModel` maps σ → t(σ) (`Schedule.t`: piecewise linear in log σ, exact at the table's σ_t,
clamped to [0, T−1]) and converts the network's prediction to ε. σ is the only public time variable;
integer timesteps live here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probflow.schedules import Schedule, cosine, from_betas, linear, scaled_linear

__all__ = ["DiscreteTimeModel", "PREDICTION_TYPES", "fingerprint", "from_diffusers", "schedule_from_config"]

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
    """ε(x, σ) from a network net(x, t) trained on the DDPM table of `schedule` (MATH.md §5).

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
        t = self.timestep(sigma)
        if self.round_t:
            tb = t.to(torch.int64).to(x.device).expand(x.shape[0])
        else:
            tb = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32).to(x.device).expand(x.shape[0])
        xin = x if self.model_dtype is None else x.to(self.model_dtype)
        out = self.net(xin, tb).to(x.dtype)
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


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """A probflow Schedule from a diffusers scheduler config (DDPMScheduler/DDIMScheduler keys):
    `beta_schedule` ∈ {linear, scaled_linear, squaredcos_cap_v2} or `trained_betas`, `num_train_timesteps`,
    `beta_start`, `beta_end`. Built in float64 (diffusers builds the same table in float32)."""
    T = int(config.get("num_train_timesteps", 1000))  # noqa: N806
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler config: rescale_betas_zero_snr=True makes σ_max infinite; not supported")
    if config.get("trained_betas") is not None:
        return from_betas(torch.tensor(config["trained_betas"], dtype=torch.float64), "trained_betas")
    kind = config.get("beta_schedule", "linear")
    bs, be = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return linear(T, bs, be)
    if kind == "scaled_linear":
        return scaled_linear(T, bs, be)
    if kind == "squaredcos_cap_v2":
        return cosine(T)
    raise ValueError(f"scheduler config: beta_schedule {kind!r} is not supported; expected linear, scaled_linear "
                     "or squaredcos_cap_v2")


class _DiffusersUNet(nn.Module):
    """net(x, t) = unet(x, t).sample, so that the adapter sees a plain tensor function."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t).sample


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: {path} does not hold a JSON object")
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
) -> DiscreteTimeModel:
    """Load a diffusers `UNet2DModel` and its scheduler config from a LOCAL folder as a DiscreteTimeModel.

    Layouts (diffusers' `save_pretrained`): a pipeline folder with `unet/config.json` + weights and
    `scheduler/scheduler_config.json` (e.g. a downloaded google/ddpm-cifar10-32), or a UNet folder with
    `config.json` + weights and optionally `scheduler_config.json` beside it. The schedule and
    `prediction_type` come from the scheduler config (`schedule_from_config`) unless given here. The
    network is built from its config (`from_config`, no hub look-up) and the weights are read with
    safetensors, or `torch.load(weights_only=True)` for a .bin: no network access, no arbitrary unpickling.
    Runs in float32 on the CPU, in eval mode.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"folder: {str(folder)!r} is not an existing local folder")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise ValueError(f"folder: no config.json in {root} or {root / 'unet'} (diffusers save_pretrained layout)")
    config = _read_json(unet_dir / "config.json", "config")
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"config: only UNet2DModel checkpoints are supported, {unet_dir / 'config.json'} is {cls!r}")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise ValueError("config: class-conditional UNet2DModel checkpoints are not supported")
    sched_cfg: dict = {}
    for p in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"):
        if p.is_file():
            sched_cfg = _read_json(p, "scheduler config")
            break
    else:
        if schedule is None:
            raise ValueError(f"scheduler config: no scheduler/scheduler_config.json in {root}; pass schedule=")
    sched = schedule if schedule is not None else schedule_from_config(sched_cfg)
    pred = prediction_type or sched_cfg.get("prediction_type", "epsilon")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(config)
    sd = _load_weights(unet_dir)
    try:
        unet.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights: the state_dict in {unet_dir} does not match its config.json: {e}") from e
    net = _DiffusersUNet(unet.float().eval()).requires_grad_(False)
    size = config.get("sample_size")
    shape = None
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(config.get("in_channels", 3)), *hw)
    return DiscreteTimeModel(net, sched, pred, round_t=round_t, sample_shape=shape, name=root.resolve().name,
                             model_dtype=torch.float32)
