"""The digits model: a compact ε-UNet trained here with the DDPM objective on scikit-learn's digits, its
quality metrics, and the `probflow train digits` command.

Data: `sklearn.datasets.load_digits` (1797 images, 8×8, integer pixels 0 … 16) scaled to [−1, 1] by
x = p/8 − 1, as (N, 1, 8, 8). The split is fixed: a stratified 80/20 `train_test_split` with
random_state = SPLIT_SEED = 0 (1437 train, 360 test images), independent of the training seed.

Training (DDPM, Ho et al. 2020, Eq. 8 of the seed): t ~ U{0, …, T−1} on the linear table (T = 1000),
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, loss |ε − ε_θ(x_t, t)|²; Adam with linear warm-up and cosine decay,
an exponential moving average of the weights (the EMA is what ships). Reproducible from the seed (same
seed, same thread count → identical weights).

Metrics (`evaluate`), from n samples of Eq. 12 integrated σ_max → 0 in x (data scale), unclipped:
the Fréchet distance between Gaussians fitted to the 64 pixels of the samples and of the test split (the
floor is the same distance from the training split to the test split), and a logistic-regression
classifier trained on the training split (its held-out accuracy is reported) labelling the samples: the
class histogram and the mean max-probability ("confidence").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from probflow.adapters import DiscreteTimeModel
from probflow.atomic import atomic_write
from probflow.schedules import Schedule, linear
from probflow.unet import UNet

__all__ = [
    "SPLIT_SEED", "CONFIG", "WEIGHTS", "load_split", "train", "save", "load_model", "gaussian_fit",
    "frechet_distance", "fit_classifier", "evaluate", "add_train_arguments", "run_train",
]

SPLIT_SEED = 0
TEST_FRACTION = 0.2
WEIGHTS = Path(__file__).resolve().parent / "weights"
# The shipped model's recipe: network size and optimisation (the train command's defaults).
CONFIG = {"channels": [32, 64], "blocks": 2, "batch": 128, "lr": 2e-3, "warmup": 100, "ema": 0.999,
          "steps": 2000, "T": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


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


def schedule() -> Schedule:
    """The digits model's table: DDPM's linear β from 1e-4 to 0.02, T = 1000."""
    return linear(CONFIG["T"], CONFIG["beta_start"], CONFIG["beta_end"])


def train(
    seed: int = 0,
    steps: int = CONFIG["steps"],
    *,
    channels: tuple[int, ...] = tuple(CONFIG["channels"]),
    blocks: int = CONFIG["blocks"],
    batch: int = CONFIG["batch"],
    lr: float = CONFIG["lr"],
    warmup: int = CONFIG["warmup"],
    ema: float = CONFIG["ema"],
    device: str = "cpu",
    log_every: int = 0,
    data: Tensor | None = None,
) -> tuple[UNet, dict]:
    """Train ε_θ with the DDPM objective (Eq. 8): t ~ U{0 … T−1}, x_t = sqrt(ᾱ_t) x_0 + sqrt(1−ᾱ_t) ε,
    loss = mean |ε − ε_θ(x_t, t)|², on the training split (or `data`, (N, 1, 8, 8) in [−1, 1]).

    Returns the EMA network (float32, eval mode) and a record with the per-step losses and wall time.
    All randomness (init, batches, t, ε) comes from generators seeded by `seed`.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    x0 = (load_split()["x_train"] if data is None else data).to(device)
    n = x0.shape[0]
    sched = schedule()
    ab = sched.alpha_bar.to(torch.float32).to(device)
    torch.manual_seed(seed)
    net = UNet(in_channels=x0.shape[1], channels=channels, blocks=blocks).to(device)
    avg = UNet(in_channels=x0.shape[1], channels=channels, blocks=blocks).to(device)
    avg.load_state_dict(net.state_dict())
    avg.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def lr_at(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    g = torch.Generator(device=device).manual_seed(seed + 1)
    losses = []
    t_start = time.time()
    net.train()
    for i in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g, device=device)
        t = torch.randint(0, sched.T, (batch,), generator=g, device=device)
        eps = torch.randn(batch, *x0.shape[1:], generator=g, device=device)
        a = ab[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0[idx] + (1 - a).sqrt() * eps
        loss = (net(xt, t.to(torch.float32)) - eps).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(ema, (1 + i) / (10 + i))
        with torch.no_grad():
            for pa, pn in zip(avg.parameters(), net.parameters()):
                pa.lerp_(pn, 1 - decay)
        losses.append(loss.item())
        if log_every and (i + 1) % log_every == 0:
            recent = float(np.mean(losses[-log_every:]))
            print(f"step {i + 1}/{steps}  loss {recent:.4f}  {time.time() - t_start:.0f}s", flush=True)
    wall = time.time() - t_start
    avg = avg.cpu().eval()
    record = {"seed": seed, "steps": steps, "losses": losses, "wall_s": wall,
              "final_loss": float(np.mean(losses[-min(100, steps):])),
              "recipe": {"channels": list(channels), "blocks": blocks, "batch": batch, "lr": lr, "warmup": warmup,
                         "ema": ema, "optimizer": "Adam, linear warm-up then cosine decay to 0"}}
    return avg, record


def as_model(net: UNet, name: str = "digits", card: dict | None = None) -> DiscreteTimeModel:
    """The trained network as an ε-model over σ (float32, linear T = 1000 table, ε-prediction)."""
    net = net.float().eval().requires_grad_(False)
    return DiscreteTimeModel(net, schedule(), "epsilon", sample_shape=(1, 8, 8), name=name,
                             model_dtype=torch.float32, card=card)


def save(net: UNet, card: dict, out: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """Write `digits.safetensors` (the state_dict, with the UNet config as metadata) and `digits.json`
    (the card) into `out`, each atomically; refuses to overwrite an existing file unless `force`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wpath, cpath = out / "digits.safetensors", out / "digits.json"
    if not force:
        for p in (wpath, cpath):
            if p.exists():
                raise FileExistsError(f"--out: {p} exists; pass --force to overwrite")
    sd = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"unet_config": json.dumps(net.config())}
    atomic_write(wpath, lambda tmp: save_file(sd, tmp, metadata=meta), force=force, name="--out")

    def write_card(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(card, f, indent=2, ensure_ascii=False)
            f.write("\n")

    atomic_write(cpath, write_card, force=force, name="--out")
    return wpath, cpath


def load_model(folder: str | os.PathLike | None = None) -> DiscreteTimeModel:
    """The digits model from `folder` (default: the shipped `probflow/weights`), float32, as a
    DiscreteTimeModel; checks the card's sha256 fingerprint against the weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = WEIGHTS if folder is None else Path(folder)
    wpath, cpath = folder / "digits.safetensors", folder / "digits.json"
    for p in (wpath, cpath):
        if not p.is_file():
            raise FileNotFoundError(f"digits model: {p} is missing (train one with `probflow train digits`)")
    try:
        with safe_open(str(wpath), framework="pt") as f:
            cfg = json.loads(f.metadata()["unet_config"])
        sd = load_file(str(wpath))
    except Exception as e:
        raise ValueError(f"weights: could not read {wpath} (corrupt or not a digits checkpoint): {e}") from e
    with open(cpath, encoding="utf-8") as f:
        card = json.load(f)
    net = UNet(**cfg)
    net.load_state_dict(sd, strict=True)
    model = as_model(net, "digits", card)
    want = card.get("fingerprint")
    if want and want != model.fingerprint:
        raise ValueError(f"weights: {wpath} does not match the fingerprint in its card {cpath}")
    return model


# ---------------------------------------------------------------- metrics


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
    from probflow.flows import noise, sample
    from probflow.grids import ddim

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


# ---------------------------------------------------------------- the `train` command


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=["digits"], help="what to train on (scikit-learn's 8×8 digits)")
    p.add_argument("--seed", type=int, default=0, help="training seed (init, batches, t, ε); default 0")
    p.add_argument("--steps", type=int, default=CONFIG["steps"], help=f"optimiser steps (default {CONFIG['steps']})")
    p.add_argument("--out", default=".", help="folder for digits.safetensors and digits.json (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--eval-samples", type=int, default=2000,
                   help="samples per solver for the card's metrics (0: skip the evaluation); default 2000")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


def run_train(args: argparse.Namespace) -> int:
    """`probflow train digits`: train, evaluate, write the checkpoint and its card."""
    out = Path(args.out)
    if not args.force:
        for name in ("digits.safetensors", "digits.json"):
            if (out / name).exists():
                raise FileExistsError(f"--out: {out / name} exists; pass --force to overwrite")
    if args.steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {args.steps}")
    if args.eval_samples < 0:
        raise ValueError(f"--eval-samples: expected >= 0, got {args.eval_samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = (f"probflow train digits --seed {args.seed} --steps {args.steps} --threads {torch.get_num_threads()} "
               f"--eval-samples {args.eval_samples} --out {args.out}")
    print(f"training the digits ε-UNet: seed {args.seed}, {args.steps} steps, {torch.get_num_threads()} threads",
          flush=True)
    net, rec = train(args.seed, args.steps, log_every=max(1, args.steps // 20))
    model = as_model(net)
    split = load_split()
    card = {
        "name": "digits",
        "description": "ε-UNet trained with the DDPM objective (Eq. 8: uniform t, ε-MSE) on scikit-learn's 8×8 digits",
        "command": command,
        "data": {"source": "sklearn.datasets.load_digits", "scaling": "x = pixel/8 - 1, in [-1, 1]", "shape": [1, 8, 8],
                 "split": f"stratified train_test_split(test_size={TEST_FRACTION}, random_state={SPLIT_SEED})",
                 "n_train": len(split["x_train"]), "n_test": len(split["x_test"])},
        "schedule": {"name": "linear", "T": CONFIG["T"], "beta_start": CONFIG["beta_start"],
                     "beta_end": CONFIG["beta_end"]},
        "prediction_type": "epsilon",
        "network": {"class": "probflow.unet.UNet", "config": net.config(),
                    "parameters": sum(p.numel() for p in net.parameters()), "dtype": "float32"},
        "training": {**rec["recipe"], "seed": args.seed, "steps": args.steps, "final_loss": rec["final_loss"],
                     "wall_s": round(rec["wall_s"], 1), "threads": torch.get_num_threads(),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "torch": torch.__version__},
        "fingerprint": model.fingerprint,
    }
    if args.eval_samples:
        print(f"evaluating with {args.eval_samples} samples per solver", flush=True)
        t0 = time.time()
        card["metrics"] = evaluate(model, n=args.eval_samples, log=True)
        card["metrics"]["wall_s"] = round(time.time() - t0, 1)
    wpath, cpath = save(net, card, out, force=args.force)
    print(f"wrote {wpath} ({wpath.stat().st_size / 1e6:.2f} MB) and {cpath}")
    return 0
