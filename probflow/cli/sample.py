"""`probflow sample`: new images from seeded noise, down Eq. 12 (or a stochastic sampler), as a PNG grid."""

from __future__ import annotations

import argparse

from probflow.cli.common import add_solver_arguments, check_solver_args, grid, load_image_model, solve, solver_method
from probflow.io.atomic import check_writable


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="PNG file for the grid of samples")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
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
    check_writable(args.out, args.force, "--out")
    model = load_image_model(args.model, args.device, limits=not args.no_limits)
    method = solver_method(args, seed=args.seed + 1)
    sig = grid(args, model, method)
    z = probflow.noise(args.n, tuple(model.sample_shape), args.seed, device=args.device)
    sol = solve(args, model, probflow.sample, z, sig, method, "sample")
    save_grid(sol.x.cpu(), args.out, force=args.force, scale=args.scale,
              data_range=getattr(model, "data_range", (-1.0, 1.0)))
    print(f"wrote {args.out}: {args.n} samples, {method.name}, NFE {sol.nfe}")
    return 0
