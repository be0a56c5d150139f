"""Quality of the class-conditional 32×32 digits model: Fréchet distance and class accuracy under guidance.

For each guidance weight w and each class c, n samples of Eq. 12 with ε_w (condition c, null class ∅),
Euler on the DDIM trailing grid (`grids.ddim`), from `probflow.noise(n, (1, 32, 32), seed + c)` — the same
noise for every w — integrated in float64 with the network in float32, unclipped. Reported per w:
  * Fréchet distance between Gaussians fitted to the 1024 pixels of all samples and of the test split;
    the floor is the same distance from the training split to the test split; the same on the 64 pixels of
    the 4×4-average-pooled images ("frechet_8x8"), better estimated from a few hundred samples;
  * class accuracy: the fraction of samples of class c that an independent classifier labels c. The
    classifier is scikit-learn's LogisticRegression (C = 1) fitted on the training split downsampled to 8×8
    by 4×4 average pooling (`downsample`), not trained by the model's code; its held-out accuracy on the
    downsampled test split is reported. At w = 0 the field is the unconditional one, so chance (≈ 10 %)
    is expected there.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from probflow.digits.data32 import downsample, load_split32
from probflow.digits.metrics import frechet_distance, gaussian_fit
from probflow.flows import noise, sample
from probflow.grids import ddim
from probflow.models.conditional import with_guidance

__all__ = ["classifier32", "evaluate32", "class_samples"]


def classifier32(split: dict | None = None):
    """(LogisticRegression on the downsampled training split, its accuracy on the downsampled test split)."""
    from sklearn.linear_model import LogisticRegression

    split = split or load_split32()
    clf = LogisticRegression(max_iter=5000, C=1.0)
    clf.fit(downsample(split["x_train"]).reshape(len(split["x_train"]), -1).numpy(), split["y_train"].numpy())
    acc = clf.score(downsample(split["x_test"]).reshape(len(split["x_test"]), -1).numpy(), split["y_test"].numpy())
    return clf, float(acc)


def class_samples(model, c: int, w: float, n: int, steps: int = 20, seed: int = 0) -> torch.Tensor:
    """n samples (float32, (n, 1, 32, 32)) of class c at guidance w: Euler on ddim(schedule, steps)."""
    m = with_guidance(model, w, {"class_labels": torch.tensor([c], dtype=torch.int64)})
    z = noise(n, tuple(model.sample_shape), seed + c)
    return sample(m, z, ddim(model.schedule, steps), "euler").x.float()


def evaluate32(model, guidance: tuple[float, ...] = (0.0, 1.0, 3.0), n_per_class: int = 100, steps: int = 20,
               seed: int = 0, log: bool = False) -> dict:
    """The metrics dict of the card (module docstring) for a guided digits32 model (any condition)."""
    split = load_split32()
    clf, acc = classifier32(split)
    mu_te, cov_te = gaussian_fit(split["x_test"])
    floor = frechet_distance(*gaussian_fit(split["x_train"]), mu_te, cov_te)
    mu8, cov8 = gaussian_fit(downsample(split["x_test"]))
    floor8 = frechet_distance(*gaussian_fit(downsample(split["x_train"])), mu8, cov8)
    runs = []
    for w in guidance:
        t0 = time.time()
        xs, ys = [], []
        for c in range(10):
            xs.append(class_samples(model, c, w, n_per_class, steps, seed))
            ys.append(np.full(n_per_class, c))
        x, y = torch.cat(xs), np.concatenate(ys)
        pred = clf.predict(downsample(x).reshape(len(x), -1).numpy())
        per_class = [float((pred[y == c] == c).mean()) for c in range(10)]
        run = {"guidance": w, "method": "euler", "grid": f"ddim({steps})", "n": len(x),
               "class_accuracy": float((pred == y).mean()), "per_class_accuracy": [round(a, 3) for a in per_class],
               "frechet": frechet_distance(*gaussian_fit(x.double().numpy()), mu_te, cov_te),
               "frechet_8x8": frechet_distance(*gaussian_fit(downsample(x)), mu8, cov8),
               "out_of_range_fraction": float((x.abs() > 1.05).float().mean()), "wall_s": round(time.time() - t0, 1)}
        runs.append(run)
        if log:
            print(json.dumps(run), flush=True)
    return {"n_per_class": n_per_class, "noise_seed": seed, "frechet_floor_train_vs_test": floor,
            "frechet_pixels": "32×32 (1024-D)", "frechet_8x8_floor_train_vs_test": floor8,
            "classifier": "LogisticRegression(C=1) on 4×4-average-pooled 8×8",
            "classifier_test_accuracy": acc, "runs": runs}
