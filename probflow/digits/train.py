"""Training the digits ε-UNet with the DDPM objective, and writing its checkpoint and card.

Training (DDPM, Ho et al. 2020, Eq. 8 of the seed): t ~ U{0, …, T−1} on the linear table (T = 1000),
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, loss |ε − ε_θ(x_t, t)|²; Adam with linear warm-up and cosine decay,
an exponential moving average of the weights (the EMA is what ships). Reproducible from the seed (same
seed, same thread count → identical weights). `train_digits` is what `probflow train digits` runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from probflow.digits.data import SPLIT_SEED, TEST_FRACTION, load_split
from probflow.digits.metrics import evaluate
from probflow.files.atomic import atomic_write
from probflow.models.digits import CONFIG, as_model, schedule
from probflow.models.unet import UNet

__all__ = ["train", "save", "train_digits", "adam_ema_step"]


def adam_ema_step(opt: torch.optim.Optimizer, loss: Tensor, lr: float, net: torch.nn.Module, avg: torch.nn.Module,
                  ema: float, i: int) -> None:
    """One optimiser step of `net` on `loss` at learning rate `lr`, then `avg` ← the exponential moving average of
    its weights with decay min(ema, (1 + i)/(10 + i)) (a short memory early, when the weights move most)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    decay = min(ema, (1 + i) / (10 + i))
    with torch.no_grad():
        for pa, pn in zip(avg.parameters(), net.parameters()):
            pa.lerp_(pn, 1 - decay)


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
        adam_ema_step(opt, loss, lr_at(i), net, avg, ema, i)
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


def train_digits(out: str | os.PathLike, seed: int = 0, steps: int = CONFIG["steps"], eval_samples: int = 2000,
                 force: bool = False) -> tuple[Path, Path]:
    """Train (`train`), evaluate (`probflow.digits.metrics.evaluate`, unless eval_samples = 0) and write the
    checkpoint and its card into `out`; the card records the command that reproduces it."""
    out = Path(out)
    if not force:
        for name in ("digits.safetensors", "digits.json"):
            if (out / name).exists():
                raise FileExistsError(f"--out: {out / name} exists; pass --force to overwrite")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {steps}")
    if not isinstance(eval_samples, int) or eval_samples < 0:
        raise ValueError(f"--eval-samples: expected >= 0, got {eval_samples}")
    command = (f"probflow train digits --seed {seed} --steps {steps} --threads {torch.get_num_threads()} "
               f"--eval-samples {eval_samples} --out {out}")
    print(f"training the digits ε-UNet: seed {seed}, {steps} steps, {torch.get_num_threads()} threads", flush=True)
    net, rec = train(seed, steps, log_every=max(1, steps // 20))
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
        "network": {"class": "probflow.models.unet.UNet", "config": net.config(),
                    "parameters": sum(p.numel() for p in net.parameters()), "dtype": "float32"},
        "training": {**rec["recipe"], "seed": seed, "steps": steps, "final_loss": rec["final_loss"],
                     "wall_s": round(rec["wall_s"], 1), "threads": torch.get_num_threads(),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "torch": torch.__version__},
        "fingerprint": model.fingerprint,
    }
    if eval_samples:
        print(f"evaluating with {eval_samples} samples per solver", flush=True)
        t0 = time.time()
        card["metrics"] = evaluate(model, n=eval_samples, log=True)
        card["metrics"]["wall_s"] = round(time.time() - t0, 1)
    wpath, cpath = save(net, card, out, force=force)
    print(f"wrote {wpath} ({wpath.stat().st_size / 1e6:.2f} MB) and {cpath}")
    return wpath, cpath
