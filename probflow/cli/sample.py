"""`probflow sample`: new images from seeded noise, down Eq. 12 (or a stochastic sampler), as a PNG grid."""

from __future__ import annotations

import argparse

from probflow.cli.common import (
    add_solver_arguments,
    apply_runtime,
    check_solver_args,
    grid,
    load_image_model,
    run_chunks,
    solver_method,
)
from probflow.distributed import on_rank0
from probflow.io.atomic import check_writable


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="PNG file for the grid of samples")
    p.add_argument("--n", "--samples", dest="n", type=int, default=16,
                   help="number of samples (default 16); under torchrun spell it --samples (Python 3.11's argparse "
                        "in torchrun reads --n as an ambiguous abbreviation of its own --nnodes/--nproc-per-node)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (per-sample streams; default 0)")
    p.add_argument("--scale", type=int, default=None,
                   help="enlarge each image by pixel repetition (default: to at least 32 px; 1 keeps pixels exact)")
    add_solver_arguments(p, "rk4", 25, stochastic=True)


def run_sample(args: argparse.Namespace) -> int:
    """n samples x_0 from `probflow.noise(n, shape, seed)` by `probflow.sample`, written as one PNG grid."""
    import probflow
    from probflow.io.images import save_grid

    check_solver_args(args)
    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of samples, got {args.n}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a non-negative integer, got {args.seed}")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale: expected a positive integer, got {args.scale}")
    rt = apply_runtime(args)
    on_rank0(lambda: check_writable(args.out, args.force, "--out"), w=rt.world)
    model = load_image_model(args.model, args.device, limits=not args.no_limits)
    method = solver_method(args, seed=args.seed + 1)
    sig = grid(args, model, method)
    shape = tuple(model.sample_shape)
    sol = run_chunks(args, rt, model, probflow.sample, args.n, lambda a, b: probflow.noise(
        b - a, shape, args.seed, start=a), sig, lambda a, b: solver_method(args, args.seed + 1, range(a, b)), "sample")
    on_rank0(lambda: save_grid(sol.x.cpu(), args.out, force=args.force, scale=args.scale,
                               data_range=getattr(model, "data_range", (-1.0, 1.0))), w=rt.world)
    if rt.world.rank == 0:
        print(f"wrote {args.out}: {args.n} samples, {method.name}, NFE {sol.nfe}")
    return 0
