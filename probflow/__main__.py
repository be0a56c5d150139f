"""`python -m probflow …` is the `probflow` command.

Ctrl-C before the command has started (while torch is imported) prints one line and exits 130, like Ctrl-C during
a run (`probflow.cli.main` handles that one)."""

import os
import signal
import sys

from probflow import _interrupted  # the package's import-time Ctrl-C guard, used again below


def run() -> int:
    signal.signal(signal.SIGINT, _interrupted)
    from probflow.cli import main  # imports torch: seconds

    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main()
    if code in (130, 143):
        # interrupted or terminated: the one line is printed and every output is atomic, so end with that status now.
        # Python's own shutdown re-raises SIGINT on itself (exit status −2 instead of 130) when the KeyboardInterrupt
        # was first raised inside a nested evaluation, even one the command then caught (seen once in the suite).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
