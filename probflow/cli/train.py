"""`probflow train digits`: the shipped digits model's training (`probflow.digits.train.train_digits`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from probflow.io.atomic import check_writable
from probflow.models.digits import CONFIG


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", choices=["digits"], help="what to train on (scikit-learn's 8×8 digits)")
    p.add_argument("--seed", type=int, default=0, help="training seed (init, batches, t, ε); default 0")
    p.add_argument("--steps", type=int, default=CONFIG["steps"], help=f"optimiser steps (default {CONFIG['steps']})")
    p.add_argument("--out", default=".", help="folder for digits.safetensors and digits.json (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    p.add_argument("--eval-samples", type=int, default=2000,
                   help="samples per solver for the card's metrics (0: skip the evaluation); default 2000")


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
    check_out_folder(args.out, args.force)
    check_threads(args.threads, limits)
    start(threads=args.threads, spread=False)
    train_digits(args.out, args.seed, args.steps, args.eval_samples, args.force)
    return 0
