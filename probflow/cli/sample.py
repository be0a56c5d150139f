"""`probflow sample`: new images from seeded noise, down Eq. 12 (or a stochastic sampler), as a PNG grid."""

from __future__ import annotations

import argparse

from probflow.cli.common import add_solver_arguments
from probflow.cli.request import SampleRequest, sample_request


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
    req = sample_request(args)  # read and checked once; `args` is not used after this line
    return sample(req)


def sample(req: SampleRequest) -> int:
    import probflow
    from probflow.cli.common import (
        condition_text,
        device_of,
        image_shape,
        load_image_model,
        make_grid,
        make_method,
        nfe_text,
        solve,
        start,
        to_image,
    )
    from probflow.cli.request import check_sizes
    from probflow.distributed import on_rank0
    from probflow.io.atomic import check_writable
    from probflow.io.images import save_grid

    w = start(req.run)
    on_rank0(lambda: check_writable(req.out, req.run.force, "--out"), w=w)
    device = device_of(req.run, w)
    model = load_image_model(req.run, device)
    shape = tuple(model.sample_shape)
    check_sizes("--n", req.n, image_shape(model), req.scale, req.run.limits)
    sigmas = make_grid(req.solver, model)
    seed = req.seed + 1  # the path noise's streams, apart from x_T's
    sol = solve(req.run, req.solver, model, probflow.sample, req.n,
                lambda a, b: probflow.noise(b - a, shape, req.seed, start=a).to(device), sigmas,
                lambda a, b: make_method(req.solver, seed, range(a, b)), "sample", w=w)
    on_rank0(lambda: save_grid(to_image(model, sol.x, req.run.chunk).cpu(), req.out, force=req.run.force,
                               scale=req.scale, data_range=getattr(model, "data_range", (-1.0, 1.0))), w=w)
    if w.rank == 0:
        print(f"wrote {req.out}: {req.n} samples, {make_method(req.solver, seed).name}, {nfe_text(sol)}"
              f"{condition_text(model)}")
    return 0
