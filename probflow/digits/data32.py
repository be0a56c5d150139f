"""The digits split upsampled to 32×32 (the class-conditional digits32 model's data) and the 4×4 pooling back
to 8×8 that the independent classifier reads (probflow.digits.metrics32)."""

from __future__ import annotations

import torch
from torch import Tensor

from probflow.digits.data import load_split

__all__ = ["load_split32", "downsample"]


def load_split32() -> dict[str, Tensor]:
    """The digits split (`load_split`) upsampled to (N, 1, 32, 32), bilinear, float32 in [−1, 1]."""
    s = load_split()
    up = {k: torch.nn.functional.interpolate(s[k], size=(32, 32), mode="bilinear", align_corners=False)
          for k in ("x_train", "x_test")}
    return {**up, "y_train": s["y_train"], "y_test": s["y_test"]}


def downsample(x: Tensor) -> Tensor:
    """(N, 1, 32, 32) → (N, 1, 8, 8) by 4×4 average pooling (what the independent classifier reads)."""
    return torch.nn.functional.avg_pool2d(torch.as_tensor(x, dtype=torch.float32), 4)
