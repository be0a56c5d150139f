"""`python -m probflow …` is the `probflow` command.

Ctrl-C before the command has started (while torch is imported) prints one line and exits 130, like Ctrl-C during
a run (`probflow.cli.main` handles that one)."""

import signal
import sys


def _interrupted(signum, frame) -> None:
    print("probflow: interrupted", file=sys.stderr)
    raise SystemExit(128 + signum)


def run() -> int:
    signal.signal(signal.SIGINT, _interrupted)
    from probflow.cli import main  # imports torch: seconds

    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main()


if __name__ == "__main__":
    sys.exit(run())
