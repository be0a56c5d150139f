"""`probflow demo`: the built-in 2-D mixture sampled by DDIM, rk4 and dopri5 (`probflow.demo`)."""

from __future__ import annotations

import argparse

from probflow.files.atomic import check_writable


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="probflow-demo.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--n", type=int, default=256, help="number of samples (default: %(default)s; at most 100000 "
                   "unless --no-limits)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run_demo(args: argparse.Namespace) -> int:
    from probflow import schedules
    from probflow.cli.common import start
    from probflow.cli.request import bounded, check_out_file, check_threads, seed
    from probflow.demo import format_table, plot, run_demo_study

    limits = not args.no_limits
    bounded("--n", args.n, limits, key="--demo-n", why=" (each sample is solved by 10 solvers and a DOP853 "
            "reference at rtol = atol = 1e-10)")
    seed(args.seed)
    out = check_out_file(args.out)
    check_threads(args.threads, limits)
    start(threads=args.threads, spread=False)
    check_writable(out, args.force, "--out")
    study = run_demo_study(args.n, args.seed)
    print(f"\n2-D Gaussian mixture, {args.n} samples from x_T at σ_max = {schedules.linear().sigma_max:.2f} "
          "(t = 999, DDPM linear) to σ = 0; error against DOP853 at rtol = atol = 1e-10\n")
    print(format_table(study["rows"]))
    plot(study, out, args.force)
    print(f"\nwrote {out}")
    return 0
