"""ε-models: the protocol, analytic models with exact ε, discrete-time networks, and loading by name.

The protocol (`probflow.field.EpsModel`): `model(x, sigma) -> eps` with x a batch (B, …) in the model's own
variable x = x̄/sqrt(1+σ²) and sigma a 0-d tensor (docs/MATH.md §1–2). Analytic models (`analytic`) give ground
truth; `adapters` turns a DDPM network `net(x, t)` into an ε-model over σ and loads diffusers folders;
`conditional` makes a conditional network with a fixed condition and guidance weight one ε-model;
`diffusers_folders` loads class-, text-conditioned and latent diffusion folders that way; `unet` is the
compact ε-UNet; `digits` loads the shipped digits checkpoint. Training lives above, in `probflow.digits`.
"""

from __future__ import annotations

import os
from pathlib import Path

from probflow.models.analytic import GaussianMixture, IdealDenoiser, default_mixture

__all__ = ["GaussianMixture", "IdealDenoiser", "default_mixture", "load", "MODEL_NAMES", "CONDITION_ARGUMENTS"]

MODEL_NAMES = ("mixture2d", "digits", "digits32")
CONDITION_ARGUMENTS = ("class_label", "prompt", "prompt_embeds", "negative", "guidance")
DIGITS32 = Path(__file__).resolve().parent / "weights" / "digits32"


def load(name: str | os.PathLike, *, limits: bool = True, **condition):
    """A model by name or folder: "mixture2d" (the default 2-D mixture, exact ε), "digits" (the shipped 8×8
    digits ε-UNet), "digits32" (the shipped class-conditional 32×32 digits UNet), a digits checkpoint folder
    (digits.safetensors + digits.json, as `probflow train digits` writes), or a local diffusers folder
    (`save_pretrained` layout, no network access).

    Conditional models (class embeddings, cross-attention, or a vae/) take their condition here, as keyword
    arguments of `probflow.models.diffusers_folders.load_conditional`: class_label, prompt, prompt_embeds,
    negative, guidance (the CFG weight w; default 1). The result is one ε-model of that fixed condition.
    `limits` False lifts the loaders' bounds on network size, noise-table length and sample pixels (the CLI's
    --no-limits)."""
    unknown = sorted(set(condition) - set(CONDITION_ARGUMENTS))
    if unknown:
        raise TypeError(f"load: unknown argument(s) {unknown}; expected some of {list(CONDITION_ARGUMENTS)}")
    given = {k: v for k, v in condition.items() if v is not None and not (k == "guidance" and v == 1.0)}
    folder = DIGITS32 if name == "digits32" else name
    big = {} if limits else {"max_parameters": None}
    unbounded = {} if limits else {"max_parameters": None, "max_timesteps": None}
    if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):
        from probflow.models.diffusers_folders import is_conditional_folder, load_conditional

        if is_conditional_folder(folder):
            return load_conditional(folder, **{k: v for k, v in condition.items() if v is not None}, **unbounded)
    elif name == "digits32":
        raise FileNotFoundError(f"model: the digits32 weights are missing ({DIGITS32}); train them with "
                                "`probflow train digits32`")
    if given:
        raise ValueError(f"{next(iter(given))}: model {str(name)!r} is unconditional; it takes no condition or "
                         "guidance")
    if name == "mixture2d":
        return default_mixture()
    if name == "digits":
        from probflow.models.digits import load_model

        return load_model()
    if isinstance(name, (str, os.PathLike)) and os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "digits.safetensors")):
            from probflow.models.digits import load_model

            return load_model(name, **big)
        from probflow.models.adapters import from_diffusers

        return from_diffusers(name, **unbounded, **({} if limits else {"max_pixels": None}))
    raise ValueError(f"model: unknown model {str(name)!r}; expected one of {list(MODEL_NAMES)}, a digits checkpoint "
                     "folder or a local diffusers folder")
