"""The core object: Eq. 12 (the σ-ODE) as a vector field, with its NFE counter and dtype boundary.

    dx̄/dσ = ε_θ( x̄ / sqrt(σ² + 1), σ )                                   (docs/MATH.md §2)

The ε-model protocol: `model(x, sigma) -> eps`, where `x` is a batch (B, *S) in the model's own variable
x = x̄/sqrt(1 + σ²) (data scale, not x̄), `sigma` is a 0-d tensor of the same dtype and device (one noise
level for the whole batch) and `eps` has the shape of `x`. Discrete-time networks reach this protocol
through `t(σ)` in `probflow.models.adapters`; analytic models in `probflow.models` implement it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DDIMField", "EpsModel", "TOL_FLOOR", "as_field", "check_dtype", "check_sample_shape", "check_tolerances",
           "tolerance_floor"]

EpsModel = Callable[[Tensor, Tensor], Tensor]

# The CLI's floor on --rtol/--atol (a float32 network resolves ε to ~1e-7, so an adaptive solve below 1e-10
# shrinks its steps without end). The API's floor is the state dtype's: no tolerance below its machine epsilon
# (nor below 1e-14 in float64) can be met; dopri5 at 1e-30 rejects steps forever. Above 1 the error control
# is off and the answer is not a solution of Eq. 12.
TOL_FLOOR, TOL_CEILING = 1e-10, 1.0
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                 "float64": torch.float64}


def tolerance_floor(dtype: torch.dtype = torch.float64, model: object = None) -> float:
    """The smallest rtol/atol allowed to an adaptive solve with its state in `dtype`: max(1e-14, eps(dtype)),
    and TOL_FLOOR (1e-10, the CLI's) when the model computes in a lower precision than float64 (its
    `model_dtype`, or a DDIMField's): a float32 network resolves ε only to ~1e-7."""
    floor = max(1e-14, float(torch.finfo(dtype).eps))
    md = getattr(model, "model_dtype", None)
    if md is None and isinstance(model, DDIMField):
        md = getattr(model.model, "model_dtype", None)
    if isinstance(md, torch.dtype) and md.is_floating_point and torch.finfo(md).eps > torch.finfo(torch.float64).eps:
        floor = max(floor, TOL_FLOOR)
    return floor


def check_tolerances(rtol: object, atol: object, dtype: torch.dtype = torch.float64, model: object = None,
                     floor: float | None = None) -> tuple[float, float]:
    """rtol and atol of an adaptive solve as floats: finite, in [floor, 1] (default floor:
    `tolerance_floor(dtype, model)`); TypeError/ValueError naming the argument otherwise."""
    lo = tolerance_floor(dtype, model) if floor is None else float(floor)
    out = []
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not (isinstance(v, Tensor) and v.numel() == 1):
            raise TypeError(f"rtol, atol: {name}: expected a number, got {type(v).__name__}")
        v = float(v)
        if not (math.isfinite(v) and v > 0 and lo <= v <= TOL_CEILING):
            raise ValueError(f"rtol, atol: {name} = {v!r}; expected a finite tolerance in [{lo:g}, {TOL_CEILING:g}] "
                             f"(below {lo:g} this solve cannot meet it)")
        out.append(v)
    return out[0], out[1]


def check_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """A floating-point torch dtype, also from its name ("float32"); TypeError naming `name` otherwise."""
    if isinstance(dtype, str):
        dtype = _FLOAT_DTYPES.get(dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{name}: expected a floating-point dtype (one of {sorted(_FLOAT_DTYPES)}), got {dtype!r}")
    return dtype


def check_sample_shape(model: object, x: Tensor, name: str = "x") -> None:
    """Refuse (ValueError naming `name`) a batch whose samples do not have the model's shape: its
    `sample_shape` when it declares one, else its `dim` (the number of entries of one sample)."""
    model = getattr(model, "model", model) if isinstance(model, DDIMField) else model
    shape = getattr(model, "sample_shape", None)
    if shape is not None:
        if tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"{name}: expected a batch of shape (B, {', '.join(map(str, shape))}) for this model, "
                             f"got {tuple(x.shape)}")
        return
    dim = getattr(type(model), "dim", None) is not None and getattr(model, "dim", None)
    if isinstance(dim, int) and not isinstance(dim, bool) and math.prod(x.shape[1:]) != dim:
        raise ValueError(f"{name}: expected samples of {dim} entries (shape (B, {dim})) for this model, got shape "
                         f"{tuple(x.shape)}")


class DDIMField:
    """f(σ, x̄) = ε(x̄/sqrt(1 + σ²), σ), Eq. 12, in torchdiffeq's `func(t, y)` order.

    The state x̄ and σ keep their own dtype and device (float64 by default for accuracy studies); the
    model runs in `model_dtype` when given (e.g. float32 for a network) and its output is cast back.
    `nfe` counts every evaluation, batched: one call on a batch is one function evaluation.
    """

    def __init__(self, model: EpsModel, model_dtype: torch.dtype | str | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model: expected a callable ε-model (x, sigma) -> eps, got {type(model).__name__}")
        self.model = model
        self.model_dtype = None if model_dtype is None else check_dtype(model_dtype, "model_dtype")
        self.nfe = 0

    def __call__(self, sigma: Tensor | float, xbar: Tensor) -> Tensor:
        self.nfe += 1
        if self.nfe == 1:
            check_sample_shape(self.model, xbar)
        sigma = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device)
        x = xbar * torch.rsqrt(1.0 + sigma * sigma)
        if self.model_dtype is not None and self.model_dtype != xbar.dtype:
            x, sigma = x.to(self.model_dtype), sigma.to(self.model_dtype)
        eps = self.model(x, sigma)
        return self.check_eps(eps, xbar, sigma, x)

    def check_eps(self, eps: object, xbar: Tensor, sigma: Tensor, x: Tensor | None = None) -> Tensor:
        """The model's output as ε in x̄'s dtype: a floating-point tensor of x̄'s shape, and finite wherever its
        input was (finite σ and x: a NaN there would otherwise surface as a solver's step-size failure far from
        its cause, e.g. dopri5's "underflow in dt"). A trial point an adaptive solver overshoots to (σ = ∞, or x
        overflowing the model's dtype) may give NaN: the solver rejects that step itself."""
        if not isinstance(eps, Tensor):
            raise TypeError(f"model: returned {type(eps).__name__} for ε, expected a tensor of shape "
                            f"{tuple(xbar.shape)}")
        if not eps.is_floating_point():
            raise TypeError(f"model: returned ε of dtype {eps.dtype}, expected a floating-point tensor")
        if eps.shape != xbar.shape:
            raise ValueError(f"model: returned ε of shape {tuple(eps.shape)} for x of shape {tuple(xbar.shape)}")
        eps = eps.to(xbar.dtype)
        try:  # the sum is NaN or ±Inf whenever an element is (one cheap pass, no mask); only then, or if the sum
            # overflowed, the elementwise test decides
            bad = not math.isfinite(float(eps.detach().sum())) and not bool(torch.isfinite(eps).all())
            bad = bad and math.isfinite(float(sigma)) and (x is None or bool(torch.isfinite(x).all()))
        except RuntimeError:  # under vmap/jacrev a value cannot steer Python: the untransformed call checks
            bad = False
        if bad:
            raise ValueError(f"model: returned NaN or Inf for ε at σ = {float(sigma):.6g}")
        return eps


def as_field(model: EpsModel | DDIMField) -> DDIMField:
    """The field of an ε-model (a field is returned as is, so its NFE keeps counting)."""
    return model if isinstance(model, DDIMField) else DDIMField(model)
