"""`probflow sample`: new images from seeded noise, down Eq. 12 (or a stochastic sampler), as a PNG grid.

One path, each step a floor lower: the arguments become a checked request (`probflow.cli.request`), the
command opens its world, output and model (`probflow.cli.common.open_model`), sizes its output and builds its
grid from the model, and hands the solve to the chunk runner (`probflow.cli.common.solve_in_chunks` →
`probflow.distributed.solve_chunks`); rank 0 writes the PNG (`probflow.ranks.on_rank0`)."""

from __future__ import annotations

import argparse

from probflow.cli.common import add_solver_arguments


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
    from probflow.cli.common import condition_text, make_method, nfe_text, open_model, sample_plan, solve_in_chunks
    from probflow.cli.request import sample_request
    from probflow.files.images import save_grid
    from probflow.ranks import on_rank0

    req = sample_request(args)  # read and checked once; `args` is not used after this line
    job = open_model(req.run, req.out)
    model, device, w = job.model, job.device, job.w
    shape, sigmas, fn = sample_plan(req, model)
    seed = req.seed + 1  # the path noise's streams, apart from x_T's
    sol = solve_in_chunks(req.run, req.solver, model, fn, req.n,
                          lambda a, b: probflow.noise(b - a, shape, req.seed, start=a).to(device), sigmas,
                          lambda a, b: make_method(req.solver, seed, range(a, b)), "sample", w=w)
    on_rank0(lambda: save_grid(sol.x.cpu(), req.out, force=req.run.force, scale=req.scale,
                               data_range=getattr(model, "data_range", (-1.0, 1.0))), w=w)
    if w.rank == 0:
            print(f"wrote {req.out}: {req.n} samples, {make_method(req.solver, seed).name}, {nfe_text(sol)}"
              f"{condition_text(model)}")
    return 0
