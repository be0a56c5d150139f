"""`probflow launch [torchrun options] COMMAND [options]` (or `python -m probflow.cli.launch …`): torchrun
for probflow's commands.

The same as `torchrun [torchrun options] -m probflow COMMAND [options]` (probflow.distributed: the ranks'
outputs do not depend on their number), except how it ends: Ctrl-C prints one line and exits with 130
(SIGTERM: 143) instead of torchrun's traceback, and a failed run exits with its ranks' status (2 for bad
input) after their one line, instead of torchrun's failure report. torchrun's own log lines are silenced;
everything before COMMAND (the first word that names a probflow command) goes to torchrun as it is, and
COMMAND's options only to probflow (so `--n` is not read as an abbreviation of torchrun's `--nnodes`).
"""

from __future__ import annotations

import logging
import signal
import sys

__all__ = ["main", "split"]


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, probflow's COMMAND and its options): split at the first word naming a command."""
    from probflow.cli import COMMANDS

    for i, a in enumerate(argv):
        if a in COMMANDS and not (i and argv[i - 1].startswith("-") and "=" not in argv[i - 1]
                                  and argv[i - 1] not in _FLAGS):
            return argv[:i], argv[i:]
    raise ValueError(f"expected a probflow command among the arguments (one of {', '.join(COMMANDS)})")


# torchrun options that take no value (so that the word after them can be the command)
_FLAGS = {"--standalone", "--no-python", "--no_python", "--run-path", "--run_path", "--module", "-m",
          "--redirects", "--tee"}


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, command = split(argv)
    except ValueError as e:
        print(f"probflow launch: error: {e}", file=sys.stderr)
        return 2
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")] + [
            "torch.distributed"]:  # torchrun's log lines (its loggers are made when its modules are imported)
        logging.getLogger(name).setLevel(logging.CRITICAL)
    parser = torchrun.get_args_parser()
    parser.prog = "probflow launch"
    parser.error = lambda message: parser.exit(2, f"probflow launch: error: {' '.join(message.split())}\n")
    args = parser.parse_args([*opts, "-m", "probflow"])
    args.training_script_args = command  # probflow parses its own options (torchrun would read --n as its --nnodes)
    try:
        torchrun.run(args)
    except SignalException as e:  # torchrun stopped its ranks; they said what was (not) written
        return 143 if e.sigval == signal.SIGTERM else 130
    except KeyboardInterrupt:
        return 130
    except ChildFailedError as e:  # the ranks printed their one line (rank 0) or their crash's traceback
        _, failure = e.get_first_failure()
        return failure.exitcode if 0 < failure.exitcode < 128 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
