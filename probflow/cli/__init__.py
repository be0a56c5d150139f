"""The `probflow` command: a thin layer over the Python API, one module per command group.

Each module in `COMMANDS` exposes `add_<name>_arguments(parser)` and `run_<name>(args) -> int`; modules import
heavy libraries (diffusers, scikit-learn) inside `run_<name>`, so that `probflow --help` stays fast. Errors
in what the user gave (ValueError, missing, existing or unwritable files) print one line and exit with status 2;
Ctrl-C prints one line and exits with 130, SIGTERM likewise with 143 (outputs are atomic: the temporary files
are removed on the way out).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from probflow.cli.common import add_runtime_arguments
from probflow.distributed import RankFailed, finish, joined, set_threads
from probflow.integrate import MaxStepsError
from probflow.version import __version__

# name: (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("probflow.cli.demo", "sample the built-in 2-D mixture with DDIM (Euler), rk4 and dopri5; error vs NFE"),
    "train": ("probflow.cli.train", "train the digits ε-UNet (DDPM objective) and write its checkpoint and card"),
    "bench": ("probflow.cli.bench", "compare every solver, grid and NFE against exact ground truth and diffusers"),
    "sample": ("probflow.cli.sample", "sample an image model (default: digits) from seeded noise into a PNG grid"),
    "encode": ("probflow.cli.inversion", "invert PNG/JPEG images to their latents x_T (a safetensors file)"),
    "decode": ("probflow.cli.inversion", "decode a latent file back to images"),
    "interpolate": ("probflow.cli.inversion", "encode two images, mix their latents, decode the frames into a strip"),
    "likelihood": ("probflow.cli.likelihood", "bits/dim of 8-bit images under an image model (ODE log-likelihood)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probflow", description="DDIM as Euler on the σ-ODE (Eq. 12).")
    parser.add_argument("--version", action="version", version=f"probflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
        add_runtime_arguments(p)  # --threads for every command (kept as is where a command has its own)
    return parser


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span dozens of lines), at most 400 chars."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    msg = lines[0] + (" …" if len(lines) > 1 else "")
    return msg if len(msg) <= 400 else msg[:399] + "…"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one command (see `_run`), with SIGTERM handled like Ctrl-C while it runs."""
    if threading.current_thread() is not threading.main_thread():
        return _run(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None = None) -> int:
    """Run one command. Bad input — ValueError, a missing/existing/unwritable file (OSError), a number out of
    range (OverflowError, FloatingPointError) — prints one line `probflow CMD: error: …` and returns 2;
    Ctrl-C prints one line and returns 130 (outputs are atomic, so nothing half-written is left)."""
    command = "command"
    ours = not joined()  # leave a process group the caller made (main() called from a torchrun script)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        command = args.command
        run = getattr(importlib.import_module(COMMANDS[command][0]), f"run_{command}")
        if getattr(args, "runtime_threads", False):
            set_threads(args.threads)
        return int(run(args) or 0)
    except (ValueError, OSError, OverflowError, FloatingPointError, MaxStepsError) as e:
        print(f"probflow {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RankFailed as e:  # torchrun: a rank failed; every rank exits with its message, nothing was written
        print(f"probflow {command}: error: {e}", file=sys.stderr)
        return 2 if e.user_error else 1
    except _Terminated:
        print(f"probflow {command}: terminated; nothing half-written was left behind", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"probflow {command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    finally:
        if ours:
            finish()


if __name__ == "__main__":
    sys.exit(main())
