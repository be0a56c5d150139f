"""ε-models: the protocol, analytic models with exact ε, discrete-time networks, and loading by name.

The protocol (`probflow.field.EpsModel`): `model(x, sigma) -> eps` with x a batch (B, …) in the model's own
variable x = x̄/sqrt(1+σ²) and sigma a 0-d tensor (docs/MATH.md §1–2). Analytic models (`analytic`) give ground
truth; `adapters` turns a DDPM network `net(x, t)` into an ε-model over σ and loads diffusers folders;
`unet` is the compact ε-UNet; `digits` loads the shipped digits checkpoint. Training lives above, in
`probflow.digits`.
"""

from __future__ import annotations

import os

from probflow.models.analytic import GaussianMixture, IdealDenoiser, default_mixture

__all__ = ["GaussianMixture", "IdealDenoiser", "default_mixture", "load", "MODEL_NAMES"]

MODEL_NAMES = ("mixture2d", "digits")


def load(name: str | os.PathLike):
    """A model by name or folder: "mixture2d" (the default 2-D mixture, exact ε), "digits" (the shipped 8×8
    digits ε-UNet), a digits checkpoint folder (digits.safetensors + digits.json, as `probflow train digits`
    writes), or a local diffusers folder (`save_pretrained` layout, no network access)."""
    if name == "mixture2d":
        return default_mixture()
    if name == "digits":
        from probflow.models.digits import load_model

        return load_model()
    if isinstance(name, (str, os.PathLike)) and os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "digits.safetensors")):
            from probflow.models.digits import load_model

            return load_model(name)
        from probflow.models.adapters import from_diffusers

        return from_diffusers(name)
    raise ValueError(f"model: unknown model {str(name)!r}; expected one of {list(MODEL_NAMES)}, a digits checkpoint "
                     "folder or a local diffusers folder")
