"""Precision policy: the ODE state's dtype and the ε-model's dtype, named separately.

Eq. 12, dx̄/dσ = ε_θ(x̄/sqrt(σ² + 1), σ) (docs/MATH.md §2), has two places where a dtype lives:

- the **state**: x̄, the σ grid and every solver operation (steps, error norms, fixed-point pairs), in
  `state` ∈ {float64, float32};
- the **model**: the network's weights and activations, in `model` ∈ {float64, float32, bfloat16, float16}.
  x = x̄/sqrt(1 + σ²) is formed in the state's dtype, cast to the model's dtype at `DDIMField`'s boundary,
  and ε is cast back before the solver sees it.

Combinations that make sense: state float64 with any model dtype (accuracy studies; a low-precision
network inside an exact solver), state float32 with a model of float32 or lower. Refused, with a one-line
error: a state in bfloat16/float16 (solver round-off of ~1e-3 per step swamps any discretisation error)
and model float64 inside a float32 state (the float64 work is rounded away at once: ask for
float64/float64 or float32/float32). A model dtype the device cannot run (probed with a tiny convolution
and matrix product, e.g. bfloat16 on a GPU without it) is refused too.

Python: `probflow.sample(model, x_T, g, "euler", precision="model=bfloat16,state=float32")` or
`Precision.parse(...)`; CLI: `--precision model=bfloat16,state=float32` (or one name for both).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from probflow.field import DDIMField, EpsModel

__all__ = ["Precision", "MODEL_DTYPES", "STATE_DTYPES", "dtype_name"]

_NAMES = {
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
MODEL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float64, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """'float64', 'bfloat16', … (torch's name without the 'torch.' prefix)."""
    return str(dtype).removeprefix("torch.")


def _dtype(value: str | torch.dtype, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    d = _NAMES.get(str(value).strip().lower())
    if d is None:
        raise ValueError(f"precision: unknown {what} dtype {value!r}; expected one of float64, float32, bfloat16, "
                         "float16")
    return d


@cache
def _runs_on(dtype: torch.dtype, device: str) -> str:
    """'' if a tiny conv2d and matmul run in `dtype` on `device`, else torch's error message."""
    try:
        x = torch.ones(1, 2, 4, 4, dtype=dtype, device=device)
        w = torch.ones(2, 2, 3, 3, dtype=dtype, device=device)
        torch.nn.functional.conv2d(x, w, padding=1).sum().item()
        (x.reshape(4, 8) @ x.reshape(8, 4)).sum().item()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if device.startswith("cuda") and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support"
    return ""


@dataclass(frozen=True)
class Precision:
    """The model's dtype and the ODE state's dtype (see the module docstring for which pairs are allowed)."""

    model: torch.dtype = torch.float32
    state: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if self.model not in MODEL_DTYPES:
            raise ValueError(f"precision: model dtype must be one of float64, float32, bfloat16, float16, got "
                             f"{self.model}")
        if self.state not in STATE_DTYPES:
            raise ValueError(f"precision: state dtype must be float64 or float32, got {dtype_name(self.state)} "
                             "(a half-precision ODE state loses ~1e-3 per step; keep the state in float32 or "
                             "float64 and name the model's dtype separately, e.g. model=bfloat16,state=float32)")
        if self.state == torch.float32 and self.model == torch.float64:
            raise ValueError("precision: model=float64 with state=float32 rounds the float64 model's output to "
                             "float32 at once; use model=float64,state=float64 or model=float32,state=float32")

    @classmethod
    def parse(cls, spec: str | Precision | None) -> Precision | None:
        """'model=bfloat16,state=float32', or one name for both ('float32'; 'float64'). None → None."""
        if spec is None or isinstance(spec, Precision):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"precision: expected e.g. 'model=bfloat16,state=float32', got {spec!r}")
        if "=" not in spec:
            d = _dtype(spec, "model/state")
            if d not in STATE_DTYPES:
                raise ValueError(f"precision: {spec!r} alone would make the ODE state {dtype_name(d)}; name both, "
                                 f"e.g. model={dtype_name(d)},state=float32")
            return cls(d, d)
        parts: dict[str, torch.dtype] = {}
        for item in spec.split(","):
            key, _, val = item.partition("=")
            key = key.strip().lower()
            if key not in ("model", "state") or key in parts:
                raise ValueError(f"precision: expected 'model=DTYPE,state=DTYPE', got {spec!r}")
            parts[key] = _dtype(val, key)
        return cls(parts.get("model", torch.float32), parts.get("state", torch.float64))

    def __str__(self) -> str:
        return f"model={dtype_name(self.model)},state={dtype_name(self.state)}"

    def check_device(self, device: torch.device | str = "cpu") -> Precision:
        """Raise ValueError when this torch build cannot run the model's (or the state's) dtype on `device`."""
        dev = str(torch.device(device))
        for what, d in (("model", self.model), ("state", self.state)):
            why = _runs_on(d, dev)
            if why:
                raise ValueError(f"precision: {what}={dtype_name(d)} is not supported on {dev} by this torch build "
                                 f"({why})")
        return self

    def cast_model(self, model: EpsModel) -> EpsModel:
        """The ε-model evaluated in `self.model`: a copy whose network weights are cast (a model with an
        `nn.Module` `net` and a `model_dtype`, like `DiscreteTimeModel`, or an `nn.Module` itself); any
        other callable is returned as is and sees inputs in the model dtype through DDIMField's boundary.
        A DDIMField is refused: it already fixes its model dtype (build it as `DDIMField(p.cast_model(model),
        model_dtype=p.model)` to keep its counter)."""
        if isinstance(model, DDIMField):
            raise ValueError("precision: pass the ε-model, not a DDIMField (a field fixes its own model dtype; "
                             "build it with Precision.cast_model and model_dtype=precision.model)")
        net = getattr(model, "net", None)
        if isinstance(net, nn.Module) and hasattr(model, "model_dtype"):
            out = copy.copy(model)
            out.net = net if _module_dtype(net) == self.model else copy.deepcopy(net).to(self.model)
            out.model_dtype = self.model
            return out
        if isinstance(model, nn.Module):
            return model if _module_dtype(model) == self.model else copy.deepcopy(model).to(self.model)
        return model

    def field(self, model: EpsModel | DDIMField) -> DDIMField:
        """A new DDIMField running `model` in `self.model` (`cast_model`; a DDIMField is refused)."""
        return DDIMField(self.cast_model(model), model_dtype=self.model)

    def state_tensor(self, x: Tensor) -> Tensor:
        """x in the state's dtype, once x's device is known to run this precision's dtypes (`check_device`)."""
        self.check_device(x.device)
        return x.to(self.state)


def _module_dtype(m: nn.Module) -> torch.dtype | None:
    p = next(iter(m.parameters()), None)
    return p.dtype if p is not None else None
