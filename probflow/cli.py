"""The `probflow` command. Each subcommand lives in the module that holds its subject, which exposes
`add_<name>_arguments(parser)` and `run_<name>(args) -> int`; such modules import heavy libraries
(diffusers, scikit-learn) inside `run_<name>`, so that `probflow --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("probflow.demo", "sample the built-in 2-D mixture with DDIM (Euler), rk4 and dopri5; error vs NFE"),
    "train": ("probflow.digits", "train the digits ε-UNet (DDPM objective) and write its checkpoint and card"),
    "bench": ("probflow.bench", "compare every solver, grid and NFE against exact ground truth and diffusers"),
    "sample": ("probflow.images", "sample an image model (default: digits) from seeded noise into a PNG grid"),
    "encode": ("probflow.images", "invert PNG/JPEG images to their latents x_T (a safetensors file with provenance)"),
    "decode": ("probflow.images", "decode a latent file back to images (exact for a reversible method)"),
    "interpolate": ("probflow.images", "encode two images, slerp their latents, decode the frames into a PNG strip"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probflow", description="DDIM as Euler on the σ-ODE (Eq. 12).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    run = getattr(importlib.import_module(COMMANDS[args.command][0]), f"run_{args.command}")
    try:
        return int(run(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"probflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
