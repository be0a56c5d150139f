"""The condition as part of the model, and classifier-free guidance (CFG) as a change of the vector field.

A conditional network o(x, t, c) (class labels and/or encoder hidden states c) with a FIXED condition c and
guidance weight w is one ε-model over σ, so every solver, sample/encode/decode/interpolate, the likelihood
and the distributed runs integrate the ODE of that one condition (Eq. 12 with ε_w, MATH.md §2):

    ε_w(x, σ) = ε_∅(x, σ) + w·(ε_c(x, σ) − ε_∅(x, σ))

with ∅ the null (or negative) condition. w = 1 is the conditional field ε_c and w = 0 the unconditional ε_∅,
each from ONE forward of the network on the batch (so they equal the network's own output bit for bit);
any other w runs both halves in one batched forward on [x; x] with conditions [∅; c] (diffusers' order) and
combines the raw outputs as above. The combination is applied to the network's raw output before the
prediction-type conversion of `DiscreteTimeModel` — the same thing, because every conversion
(ε = o, ε = a·o + b·x, ε = (x − a·o)/b) is affine in o with coefficients that do not depend on the condition.

The condition tensors and w are buffers of the wrapped network, so the model's `fingerprint` (sha256 of its
state_dict) covers the weights, the condition, the null condition and w: a latent file that records the
fingerprint records the condition. `condition_record(model)` gives the same facts as short strings.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from probflow.models.adapters import DiscreteTimeModel, fingerprint
from probflow.schedules import Schedule

__all__ = ["GuidedNet", "guided_model", "check_guidance", "condition_record", "with_guidance"]

CONDITION_KEYS = ("class_labels", "encoder_hidden_states")


def check_guidance(w: float) -> float:
    """w as a float; a one-line ValueError naming `guidance` when it is not a finite real number."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
        raise ValueError(f"guidance: expected a finite number (the CFG weight w), got {w!r}")
    return float(w)


def _check_condition(cond: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    if not isinstance(cond, Mapping) or not cond:
        raise ValueError(f"{name}: expected a non-empty dict with keys among {CONDITION_KEYS}")
    out = {}
    for k, v in cond.items():
        if k not in CONDITION_KEYS:
            raise ValueError(f"{name}: unknown key {k!r}; expected keys among {CONDITION_KEYS}")
        if not isinstance(v, Tensor) or v.ndim < 1 or v.shape[0] != 1:
            raise ValueError(f"{name}: {k}: expected a tensor with a leading batch dimension of 1 (one condition "
                             f"for the whole batch), got {tuple(v.shape) if isinstance(v, Tensor) else type(v)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{name}: {k} holds NaN or Inf values")
        out[k] = v.detach().clone()
    return out


class GuidedNet(nn.Module):
    """net(x, t) = the guided raw output of `unet(x, t, **condition).sample` (module docstring).

    `cond` / `uncond`: dicts of tensors with a leading dimension 1, keys `class_labels` (int64, (1,)) and/or
    `encoder_hidden_states` (float, (1, L, D)); `uncond` may be None only when w = 1. Conditions are
    broadcast to the batch at each call; the buffers hold them (and w) so that they move with `.to()` and
    enter the fingerprint.
    """

    def __init__(self, unet: nn.Module, cond: Mapping[str, Tensor], uncond: Mapping[str, Tensor] | None,
                 guidance: float = 1.0) -> None:
        super().__init__()
        w = check_guidance(guidance)
        self.unet = unet
        self.keys = tuple(sorted(_check_condition(cond, "condition")))
        for k, v in _check_condition(cond, "condition").items():
            self.register_buffer(f"cond_{k}", v)
        if uncond is None:
            if w != 1.0:
                raise ValueError(f"guidance: w = {w:g} needs a null/negative condition (negative=), which this model "
                                 "does not have; use w = 1")
            self.has_uncond = False
        else:
            u = _check_condition(uncond, "negative")
            if tuple(sorted(u)) != self.keys:
                raise ValueError(f"negative: expected the same keys as the condition {self.keys}, "
                                 f"got {tuple(sorted(u))}")
            for k, v in u.items():
                if v.shape != getattr(self, f"cond_{k}").shape or v.dtype != getattr(self, f"cond_{k}").dtype:
                    raise ValueError(f"negative: {k}: expected shape {tuple(getattr(self, f'cond_{k}').shape)} and "
                                     f"dtype {getattr(self, f'cond_{k}').dtype} like the condition, got "
                                     f"{tuple(v.shape)} {v.dtype}")
                self.register_buffer(f"uncond_{k}", v)
            self.has_uncond = True
        self.register_buffer("guidance", torch.tensor(w, dtype=torch.float64))
        self.w = w

    def _kwargs(self, which: str, n: int, dtype: torch.dtype) -> dict[str, Tensor]:
        out = {}
        for k in self.keys:
            v = getattr(self, f"{which}_{k}")
            v = v.to(dtype) if v.is_floating_point() else v
            out[k] = v.expand(n, *v.shape[1:])
        return out

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        n = x.shape[0]
        if self.w == 1.0:
            return self.unet(x, t, **self._kwargs("cond", n, x.dtype)).sample
        if self.w == 0.0:
            return self.unet(x, t, **self._kwargs("uncond", n, x.dtype)).sample
        u, c = self._kwargs("uncond", n, x.dtype), self._kwargs("cond", n, x.dtype)
        both = {k: torch.cat([u[k], c[k]]) for k in self.keys}
        t2 = torch.cat([t, t]) if t.ndim else t
        out_u, out_c = self.unet(torch.cat([x, x]), t2, **both).sample.chunk(2)
        return out_u + self.w * (out_c - out_u)  # diffusers' expression, so that the round-off is the same


def _sha(tensors: Mapping[str, Tensor]) -> str:
    return fingerprint(dict(tensors))


def condition_record(model: DiscreteTimeModel) -> dict[str, str]:
    """What a latent file should record about a guided model's condition: the kind, the class (when one),
    w, and sha256 of the condition and of the null condition (`fingerprint` of their tensors)."""
    net = getattr(model, "net", None)
    if not isinstance(net, GuidedNet):
        return {}
    cond = {k: getattr(net, f"cond_{k}") for k in net.keys}
    rec = {"condition_kind": "+".join(net.keys), "guidance": repr(net.w), "condition_sha256": _sha(cond)}
    if "class_labels" in cond:
        rec["class_label"] = str(int(cond["class_labels"][0]))
    if net.has_uncond:
        unc = {k: getattr(net, f"uncond_{k}") for k in net.keys}
        rec["negative_sha256"] = _sha(unc)
        if "class_labels" in unc:
            rec["negative_class_label"] = str(int(unc["class_labels"][0]))
    return rec


def guided_model(unet: nn.Module, schedule: Schedule, prediction_type: str, cond: Mapping[str, Tensor],
                 uncond: Mapping[str, Tensor] | None = None, guidance: float = 1.0, **kwargs) -> DiscreteTimeModel:
    """The ε-model of `unet` under the fixed condition `cond`, guided with weight w = `guidance` against
    `uncond` (module docstring); `kwargs` go to `DiscreteTimeModel` (sample_shape, name, round_t, card …).
    The result has the attribute `condition` (`condition_record`)."""
    net = GuidedNet(unet, cond, uncond, guidance).requires_grad_(False)
    model = DiscreteTimeModel(net, schedule, prediction_type, model_dtype=kwargs.pop("model_dtype", torch.float32),
                              **kwargs)
    model.condition = condition_record(model)
    return model


def with_guidance(model: DiscreteTimeModel, guidance: float | None = None,
                  cond: Mapping[str, Tensor] | None = None) -> DiscreteTimeModel:
    """`model` (a guided model) with another w and/or another condition (None: keep), the same network (no
    copy of the weights) and null condition."""
    net = getattr(model, "net", None)
    if not isinstance(net, GuidedNet):
        raise ValueError("model: expected a guided model (from guided_model or a conditional folder)")
    guidance = net.w if guidance is None else guidance
    cond = {k: getattr(net, f"cond_{k}") for k in net.keys} if cond is None else cond
    unc = {k: getattr(net, f"uncond_{k}") for k in net.keys} if net.has_uncond else None
    out = guided_model(net.unet, model.schedule, model.prediction_type, cond, unc, guidance,
                       sample_shape=model.sample_shape, name=model.name, round_t=model.round_t,
                       model_dtype=model.model_dtype, data_range=model.data_range, card=model.card)
    for attr in ("autoencoder", "classes"):
        if hasattr(model, attr):
            setattr(out, attr, getattr(model, attr))
    return out


def embedding_sha256(x: Tensor) -> str:
    """sha256 of one tensor's dtype, shape and bytes (for reports)."""
    v = x.detach().cpu().contiguous()
    return hashlib.sha256(f"{v.dtype}|{tuple(v.shape)}|".encode() + v.reshape(-1).view(torch.uint8).numpy().tobytes()
                          ).hexdigest()
