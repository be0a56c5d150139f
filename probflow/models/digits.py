"""The shipped digits ε-model: its noise table, its checkpoint format, and loading it.

The network is `probflow.models.unet.UNet`, trained by `probflow.digits.train` (DDPM objective on
scikit-learn's 8×8 digits in [−1, 1]); a checkpoint is a folder with `digits.safetensors` (the state_dict,
the UNet config as metadata) and `digits.json` (the card: recipe, metrics, the weights' sha256).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from probflow.models.adapters import (
    MAX_PARAMETERS,
    DiscreteTimeModel,
    check_state_dict,
    count_parameters,
    loads_json,
    read_json_object,
)
from probflow.models.unet import UNet
from probflow.schedules import Schedule, linear

__all__ = ["WEIGHTS", "CONFIG", "LEVELS", "schedule", "as_model", "load_model"]

WEIGHTS = Path(__file__).resolve().parent / "weights"
# The shipped model's recipe: network size and optimisation (the train command's defaults).
CONFIG = {"channels": [32, 64], "blocks": 2, "batch": 128, "lr": 2e-3, "warmup": 100, "ema": 0.999,
          "steps": 2000, "T": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


# scikit-learn's digits have 17 grey levels p ∈ {0 … 16}, stored as x = p/8 − 1.
LEVELS = 17


def schedule() -> Schedule:
    """The digits model's table: DDPM's linear β from 1e-4 to 0.02, T = 1000."""
    return linear(CONFIG["T"], CONFIG["beta_start"], CONFIG["beta_end"])


def as_model(net: UNet, name: str = "digits", card: dict | None = None) -> DiscreteTimeModel:
    """The trained network as an ε-model over σ (float32, linear T = 1000 table, ε-prediction)."""
    net = net.float().eval().requires_grad_(False)
    model = DiscreteTimeModel(net, schedule(), "epsilon", sample_shape=(1, 8, 8), name=name,
                              model_dtype=torch.float32, card=card)
    model.levels = LEVELS  # the data's grey levels (bits/dim: `probflow likelihood` reads them from here)
    return model


def _read_card(cpath: Path) -> dict:
    card = read_json_object(cpath, "card")
    if not isinstance(card.get("fingerprint", ""), (str, type(None))):
        raise ValueError(f"card: {cpath}: fingerprint: expected a sha256 hex string")
    return card


def _unet_config(meta: dict | None, wpath: Path) -> dict:
    """The UNet constructor arguments stored in the checkpoint's metadata, checked against `UNet`'s."""
    if not meta or "unet_config" not in meta:
        raise ValueError(f"weights: {wpath} has no unet_config metadata (not a digits checkpoint)")
    cfg = loads_json(meta["unet_config"], f"weights: unet_config in {wpath}")
    if not isinstance(cfg, dict):
        raise ValueError(f"weights: unet_config in {wpath} is not a JSON object")
    known = [k for k in inspect.signature(UNet).parameters]
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"weights: unet_config in {wpath} has unknown keys {unknown}; expected some of {known}")
    if cfg.get("in_channels", 1) != 1:
        raise ValueError(f"weights: unet_config in {wpath}: in_channels: expected 1 (8×8 grayscale digits), got "
                         f"{cfg.get('in_channels')!r}")
    ch = cfg.get("channels", CONFIG["channels"])
    if isinstance(ch, list) and 8 % 2 ** min(len(ch) - 1, 4):
        raise ValueError(f"weights: unet_config in {wpath}: channels: {len(ch)} resolutions do not fit 8×8 images "
                         "(at most 4: each halves the side)")
    return cfg


def load_model(folder: str | os.PathLike | None = None,
               max_parameters: int | None = MAX_PARAMETERS) -> DiscreteTimeModel:
    """The digits model from `folder` (default: the shipped `probflow/models/weights`), float32, as a
    DiscreteTimeModel; checks the card (a JSON object), the network config (known keys, at most
    `max_parameters` parameters, counted before anything is allocated), the weights' keys, shapes and
    finiteness, and the card's sha256 fingerprint against the weights — each a one-line ValueError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = WEIGHTS if folder is None else Path(folder)
    wpath, cpath = folder / "digits.safetensors", folder / "digits.json"
    for p in (wpath, cpath):
        if not p.is_file():
            raise FileNotFoundError(f"digits model: {p} is missing (train one with `probflow train digits`)")
    card = _read_card(cpath)
    try:
        with safe_open(str(wpath), framework="pt") as f:
            meta = f.metadata()
    except Exception as e:
        raise ValueError(f"weights: could not read {wpath} (corrupt or not a digits checkpoint): {e}") from None
    cfg = _unet_config(meta, wpath)
    count_parameters(lambda: UNet(**cfg), f"weights: unet_config in {wpath}", max_parameters)
    try:
        sd = load_file(str(wpath))
    except Exception as e:
        raise ValueError(f"weights: could not read {wpath} (corrupt or not a digits checkpoint): {e}") from None
    net = UNet(**cfg)
    check_state_dict(net, sd, str(wpath))
    net.load_state_dict(sd, strict=True)
    model = as_model(net, "digits", card)
    want = card.get("fingerprint")
    if want and want != model.fingerprint:
        raise ValueError(f"weights: {wpath} does not match the fingerprint in its card {cpath}")
    return model
