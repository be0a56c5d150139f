"""The class-conditional 32×32 digits model: data, DDPM training with label dropout, and its diffusers folder.

Data: scikit-learn's digits (the fixed split of `probflow.digits.data`) upsampled 8×8 → 32×32 bilinearly
(`torch.nn.functional.interpolate`, align_corners=False), in [−1, 1], with their labels. Why this set: it is
the only labelled image set available offline here (scikit-learn ships it), so that class conditioning, an
independent classifier and the train/test Fréchet floor all exist; its limit is that the images carry 8×8
worth of detail, so the network learns smooth shapes, not texture.

Network: diffusers `UNet2DModel` (GroupNorm, residual blocks, self-attention at 16×16, 8×8 and in the middle)
with `num_class_embeds = 11`: classes 0 … 9 and the null class 10 used for classifier-free guidance.

Training (DDPM, Ho et al. 2020): t ~ U{0, …, T−1} on the linear table (T = 1000, β 1e-4 … 0.02),
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, loss |ε − ε_θ(x_t, t, c)|², where c is the label replaced by the null
class with probability `label_dropout` (CFG training, Ho & Salimans 2022). Adam with linear warm-up and
cosine decay; the exponential moving average of the weights is what ships. Same seed and thread count →
identical weights. The output folder is diffusers' `save_pretrained` layout (unet/, scheduler/,
model_index.json) plus probflow's `card.json`, so it loads through the same loader as users' folders.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from probflow.digits.data import SPLIT_SEED, TEST_FRACTION
from probflow.digits.data32 import downsample, load_split32
from probflow.digits.train import adam_ema_step
from probflow.models.adapters import fingerprint

__all__ = ["CONFIG32", "UNET32", "NULL_CLASS", "load_split32", "downsample", "build_unet", "train32", "save_folder",
           "make_card", "train_digits32", "check_out_folder32"]

NULL_CLASS = 10
# The network (diffusers UNet2DModel config) and the recipe (the train command's defaults).
UNET32 = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32, 64],
          "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
          "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
          "attention_head_dim": 16, "num_class_embeds": NULL_CLASS + 1}
CONFIG32 = {"batch": 32, "lr": 2e-3, "warmup": 100, "ema": 0.995, "steps": 2500, "label_dropout": 0.1,
            "T": 1000, "beta_start": 1e-4, "beta_end": 0.02, "checkpoint_every": 250, "prediction_type": "v_prediction"}
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
             "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "v_prediction", "clip_sample": False,
             "set_alpha_to_one": True, "timestep_spacing": "trailing", "steps_offset": 0}


def build_unet(config: dict | None = None):
    """The diffusers UNet2DModel of `config` (default UNET32)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or UNET32))


def _lr(i: int, steps: int, lr: float, warmup: int) -> float:
    if i < warmup:
        return lr * (i + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))


def train32(seed: int = 0, steps: int = CONFIG32["steps"], *, batch: int = CONFIG32["batch"],
            lr: float = CONFIG32["lr"], warmup: int = CONFIG32["warmup"], ema: float = CONFIG32["ema"],
            label_dropout: float = CONFIG32["label_dropout"], log_every: int = 0, checkpoint=None,
            checkpoint_every: int = 0, prediction_type: str = CONFIG32["prediction_type"],
            init: str | os.PathLike | None = None, stop_after: int | None = None):
    """Train the class-conditional UNet (module docstring); returns (EMA network in eval mode, record).

    prediction_type: the network's target, "epsilon" (ε) or "v_prediction" (v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x_0,
    better conditioned at large σ, where an ε-network must reproduce its input to within 1/σ). init: a
    digits32 folder whose UNet weights start both the network and its average (a warm start). stop_after:
    stop after this many steps of the `steps`-step learning-rate schedule. `checkpoint(ema_net, record)` is
    called every `checkpoint_every` steps (0: never) with the EMA so far."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if stop_after is not None and not (isinstance(stop_after, int) and 1 <= stop_after <= steps):
        raise ValueError(f"stop_after: expected an integer in 1 … steps, got {stop_after!r}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout: expected a probability in [0, 1), got {label_dropout!r}")
    from probflow.schedules import linear

    data = load_split32()
    x0, y0 = data["x_train"], data["y_train"]
    ab = linear(CONFIG32["T"], CONFIG32["beta_start"], CONFIG32["beta_end"]).alpha_bar.to(torch.float32)
    torch.manual_seed(seed)
    net, avg = build_unet(), build_unet()
    if init is not None:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(Path(init) / "unet" / "diffusion_pytorch_model.safetensors")), strict=True)
    avg.load_state_dict(net.state_dict())
    avg.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    t_start = time.time()
    net.train()

    def record(done: int) -> dict:
        return {"seed": seed, "steps": steps, "completed_steps": done, "wall_s": round(time.time() - t_start, 1),
                "prediction_type": prediction_type, "init": None if init is None else str(init),
                "final_loss": float(np.mean(losses[-min(200, len(losses)):])) if losses else None,
                "loss_every_100": [round(float(np.mean(losses[k:k + 100])), 5) for k in range(0, len(losses), 100)],
                "recipe": {"batch": batch, "lr": lr, "warmup": warmup, "ema": ema, "label_dropout": label_dropout,
                           "optimizer": "Adam, linear warm-up then cosine decay to 0"}}

    for i in range(stop_after or steps):
        idx = torch.randint(0, len(x0), (batch,), generator=g)
        t = torch.randint(0, CONFIG32["T"], (batch,), generator=g)
        eps = torch.randn(batch, *x0.shape[1:], generator=g)
        drop = torch.rand(batch, generator=g) < label_dropout
        y = torch.where(drop, torch.full_like(y0[idx], NULL_CLASS), y0[idx])
        a = ab[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0[idx] + (1 - a).sqrt() * eps
        target = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0[idx]
        loss = (net(xt, t, class_labels=y).sample - target).pow(2).mean()
        adam_ema_step(opt, loss, _lr(i, steps, lr, warmup), net, avg, ema, i)
        losses.append(loss.item())
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  {time.time() - t_start:.0f}s",
                  flush=True)
        last = (i + 1) == (stop_after or steps)
        if checkpoint is not None and checkpoint_every and (i + 1) % checkpoint_every == 0 and not last:
            checkpoint(avg.eval(), record(i + 1))
    return avg.eval().requires_grad_(False), record(stop_after or steps)


FOLDER_ENTRIES = frozenset({"unet", "scheduler", "model_index.json", "card.json"})


def check_out_folder32(out: str | os.PathLike, force: bool = False) -> Path:
    """Before any work: `out` does not exist or is empty, or (with `force`) holds only what `save_folder`
    writes; its parent exists. Returns the absolute path."""
    out = Path(os.path.abspath(out))
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise FileExistsError(f"--out: {out} exists and is not a folder")
        entries = {e.name for e in out.iterdir()}
        if entries and not force:
            raise FileExistsError(f"--out: folder {out} exists and is not empty; pass --force to replace it")
        if entries - FOLDER_ENTRIES:
            raise ValueError(f"--out: --force replaces {out} as a whole, but it holds "
                             f"{sorted(entries - FOLDER_ENTRIES)[:3]}, which this command did not write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out: cannot write in folder {out.parent}")
    return out


def save_folder(unet, card: dict, out: str | os.PathLike, force: bool = False) -> Path:
    """Write the diffusers folder: unet/ (config.json, diffusion_pytorch_model.safetensors),
    scheduler/scheduler_config.json, model_index.json and card.json, into a temporary sibling renamed into
    place at the end (an interrupted run leaves `out` as it was). Refuses an existing folder unless `force`
    (then it is replaced as a whole; `check_out_folder32`)."""
    out = check_out_folder32(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        (tmp / "scheduler").mkdir()
        index = {"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", "DDIMScheduler"]}
        sched = {**SCHEDULER, "prediction_type": card.get("prediction_type", SCHEDULER["prediction_type"])}
        for path, obj in ((tmp / "scheduler" / "scheduler_config.json", sched),
                          (tmp / "model_index.json", index), (tmp / "card.json", card)):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
                f.write("\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.parent / f".{out.name}.{os.getpid()}.old"
            os.rename(out, old)
        os.replace(tmp, out)
    finally:
        if old is not None and old.exists():
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, out)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_card(command: str, rec: dict, unet, metrics: dict | None = None) -> dict:
    """The model card: data, network, schedule, training record and (when given) the quality metrics."""
    split = load_split32()
    return {
        "name": "digits32",
        "description": ("class-conditional ε-UNet (diffusers UNet2DModel, self-attention, num_class_embeds = 11) "
                        "trained with the DDPM objective and label dropout for classifier-free guidance on "
                        "scikit-learn's digits upsampled to 32×32"),
        "command": command,
        "classes": [str(k) for k in range(10)], "null_class": NULL_CLASS,
        "data": {"source": "sklearn.datasets.load_digits",
                 "scaling": "x = pixel/8 - 1, then bilinear 8×8 → 32×32 (align_corners=False)",
                 "shape": [1, 32, 32],
                 "split": f"stratified train_test_split(test_size={TEST_FRACTION}, random_state={SPLIT_SEED})",
                 "n_train": len(split["x_train"]), "n_test": len(split["x_test"])},
        "network": {"class": "diffusers.UNet2DModel", "config": UNET32,
                    "parameters": sum(p.numel() for p in unet.parameters()), "dtype": "float32"},
        "prediction_type": rec["prediction_type"],
        "scheduler": {**SCHEDULER, "prediction_type": rec["prediction_type"]},
        "training": {**rec, "threads": torch.get_num_threads(),
                     "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                     "torch": torch.__version__},
        "fingerprint": fingerprint(unet),
        **({"metrics": metrics} if metrics else {}),
    }


def train_digits32(out: str | os.PathLike, seed: int = 0, steps: int = CONFIG32["steps"], eval_per_class: int = 100,
                   force: bool = False, checkpoint_every: int = CONFIG32["checkpoint_every"],
                   prediction_type: str = CONFIG32["prediction_type"], init: str | None = None,
                   stop_after: int | None = None) -> Path:
    """Train (`train32`), evaluate (`probflow.digits.metrics32.evaluate32` at w = 0, 1, 3 with
    `eval_per_class` samples per class; 0 skips it) and write the folder `out` (`save_folder`). Every
    `checkpoint_every` steps the EMA so far is written to `out` with a card saying how many steps it has."""
    if not isinstance(eval_per_class, int) or eval_per_class < 0:
        raise ValueError(f"--eval-samples: expected an integer >= 0, got {eval_per_class!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every: expected an integer >= 0, got {checkpoint_every!r}")
    check_out_folder32(out, force)
    command = (f"probflow train digits32 --seed {seed} --steps {steps} --threads {torch.get_num_threads()} "
               f"--eval-samples {eval_per_class} --checkpoint-every {checkpoint_every} --prediction {prediction_type}"
               + (f" --init {init}" if init else "") + (f" --stop-after {stop_after}" if stop_after else "")
               + f" --out {out}")
    print(f"training the class-conditional 32×32 digits UNet: seed {seed}, {steps} steps, "
          f"{torch.get_num_threads()} threads", flush=True)
    written = [False]

    def checkpoint(net, rec: dict) -> None:
        save_folder(net, make_card(command, rec, net), out, force=force or written[0])
        written[0] = True
        print(f"checkpoint at step {rec['completed_steps']} written to {out}", flush=True)

    net, rec = train32(seed, steps, log_every=max(1, min(50, steps // 20)), checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, prediction_type=prediction_type, init=init,
                       stop_after=stop_after)
    metrics = None
    if eval_per_class:
        save_folder(net, make_card(command, rec, net), out, force=force or written[0])
        written[0] = True
        from probflow.digits.metrics32 import evaluate32
        from probflow.models.diffusers_folders import load_conditional

        t0 = time.time()
        metrics = evaluate32(load_conditional(out, class_label=0), n_per_class=eval_per_class, log=True)
        metrics["wall_s"] = round(time.time() - t0, 1)
    folder = save_folder(net, make_card(command, rec, net, metrics), out, force=force or written[0])
    size = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    print(f"wrote {folder} (weights {size / 1e6:.2f} MB)", flush=True)
    return folder
