"""Quality metrics for image samples of the digits model: Fréchet distance and a digits classifier.

From n samples of Eq. 12 integrated σ_max → 0 in x (data scale), unclipped: the Fréchet distance between
Gaussians fitted to the 64 pixels of the samples and of the test split (the floor is the same distance from
the training split to the test split), and a logistic-regression classifier trained on the training split
(its held-out accuracy is reported) labelling the samples: the class histogram and the mean max-probability
("confidence").
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from torch import Tensor

from probflow.digits.data import load_split
from probflow.flows import noise, sample
from probflow.grids import ddim
from probflow.models.adapters import DiscreteTimeModel

__all__ = ["gaussian_fit", "frechet_distance", "fit_classifier", "confidence", "evaluate"]


def gaussian_fit(x: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the rows of x flattened to (N, D), in float64."""
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return a.mean(0), np.cov(a, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance between N(μ1, Σ1) and N(μ2, Σ2):

        |μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr (Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}

    computed from symmetric eigendecompositions (Σ1^{1/2} Σ2 Σ1^{1/2} is symmetric PSD, and
    tr sqrt(Σ1 Σ2) = Σ_i sqrt(λ_i) of it), so singular covariances (constant pixels) are fine."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    lam, u = np.linalg.eigh(0.5 * (c1 + c1.T))
    r = (u * np.sqrt(np.clip(lam, 0, None))) @ u.T
    m = r @ c2 @ r
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


def fit_classifier(split: dict | None = None):
    """Logistic regression (scikit-learn, multinomial, C = 1) on the training split's 64 pixels; returns
    (classifier, held-out accuracy on the test split)."""
    from sklearn.linear_model import LogisticRegression

    split = split or load_split()
    clf = LogisticRegression(max_iter=5000, C=1.0)
    clf.fit(split["x_train"].reshape(len(split["x_train"]), -1).numpy(), split["y_train"].numpy())
    acc = clf.score(split["x_test"].reshape(len(split["x_test"]), -1).numpy(), split["y_test"].numpy())
    return clf, float(acc)


def confidence(clf, x: Tensor | np.ndarray) -> np.ndarray:
    """The classifier's max class probability per image of x (N, 1, 8, 8) in [−1, 1]: how clearly each image
    reads as one digit (real test digits score 0.945 on average)."""
    flat = np.asarray(torch.as_tensor(x).detach().double().cpu().numpy()).reshape(len(x), -1)
    return clf.predict_proba(flat).max(1)


def evaluate(
    model: DiscreteTimeModel,
    ddim_steps: tuple[int, ...] = (10, 20, 50, 100),
    adaptive: tuple[tuple[str, float], ...] = (("dopri5", 1e-5),),
    n: int = 2000,
    seed: int = 0,
    batch: int = 2000,
    log: bool = False,
) -> dict:
    """Quality report of `model` (the dict the card stores under "metrics").

    For each DDIM step count (Euler on `grids.ddim(schedule, steps)`) and each adaptive (method, rtol = atol),
    n samples from `probflow.noise(n, (1, 8, 8), seed)` (the same noise for every solver), integrated in
    float64 with the network in float32. Reports per run: NFE, Fréchet distance to the test split,
    class histogram (fractions), min class fraction, mean confidence; and the floor (train vs test),
    the classifier's held-out accuracy, and the test split's own mean confidence under it.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n: expected an integer >= 2, got {n!r}")
    split = load_split()
    clf, acc = fit_classifier(split)
    mu_te, cov_te = gaussian_fit(split["x_test"])
    floor = frechet_distance(*gaussian_fit(split["x_train"]), mu_te, cov_te)
    te_conf = float(clf.predict_proba(split["x_test"].reshape(len(split["x_test"]), -1).numpy()).max(1).mean())
    shape = model.sample_shape or tuple(split["x_test"].shape[1:])
    z = noise(n, shape, seed)
    runs = []
    jobs = [("euler", s, None) for s in ddim_steps] + [(m, 1, tol) for m, tol in adaptive]
    for method, steps, tol in jobs:
        sig = ddim(model.schedule, steps)
        t0 = time.time()
        xs, nfe = [], 0
        for b in range(0, n, batch):
            kw = {"rtol": tol, "atol": tol} if tol is not None else {}
            sol = sample(model, z[b:b + batch], sig, method, **kw)  # the adapter runs the net in float32
            xs.append(sol.x.float())
            nfe = max(nfe, sol.nfe)
        x = torch.cat(xs)
        flat = x.reshape(n, -1).double().numpy()
        proba = clf.predict_proba(flat)
        hist = np.bincount(proba.argmax(1), minlength=10) / n
        run = {"method": method, "grid": f"ddim({steps})" if tol is None else f"[σ_max, 0], rtol=atol={tol:g}",
               "steps": steps if tol is None else None, "rtol": tol, "nfe": int(nfe),
               "frechet": frechet_distance(*gaussian_fit(flat), mu_te, cov_te),
               "histogram": [round(float(h), 4) for h in hist], "min_class_fraction": float(hist.min()),
               "mean_confidence": float(proba.max(1).mean()),
               "out_of_range_fraction": float((x.abs() > 1.05).float().mean()),
               "wall_s": round(time.time() - t0, 1)}
        runs.append(run)
        if log:
            print(json.dumps(run), flush=True)
    return {"n": n, "noise_seed": seed, "frechet_floor_train_vs_test": floor, "classifier": "LogisticRegression(C=1)",
            "classifier_test_accuracy": acc, "test_split_mean_confidence": te_conf, "runs": runs}
