"""The one chunk runner, for one process and for torchrun's ranks alike: an ODE solve (`probflow.sample`,
`encode`, `decode`, or a function of their signature) on n samples, chunk by chunk over the ranks
(`probflow.ranks.map_chunks`: chunk k = samples [k·chunk, (k+1)·chunk) on rank k mod W, as one batch, so
that a sample's bytes do not depend on the world size), and the chunks' Solutions joined into one.

The precision is applied before the runner is entered (`probflow.distributed.solve_chunks`, the CLI): the
runner is handed the ε-model already cast, the dtype the model runs in and the ODE state's dtype, and builds
each chunk's `DDIMField` (Eq. 12, docs/MATH.md §2) around it with a fresh NFE counter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel
from probflow.ranks import Abort, World, cat_batch, map_chunks

__all__ = ["run_chunks", "concat_solutions", "slice_state"]


def slice_state(state: Any, a: int, b: int) -> Any:
    """Rows a:b of a solver state that exposes `tensors()`/`from_tensors` (e.g. reversible_heun's pair);
    0-d entries are kept. None → None."""
    if state is None:
        return None
    if not hasattr(state, "tensors"):
        raise ValueError(f"state: {type(state).__name__} cannot be split into chunks (no tensors())")
    t = {k: (v if v.ndim == 0 else v[a:b]) for k, v in state.tensors().items()}
    return type(state).from_tensors(t)


def concat_solutions(parts: Sequence[Any]):
    """One Solution from the chunks' Solutions (in chunk order): x and trajectory concatenated along the
    batch, a `tensors()` state concatenated row-wise; any other state (a multistep method's history) is not
    carried over: state None. `nfe` is per sample — the model calls on each sample's path, i.e. its chunk's
    (the largest over chunks where an adaptive solve made them differ) — and `info` holds `nfe_total` (every
    batched model call, summed over the chunks), `nfe_min` and `chunks`; a round-trip bound
    (`roundtrip_max_abs`, `probflow.inversion.encode_exact`) is the largest over the chunks, and its `exact` is
    "quantum" where any chunk's is; the grid and the
    method's name are the first chunk's (every chunk has them)."""
    st = parts[0].state
    if st is not None and hasattr(st, "tensors"):
        st = type(st).from_tensors(cat_batch([p.state.tensors() for p in parts]))
    else:
        st = None
    traj = parts[0].trajectory
    traj = None if traj is None else torch.cat([p.trajectory for p in parts], dim=1)
    nfes = [p.nfe for p in parts]
    info: dict[str, Any] = {"nfe_total": sum(nfes), "nfe_min": min(nfes), "chunks": len(parts)}
    bounds = [p.info["roundtrip_max_abs"] for p in parts if p.info and "roundtrip_max_abs" in p.info]
    if len(bounds) == len(parts):
        info["roundtrip_max_abs"] = max(bounds)
    kinds = {p.info["exact"] for p in parts if p.info and "exact" in p.info}
    if kinds:
        info["exact"] = "quantum" if "quantum" in kinds else "round-off"
    return replace(parts[0], x=torch.cat([p.x for p in parts]), nfe=max(nfes), trajectory=traj, state=st, info=info)


class _Watched:
    """The ε-model as `run_chunks` runs it: the abort is looked for before each evaluation (`Abort.check`)
    and `hook(eps, sigma)` sees every output (a progress bar, a finiteness check)."""

    def __init__(self, model: Any, abort: Abort, hook: Callable[[Tensor, Tensor], None] | None) -> None:
        self.model, self.abort, self.hook = model, abort, hook

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.abort.check()
        out = self.model(x, sigma)
        if self.hook is not None:
            self.hook(out, sigma)
        return out


def run_chunks(fn: Callable[..., Any], model: EpsModel | DDIMField, n: int,
               inputs: Tensor | Callable[[int, int], Tensor], sigmas: Tensor, method: Any = "euler", *,
               chunk: int = 64, state: Any = None, model_dtype: torch.dtype | None = None,
               dtype: torch.dtype | None = None, hook: Callable[[Tensor, Tensor], None] | None = None,
               w: World | None = None, everywhere: bool = False, **kw: Any):
    """`fn(field, x, sigmas, method, state=…, **kw)` on every chunk [a, b) of n samples (`map_chunks`), and the
    chunks' Solutions concatenated (`concat_solutions`: on rank 0, every rank with `everywhere`, None on the
    others).

    model: an ε-model, evaluated in `model_dtype` behind each chunk's DDIMField (None: in the dtype it is
    given), or a DDIMField, whose ε-model and dtype boundary are kept. inputs: the batch (rows a:b are chunk
    [a, b)'s x) or `inputs(a, b)`; `dtype`: each chunk's x is put in it (the ODE state's dtype; None: as given).
    method: a name or Method, or `method(a, b)` (a stochastic method's noise is indexed by sample). state: a
    reversible state whose rows a:b go with the chunk. hook(eps, sigma): called after every model evaluation.
    Before each evaluation the rank looks whether another rank failed (`Abort`), so that it stops within about
    a second.
    """
    if isinstance(model, DDIMField):
        if model_dtype is not None:
            raise ValueError("model_dtype: a DDIMField fixes its own model dtype; pass the ε-model")
        model, model_dtype = model.model, model.model_dtype

    def one(a: int, b: int, abort: Abort):
        x = inputs(a, b) if callable(inputs) else inputs[a:b]
        x = x if dtype is None else x.to(dtype)
        watched = _Watched(model, abort, hook)
        field = DDIMField(watched, model_dtype)
        m = method(a, b) if callable(method) else method
        return fn(field, x, sigmas, m, state=slice_state(state, a, b), **kw)

    parts = map_chunks(one, n, chunk, w=w, everywhere=everywhere, with_abort=True)
    return None if parts is None else concat_solutions(parts)
