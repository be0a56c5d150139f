"""The core object: Eq. 12 (the σ-ODE) as a vector field, with its NFE counter and dtype boundary.

    dx̄/dσ = ε_θ( x̄ / sqrt(σ² + 1), σ )                                   (MATH.md §2)

The ε-model protocol: `model(x, sigma) -> eps`, where `x` is a batch (B, *S) in the model's own variable
x = x̄/sqrt(1 + σ²) (data scale, not x̄), `sigma` is a 0-d tensor of the same dtype and device (one noise
level for the whole batch) and `eps` has the shape of `x`. Discrete-time networks reach this protocol
through `t(σ)` in `probflow.models.adapters`; analytic models in `probflow.models` implement it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DDIMField", "EpsModel", "as_field"]

EpsModel = Callable[[Tensor, Tensor], Tensor]


class DDIMField:
    """f(σ, x̄) = ε(x̄/sqrt(1 + σ²), σ), Eq. 12, in torchdiffeq's `func(t, y)` order.

    The state x̄ and σ keep their own dtype and device (float64 by default for accuracy studies); the
    model runs in `model_dtype` when given (e.g. float32 for a network) and its output is cast back.
    `nfe` counts every evaluation, batched: one call on a batch is one function evaluation.
    """

    def __init__(self, model: EpsModel, model_dtype: torch.dtype | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model: expected a callable ε-model (x, sigma) -> eps, got {type(model).__name__}")
        self.model = model
        self.model_dtype = model_dtype
        self.nfe = 0

    def __call__(self, sigma: Tensor | float, xbar: Tensor) -> Tensor:
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        x = xbar * torch.rsqrt(1.0 + sigma * sigma)
        if self.model_dtype is not None and self.model_dtype != xbar.dtype:
            x, sigma = x.to(self.model_dtype), sigma.to(self.model_dtype)
        eps = self.model(x, sigma)
        if eps.shape != xbar.shape:
            raise ValueError(f"model: returned ε of shape {tuple(eps.shape)} for x of shape {tuple(xbar.shape)}")
        return eps.to(xbar.dtype)


def as_field(model: EpsModel | DDIMField) -> DDIMField:
    """The field of an ε-model (a field is returned as is, so its NFE keeps counting)."""
    return model if isinstance(model, DDIMField) else DDIMField(model)
