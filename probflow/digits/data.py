"""The digits data: scikit-learn's bundled 8×8 digits on a fixed split, in the digits model's range.

`sklearn.datasets.load_digits` (1797 images, 8×8, integer pixels 0 … 16) scaled to [−1, 1] by x = p/8 − 1,
as (N, 1, 8, 8). The split is fixed: a stratified 80/20 `train_test_split` with random_state = SPLIT_SEED = 0
(1437 train, 360 test images), independent of any training seed. Offline: scikit-learn ships the data.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["SPLIT_SEED", "TEST_FRACTION", "load_split"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_split() -> dict[str, Tensor]:
    """The fixed digits split: x_train (1437, 1, 8, 8), x_test (360, 1, 8, 8) float32 in [−1, 1], and
    y_train, y_test (int64 labels). Stratified 80/20, random_state = SPLIT_SEED."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                          stratify=d.target)
    return {"x_train": torch.from_numpy(np.ascontiguousarray(xtr)),
            "x_test": torch.from_numpy(np.ascontiguousarray(xte)),
            "y_train": torch.from_numpy(ytr).long(), "y_test": torch.from_numpy(yte).long()}
