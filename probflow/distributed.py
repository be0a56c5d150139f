"""Runs over `torch.distributed` ranks whose results do not depend on the world size: the public face of
`probflow.ranks` (torchrun's world, torch's threads, work in chunks over the ranks, `on_rank0`) and
`probflow.chunks` (the one chunk runner), with the precision applied once (`solve_chunks`) and the
conveniences `sample` and `solve`.

A chunk of `chunk` consecutive samples runs on one rank as ONE batch, so a sample's bytes do not depend on the
number of ranks (on a deterministic device: CPU, same torch build and thread count); changing `chunk` changes
batch-mates. Ranks never synchronise inside a solve; a rank that fails makes the others stop within about a
second, and every rank raises `RankFailed` naming it (`probflow.ranks` says how).

Launch: `torchrun --nproc-per-node N -m probflow ...` (or `probflow launch ...`); `world()` joins the process
group from torchrun's variables (gloo on CPU, NCCL on CUDA), and without them is a world of one process.

Python::

    from probflow import distributed as dist
    w = dist.world()                                       # rank/size from torchrun's variables, or 0/1
    sol = dist.sample(model, 64, sigmas, "euler", chunk=16, seed=0)  # Solution on rank 0, None elsewhere
    if w.rank == 0: ...                                    # combine and write (see `on_rank0`)
    dist.finish()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from probflow.chunks import concat_solutions, run_chunks, slice_state
from probflow.precision import Precision
from probflow.ranks import (
    Abort,
    RankFailed,
    World,
    cat_batch,
    chunk_bounds,
    default_threads,
    finish,
    joined,
    map_cells,
    map_chunks,
    on_rank0,
    set_threads,
    world,
)

__all__ = ["World", "RankFailed", "world", "joined", "finish", "chunk_bounds", "map_chunks", "map_cells", "on_rank0",
           "default_threads", "set_threads", "concat_solutions", "slice_state", "cat_batch", "solve_chunks",
           "sample", "solve", "Abort"]


def solve_chunks(fn: Callable[..., Any], model: Any, n: int, inputs: Tensor | Callable[[int, int], Tensor],
                 sigmas: Tensor, method: Any = "euler", *, chunk: int = 64, state: Any = None,
                 precision: Any = None, device: torch.device | str | None = None,
                 hook: Callable[[Tensor, Tensor], None] | None = None, w: World | None = None,
                 everywhere: bool = False, **kw: Any):
    """`fn(field, x, sigmas, method, state=…, **kw)` (`probflow.sample`/`encode`/`decode`, or a function of
    their signature) on every chunk [a, b) of n samples, over the ranks, by the one chunk runner
    (`probflow.chunks.run_chunks`, which says what inputs, method, state and hook may be); the chunks'
    Solutions concatenated on rank 0 (every rank with `everywhere`), None on the others.

    precision (`probflow.precision`, the one precision path), applied once before the runner: `device` checked
    to run its dtypes (default: the inputs' device, else the device of the model's weights, else the CPU), the
    model cast once (`Precision.cast_model`) and run in the model dtype, each chunk's x put in the state's
    dtype. None runs `model` as it is (a DDIMField keeps its own dtype boundary).
    """
    where = torch.device(device) if device is not None else _device_of(model, inputs)
    p = Precision.parse(precision)
    if p is not None:
        model = p.check_device(where).cast_model(model)
    return run_chunks(fn, model, n, inputs, sigmas, method, chunk=chunk, state=state,
                      model_dtype=None if p is None else p.model, dtype=None if p is None else p.state, hook=hook,
                      w=w, everywhere=everywhere, **kw)


def _device_of(model: Any, inputs: Any) -> torch.device:
    """Where a solve runs: the inputs' device, else that of the model's first weight, else the CPU."""
    if isinstance(inputs, Tensor):
        return inputs.device
    net = getattr(model, "net", model)
    weight = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
    return weight.device if weight is not None else torch.device("cpu")


def sample(model: Any, n: int, sigmas: Tensor, method: Any = "euler", *, chunk: int = 64, seed: int = 0,
           shape: Sequence[int] | None = None, w: World | None = None, everywhere: bool = False,
           **kw: Any):
    """n samples x_0 = `probflow.sample` from `probflow.noise(·, shape, seed)`, chunk by chunk over the ranks
    (`solve_chunks`).

    Sample i's noise is stream (seed, i) and chunk k's batch is samples [k·chunk, (k+1)·chunk): the result is
    the same for every world size. kw: rtol, atol, precision, options (as `probflow.sample`). Returns the
    concatenated Solution on rank 0 (every rank with `everywhere`), None on the others.
    """
    from probflow.flows import noise
    from probflow.flows import sample as sample_

    shape = tuple(shape if shape is not None else getattr(model, "sample_shape", None) or ())
    if not shape:
        raise ValueError("shape: give the sample shape (the model has no sample_shape)")
    return solve_chunks(sample_, model, n, lambda a, b: noise(b - a, shape, seed, start=a), sigmas, method,
                        chunk=chunk, w=w, everywhere=everywhere, **kw)


def solve(what: str, model: Any, x: Tensor, sigmas: Tensor, method: Any = "euler", *, chunk: int = 64,
          state: Any = None, w: World | None = None, everywhere: bool = False, **kw: Any):
    """`probflow.encode`/`decode`/`sample` (`what`) of the batch x (given on every rank), chunk by chunk over
    the ranks (`solve_chunks`); rows a:b of a reversible `state` go with rows a:b of x. Returns the
    concatenated Solution on rank 0 (every rank with `everywhere`), None on the others."""
    import probflow.flows as flows

    fns = {"sample": flows.sample, "encode": flows.encode, "decode": flows.decode}
    if what not in fns:
        raise ValueError(f"what: expected one of {sorted(fns)}, got {what!r}")
    return solve_chunks(fns[what], model, int(x.shape[0]), x, sigmas, method, chunk=chunk, state=state, w=w,
                        everywhere=everywhere, **kw)
