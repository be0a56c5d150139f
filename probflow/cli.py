"""The `probflow` command. Each subcommand lives in the module that holds its subject and exposes
`add_arguments(parser)` and `run(args) -> int`; such modules import heavy libraries (diffusers,
scikit-learn) inside `run`, so that `probflow --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("probflow.demo", "sample the built-in 2-D mixture with DDIM (Euler) and dopri5; error vs NFE"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probflow", description="DDIM as Euler on the σ-ODE (Eq. 12).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"probflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
