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
import math
import os
import re
import signal
import sys
import threading
import time

from probflow.cli.common import add_runtime_arguments
from probflow.integrate import MaxStepsError
from probflow.ranks import RankFailed, finish, joined
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`probflow COMMAND: error: …`, exit 2), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = re.sub(r"^argument (-[-\w]+)(/[-\w/]+)?: ", r"\1: ", " ".join(message.split()))
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(text: str) -> int:
    """An integer flag's value: '1000', or an integral number written as '1e9' (then bounded by the request)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v == int(v)):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="probflow", description="DDIM as Euler on the σ-ODE (Eq. 12).",
                     epilog="probflow launch [torchrun options] COMMAND …: COMMAND over torchrun's ranks (Ctrl-C: one "
                            "line, exit 130)")
    parser.add_argument("--version", action="version", version=f"probflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
        add_runtime_arguments(p)  # --threads and --no-limits for every command (a command's own are kept)
        for a in p._actions:
            if a.type is int:
                a.type = integer
    return parser


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span dozens of lines), at most 400 chars."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    msg = lines[0] + (" …" if len(lines) > 1 else "")
    return msg if len(msg) <= 400 else msg[:399] + "…"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


_caught: list[int] = []  # signals received during the command (main thread)


def _terminate(signum, frame) -> None:
    _caught.append(signum)
    raise _Terminated


def _interrupt(signum, frame) -> None:
    _caught.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command (see `_run`), with SIGTERM handled like Ctrl-C while it runs. `probflow launch
    [torchrun options] COMMAND …` runs COMMAND over torchrun's ranks (`probflow.cli.launch`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:
        from probflow.cli.launch import main as launch

        return launch(argv[1:])
    if threading.current_thread() is not threading.main_thread():
        return _run(argv)
    _caught.clear()
    previous = signal.signal(signal.SIGTERM, _terminate), signal.signal(signal.SIGINT, _interrupt)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def _run(argv: list[str] | None = None) -> int:
    """Run one command: its arguments become a typed request (`probflow.cli.request`), which the command runs.
    Bad input — ValueError, a missing/existing/unwritable file (OSError), a number out of range
    (OverflowError, FloatingPointError) — prints one line `probflow CMD: error: …` and returns 2; Ctrl-C
    prints one line and returns 130 (outputs are atomic, so nothing half-written is left). Under torchrun
    only rank 0 prints these lines (every rank knows a RankFailed; a crash's traceback is printed where it
    happened), so a run says each thing once."""
    command = "command"
    ours = not joined()  # leave a process group the caller made (main() called from a torchrun script)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse has printed its one line (or the help): the status, as a return value
            return e.code if isinstance(e.code, int) else 2
        if args.command is None:
            parser.print_help()
            return 2
        command = args.command
        run = getattr(importlib.import_module(COMMANDS[command][0]), f"run_{command}")
        return int(run(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM raised as `_Terminated`
        return _stopped(command, signal.SIGTERM if isinstance(e, _Terminated) else signal.SIGINT)
    except Exception as e:
        if _caught:  # a signal's KeyboardInterrupt became another error inside a library (torch's C++, a loader)
            return _stopped(command, _caught[0])
        if isinstance(e, (ValueError, OSError, OverflowError, FloatingPointError, MaxStepsError)):
            _say(f"probflow {command}: error: {_one_line(e)}")
            _let_rank0_say()
            return 2
        if isinstance(e, RankFailed):  # torchrun: a rank failed; every rank exits with its message, nothing written
            _say(f"probflow {command}: error: {e}")
            return 2 if e.user_error else 1
        raise
    finally:
        if ours:
            finish()


def _stopped(command: str, signum: int) -> int:
    """The one line for Ctrl-C (130) or SIGTERM (143), and the status."""
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    _say(f"probflow {command}: {word}; nothing half-written was left behind")
    return 143 if signum == signal.SIGTERM else 130


def _let_rank0_say(wait: float = 30.0) -> None:
    """Under torchrun, a rank other than 0 that refuses its input before the ranks have joined waits up to `wait`
    seconds before it exits: torchrun stops every rank as soon as one ends, and rank 0, the one that says the line,
    may still be starting (importing torch on a busy machine); it refuses the same input, and its exit ends the
    wait (torchrun then stops this rank)."""
    if os.environ.get("RANK", "0") != "0" and not joined():
        try:
            time.sleep(wait)
        except KeyboardInterrupt:  # torchrun's SIGTERM (or a Ctrl-C): this rank was ending anyway, silently
            pass


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only under torchrun (RANK unset: a single process)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
