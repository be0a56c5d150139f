"""probflow: DDIM is the Euler method on the σ-ODE (Eq. 12). Compare solvers, invert exactly, teach the limit.

    dx̄/dσ = ε_θ(x̄/sqrt(σ² + 1), σ),     x̄ = x·sqrt(1 + σ²),     σ = sqrt((1 − ᾱ)/ᾱ)

Public API: `DDIMField` (Eq. 12), `integrate` (the one integrate path; `Control`, its step-size control),
`sample`/`decode`/`encode`/`interpolate` (in the model's variable x), `grids`, `schedules`, `models`, `solvers`
(the name → method registry). Heavy optional modules (diffusers) are imported lazily, never here.
"""

import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _starting_the_cli() -> bool:
    """`probflow …` or `python -m probflow …` is starting (argv[0] is "-m" while -m locates the module)."""
    a0 = _sys.argv[0] if _sys.argv else ""
    cli = a0 == "-m" or _os.path.basename(a0) == "probflow"
    return cli and _threading.current_thread() is _threading.main_thread()


def _interrupted(signum, frame) -> None:
    """Ctrl-C while the command line is still importing (nothing written yet): one line, and exit at once. Not by
    raising SystemExit: raised in the middle of a C++ extension's import (torch's pybind11 modules) it aborts the
    process (exit −6, a C++ traceback) instead, and a library's bare except could swallow it."""
    print("probflow: interrupted", file=_sys.stderr, flush=True)
    _os._exit(128 + signum)


# Ctrl-C while the command line is still importing torch (seconds) is one line and exit 130, as during a run; a
# library import leaves the handler alone, and the command's own handler takes over once it runs.
_previous = _signal.signal(_signal.SIGINT, _interrupted) if _starting_the_cli() else None

from probflow import grids, models, schedules, solvers  # noqa: E402 (after the Ctrl-C guard)
from probflow.field import DDIMField, as_field  # noqa: E402 (after the Ctrl-C guard)
from probflow.flows import decode, encode, interpolate, lerp, noise, sample, slerp  # noqa: E402 (after the Ctrl-C guard)
from probflow.integrate import Control, Solution, integrate  # noqa: E402 (after the Ctrl-C guard)
from probflow.version import __version__  # noqa: E402 (after the Ctrl-C guard)

if _previous is not None:
    _signal.signal(_signal.SIGINT, _previous)

__all__ = [
    "__version__",
    "Control",
    "DDIMField",
    "Solution",
    "as_field",
    "decode",
    "encode",
    "grids",
    "integrate",
    "interpolate",
    "lerp",
    "models",
    "noise",
    "sample",
    "schedules",
    "slerp",
    "solvers",
]
