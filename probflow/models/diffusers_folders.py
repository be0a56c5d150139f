"""Conditional diffusers folders, loaded offline: class-conditional UNets, text-conditioned pipelines, latent
diffusion with an AutoencoderKL — each as ONE guided ε-model of a fixed condition (`probflow.models.conditional`).

Kinds of folder (diffusers `save_pretrained` layout, unet/ + scheduler/ at least):
  class-conditional  `UNet2DModel` or `UNet2DConditionModel` with `num_class_embeds`; the condition is a class
                     index, the null class (for w ≠ 1) comes from `negative=` or the folder's card.json
                     ("null_class"); `classes` names in card.json may be used instead of indices.
  text-conditioned   `UNet2DConditionModel` with cross-attention; the condition is encoder hidden states
                     (1, L, cross_attention_dim): from `prompt=` through the folder's text_encoder/ and tokenizer/
                     (needs `transformers`), or from `prompt_embeds=` (a tensor, or a safetensors file holding
                     `prompt_embeds` and optionally `negative_prompt_embeds`). The negative condition defaults to
                     the empty prompt's embedding, as in diffusers' pipelines.
  latent diffusion   any of the above with vae/ (AutoencoderKL): the ε-model lives on latents, and
                     `model.autoencoder` maps images to latents (encoder mean × scaling_factor, after
                     subtracting shift_factor when the config has one) and back (the decoder).
The scheduler config decides the σ table, the prediction type (epsilon / v_prediction / sample);
the VAE config the scaling. Every weight file is read with safetensors (or torch.load(weights_only=True)).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from probflow.models.adapters import (
    MAX_PARAMETERS,
    MAX_TIMESTEPS,
    PREDICTION_TYPES,
    _load_weights,
    check_state_dict,
    count_parameters,
    read_json_object,
    schedule_from_config,
)
from probflow.models.conditional import check_guidance, guided_model

__all__ = ["is_conditional_folder", "load_conditional", "Autoencoder", "read_prompt_embeds", "classic_attention"]

_UNETS = ("UNet2DModel", "UNet2DConditionModel")


def _unet_dir(root: Path) -> Path:
    return root / "unet" if (root / "unet" / "config.json").is_file() else root


def is_conditional_folder(folder: str | os.PathLike) -> bool:
    """True for a folder this module loads: a UNet with class embeddings or cross-attention, or a vae/."""
    root = Path(folder)
    cfg_path = _unet_dir(root) / "config.json"
    if not cfg_path.is_file():
        return False
    cfg = read_json_object(cfg_path, "config")
    return bool(cfg.get("num_class_embeds") or cfg.get("_class_name") == "UNet2DConditionModel"
                or (root / "vae" / "config.json").is_file())


def _build(cls, config: dict, folder: Path, what: str, max_parameters: int | None) -> nn.Module:
    """`cls.from_config(config)` with the weights of `folder`, checked before and after (adapters' rules)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        count_parameters(lambda: cls.from_config(config), f"{what}: {folder / 'config.json'}", max_parameters)
        net = cls.from_config(config)
    finally:
        dlogging.set_verbosity(level)
    sd = _load_weights(folder)
    check_state_dict(net, sd, str(folder))
    net.load_state_dict(sd, strict=True)
    return net.float().eval().requires_grad_(False)


class Autoencoder:
    """Images ↔ latents of a diffusers AutoencoderKL: encode(x) = (mean of q(z|x) − shift) × scale,
    decode(z) = decoder(z / scale + shift). x in [−1, 1], (B, C, H, W); runs in float32, returns x's dtype."""

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float = 0.0) -> None:
        self.vae, self.scaling_factor, self.shift_factor = vae, float(scaling_factor), float(shift_factor)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        mean = self.vae.encode(x.to(torch.float32)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(x.dtype)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode((z.to(torch.float32) / self.scaling_factor) + self.shift_factor).sample.to(z.dtype)


def read_prompt_embeds(path: str | os.PathLike, name: str = "prompt_embeds") -> dict[str, Tensor]:
    """The tensors of a prompt-embedding file: `prompt_embeds` and optionally `negative_prompt_embeds`, each
    (L, D) or (1, L, D). A safetensors file, or a torch file read with weights_only=True holding a tensor or a
    dict of those names; shapes are checked against the UNet's cross-attention width by the caller."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{name}: {str(path)!r} is not a file (expected a safetensors or torch file with "
                         "'prompt_embeds')")
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - safetensors and torch raise several types for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{name}: could not read {p} ({first})") from None
    sd = {"prompt_embeds": obj} if isinstance(obj, Tensor) else obj
    if not isinstance(sd, dict) or not isinstance(sd.get("prompt_embeds"), Tensor):
        keys = sorted(map(str, sd)) if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{name}: {p} holds no 'prompt_embeds' tensor (found {keys}; expected a tensor or a "
                         "dict with 'prompt_embeds' and optionally 'negative_prompt_embeds')")
    neg = sd.get("negative_prompt_embeds")
    if neg is not None and not isinstance(neg, Tensor):
        raise ValueError(f"{name}: {p}: 'negative_prompt_embeds' is not a tensor")
    return {k: v for k, v in sd.items() if k in ("prompt_embeds", "negative_prompt_embeds")}


def _embedding(e, dim: int, name: str) -> Tensor:
    if not isinstance(e, Tensor):
        raise ValueError(f"{name}: expected a tensor of shape (L, {dim}) or (1, L, {dim}), got {type(e).__name__}")
    e = e[None] if e.ndim == 2 else e
    if e.ndim != 3 or e.shape[0] != 1 or e.shape[2] != dim or e.shape[1] < 1 or not e.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor of shape (L, {dim}) or (1, L, {dim}) (the UNet's "
                         f"cross_attention_dim is {dim}), got {tuple(e.shape)} {e.dtype}")
    if not torch.isfinite(e).all():
        raise ValueError(f"{name}: holds NaN or Inf values")
    return e.to(torch.float32)


def _encode_prompt(root: Path, prompt: str, name: str) -> Tensor:
    """(1, L, D) last hidden states of the folder's text encoder for `prompt` (diffusers' tokenisation:
    padding to model_max_length, truncation)."""
    if not isinstance(prompt, str):
        raise ValueError(f"{name}: expected a string, got {type(prompt).__name__}")
    if not (root / "text_encoder" / "config.json").is_file() or not (root / "tokenizer").is_dir():
        raise ValueError(f"{name}: {root} has no text_encoder/ and tokenizer/; pass prompt_embeds= instead")
    try:
        import transformers  # noqa: F401
    except Exception:
        raise ValueError(f"{name}: encoding a prompt needs the `transformers` package, which is not installed; "
                         "pass prompt_embeds= (a safetensors file) instead") from None
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    kw = {"local_files_only": True, "use_safetensors": True}
    try:  # transformers 5 would otherwise ask for the optional `kernels` package
        enc = CLIPTextModel.from_pretrained(str(root / "text_encoder"), use_kernels=False, **kw)
    except TypeError:
        enc = CLIPTextModel.from_pretrained(str(root / "text_encoder"), **kw)
    enc = enc.float().eval()
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids)[0].to(torch.float32)


def _class_index(c, n: int, names: list[str], name: str) -> int:
    if isinstance(c, str) and c in names:
        return names.index(c)
    if isinstance(c, str) and c.strip().lstrip("-").isdigit():
        c = int(c)
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n:
        hint = f" or one of the names {names}" if names else ""
        raise ValueError(f"{name}: unknown class {c!r}; expected an integer in 0 … {n - 1}{hint}")
    return int(c)


def _class_condition(cfg: dict, card: dict, class_label, negative, guidance: float):
    n = int(cfg["num_class_embeds"])
    names = [str(s) for s in card.get("classes", [])]
    null = card.get("null_class")
    if class_label is None:
        raise ValueError(f"class_label: this model is class-conditional ({n} class embeddings); pass a class")
    k = _class_index(class_label, n, names, "class_label")
    if null is not None and k == null and negative is None and guidance != 1.0:
        pass  # guiding the null class against itself is allowed (it is ε_∅)
    cond = {"class_labels": torch.tensor([k], dtype=torch.int64)}
    neg = negative if negative is not None else null
    if neg is None:
        if guidance != 1.0:
            raise ValueError("negative: this folder does not name a null class (card.json 'null_class'); pass the "
                             "class to guide against (negative=, --negative) or use guidance 1")
        return cond, None
    return cond, {"class_labels": torch.tensor([_class_index(neg, n, [], "negative")], dtype=torch.int64)}


def _text_condition(root: Path, cfg: dict, prompt, prompt_embeds, negative, guidance: float):
    dim = int(cfg.get("cross_attention_dim") or 0)
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("prompt: pass prompt or prompt_embeds, not both")
    neg_emb = None
    if isinstance(prompt_embeds, (str, os.PathLike)):
        sd = read_prompt_embeds(prompt_embeds)
        prompt_embeds, neg_emb = sd["prompt_embeds"], sd.get("negative_prompt_embeds")
    if prompt_embeds is not None:
        cond = _embedding(prompt_embeds, dim, "prompt_embeds")
    elif prompt is not None:
        cond = _encode_prompt(root, prompt, "prompt")
    else:
        raise ValueError("prompt: this model is text-conditioned; pass prompt= or prompt_embeds=")
    if isinstance(negative, Tensor):
        neg_emb = negative
    elif isinstance(negative, str):
        neg_emb = _encode_prompt(root, negative, "negative")
    elif negative is not None:
        raise ValueError(f"negative: expected a prompt string or an embedding tensor, got {type(negative).__name__}")
    if neg_emb is None and guidance != 1.0:
        if prompt_embeds is not None and not (root / "text_encoder" / "config.json").is_file():
            raise ValueError("negative: guidance ≠ 1 needs a negative embedding (negative_prompt_embeds in the "
                             "prompt_embeds file, or negative=) when the folder has no text encoder")
        neg_emb = _encode_prompt(root, "", "negative")
    unc = None
    if neg_emb is not None:
        neg_emb = _embedding(neg_emb, dim, "negative")
        if neg_emb.shape != cond.shape:
            raise ValueError(f"negative: expected the prompt embedding's shape {tuple(cond.shape)}, got "
                             f"{tuple(neg_emb.shape)}")
        unc = {"encoder_hidden_states": neg_emb}
    return {"encoder_hidden_states": cond}, unc


def load_conditional(
    folder: str | os.PathLike,
    *,
    class_label: int | str | None = None,
    prompt: str | None = None,
    prompt_embeds: Tensor | str | os.PathLike | None = None,
    negative: int | str | Tensor | None = None,
    guidance: float = 1.0,
    max_parameters: int | None = MAX_PARAMETERS,
    max_timesteps: int | None = MAX_TIMESTEPS,
):
    """The guided ε-model of a conditional diffusers folder (module docstring) under one fixed condition.

    class_label: a class index (or name from card.json) for class-conditional UNets; prompt / prompt_embeds:
    the text condition ((L, D) or (1, L, D) tensor, or a safetensors file); negative: the condition guided
    against (a class, a prompt or an embedding; default: the card's null class / the empty prompt);
    guidance: w (finite). Each bad argument is a one-line ValueError naming it."""
    w = check_guidance(guidance)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"folder: {str(folder)!r} is not an existing local folder")
    udir = _unet_dir(root)
    cfg = read_json_object(udir / "config.json", "config")
    cls_name = cfg.get("_class_name", "UNet2DModel")
    if cls_name not in _UNETS:
        raise ValueError(f"config: {udir / 'config.json'} is {cls_name!r}; expected one of {_UNETS}")
    card = read_json_object(root / "card.json", "card") if (root / "card.json").is_file() else {}
    sched_path = next((p for p in (root / "scheduler" / "scheduler_config.json", udir / "scheduler_config.json")
                       if p.is_file()), None)
    if sched_path is None:
        raise ValueError(f"scheduler config: no scheduler/scheduler_config.json in {root}")
    scfg = read_json_object(sched_path, "scheduler config")
    schedule = schedule_from_config(scfg, max_timesteps)
    pred = scfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"scheduler config: prediction_type: expected one of {PREDICTION_TYPES}, got {pred!r}")
    blocks = list(cfg.get("down_block_types", [])) + [cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"]
    text = cls_name == "UNet2DConditionModel" and bool(cfg.get("cross_attention_dim")) and any(
        "CrossAttn" in str(b) for b in blocks)
    cond, unc = {}, None
    if cfg.get("num_class_embeds"):
        cond, unc = _class_condition(cfg, card, class_label, negative if not text else None, w)
    elif class_label is not None:
        raise ValueError("class_label: this model has no class embeddings")
    if text:
        tc, tu = _text_condition(root, cfg, prompt, prompt_embeds, negative, w)
        cond.update(tc)
        unc = None if tu is None else {**(unc or {k: v for k, v in cond.items() if k != "encoder_hidden_states"}), **tu}
    elif prompt is not None or prompt_embeds is not None:
        raise ValueError("prompt: this model is not text-conditioned (no cross-attention)")
    if not cond:
        raise ValueError(f"folder: {root} holds an unconditional model; load it with probflow.models.load")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    unet = _build(getattr(diffusers, cls_name), cfg, udir, "config", max_parameters)
    if cls_name == "UNet2DConditionModel" and "encoder_hidden_states" not in cond:
        unet = _NoText(unet)
    size = cfg.get("sample_size")
    hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (list, tuple)) else None
    shape = (int(cfg.get("in_channels", 4)), *hw) if hw else None
    model = guided_model(unet, schedule, pred, cond, unc, w, sample_shape=shape, name=root.resolve().name,
                         card=card or None)
    if (root / "vae" / "config.json").is_file():
        vcfg = read_json_object(root / "vae" / "config.json", "vae config")
        vae = _build(diffusers.AutoencoderKL, vcfg, root / "vae", "vae config", max_parameters)
        model.autoencoder = Autoencoder(vae, vcfg.get("scaling_factor", 0.18215), vcfg.get("shift_factor") or 0.0)
    if card.get("classes"):
        model.classes = list(card["classes"])
    return model


class _NoText(nn.Module):
    """A UNet2DConditionModel without cross-attention called as unet(x, t, class_labels=…):
    encoder_hidden_states=None."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, **kw: Mapping) -> object:
        return self.unet(x, t, None, **kw)


def classic_attention(model) -> None:
    """Switch the model's diffusers UNet (in place) to diffusers' classic attention processor (softmax(QKᵀ)V
    with plain matmuls) instead of torch's scaled_dot_product_attention, whose CPU kernel has no forward-mode
    AD: forward-mode tangents (the Newton fallback of `probflow.inversion`) then work. The values are the same
    attention, to float32 round-off."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in model.net.unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
