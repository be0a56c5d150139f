"""`probflow train digits` / `probflow train digits32`: the shipped models' training
(`probflow.digits.train.train_digits`; the class-conditional 32×32 model:
`probflow.digits.conditional.train_digits32`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from probflow.digits.conditional import CONFIG32
from probflow.files.atomic import check_writable
from probflow.models.digits import CONFIG


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=["digits", "digits32"],
                   help="digits: the 8×8 unconditional ε-UNet; digits32: the class-conditional 32×32 UNet with "
                        "self-attention and label dropout for classifier-free guidance (a diffusers folder)")
    p.add_argument("--seed", type=int, default=0, help="training seed (init, batches, t, ε); default 0")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps (default {CONFIG['steps']} for digits, {CONFIG32['steps']} for digits32)")
    p.add_argument("--out", default=None, help="digits: folder for digits.safetensors and digits.json (default: .); "
                                              "digits32: the diffusers folder to write (default: ./digits32)")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="samples per solver (digits; default 2000) or per class and guidance weight (digits32; "
                        "default 100) for the card's metrics (0: skip the evaluation)")
    p.add_argument("--checkpoint-every", type=int, default=CONFIG32["checkpoint_every"],
                   help="digits32: write the EMA weights so far to --out every N steps (0: never); default "
                        f"{CONFIG32['checkpoint_every']}")
    p.add_argument("--prediction", default=CONFIG32["prediction_type"], choices=["epsilon", "v_prediction"],
                   help=f"digits32: the network's target (default {CONFIG32['prediction_type']})")
    p.add_argument("--init", default=None, help="digits32: a digits32 folder whose UNet weights start the training")
    p.add_argument("--stop-after", type=int, default=None,
                   help="digits32: stop after N steps of the --steps learning-rate schedule")


def check_out_folder(out: str, force: bool) -> None:
    """Before training: --out is a folder (or can be made), writable, without the two files unless --force."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out: {folder} exists and is not a folder")
    if folder.is_dir():
        for name in ("digits.safetensors", "digits.json"):
            check_writable(folder / name, force, "--out")
        return
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    check_writable(existing / ".probflow-train", False, "--out")  # the folder mkdir will create it in


def run_train(args: argparse.Namespace) -> int:
    from probflow.cli.common import start
    from probflow.cli.request import bounded, check_threads, seed
    from probflow.digits.train import train_digits

    limits = not args.no_limits
    seed(args.seed)
    bounded("--steps", args.steps, limits, key="--train-steps")
    bounded("--eval-samples", args.eval_samples, limits, lo=0)
    check_threads(args.threads, limits)
    if args.dataset == "digits32":
        from probflow.digits.conditional import check_out_folder32, train_digits32

        steps = args.steps or CONFIG32["steps"]
        if args.stop_after is not None and not 1 <= args.stop_after <= steps:
            raise ValueError(f"--stop-after: expected an integer in 1 … --steps ({steps}), got {args.stop_after}")
        out = args.out or "digits32"
        check_out_folder32(out, args.force)
        start(threads=args.threads, spread=False)
        train_digits32(out, args.seed, steps, 100 if args.eval_samples is None else args.eval_samples, args.force,
                       args.checkpoint_every, args.prediction, args.init, args.stop_after)
        return 0
    out = args.out or "."
    check_out_folder(out, args.force)
    start(threads=args.threads, spread=False)
    train_digits(out, args.seed, args.steps or CONFIG["steps"], 2000 if args.eval_samples is None
                 else args.eval_samples, args.force)
    return 0
