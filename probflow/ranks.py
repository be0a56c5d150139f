"""The ranks of a run: torchrun's world, torch's threads, and work spread over the ranks in chunks whose results
do not depend on the world size (torch alone; `probflow.distributed` is the public face).

**Unit of work.** n samples are cut into chunks of `chunk` consecutive sample indices,
chunk k = [k·chunk, min((k+1)·chunk, n)), and chunk k runs on rank k mod W as ONE batch, by a function
`fn(start, stop)` that sees only its indices. A chunk's batch is therefore the same for every world size W:
the network sees the same batch-mates and an adaptive solver the same batch-wide error norm (Eq. 12 solved
for that batch alone), so on a deterministic device (CPU; same torch build and thread count) each
sample's bytes do not depend on W. Changing `chunk` changes batch-mates: fixed-grid methods then differ by
round-off only (the network's kernels), adaptive ones by up to their tolerance.

**No collective inside a solve.** Ranks never synchronise per step; they meet only after all their local
work, in `map_chunks`, to exchange a per-rank status (ok, or the error message of a rank that raised) with
`all_gather_object`, and then the results. A rank whose `fn` raises still reaches that meeting with its
error, so every rank learns of the failure at the same point and raises `RankFailed` naming the failing
rank and its message; rank 0 writes nothing (`on_rank0` runs writers only after success, and shares their
own status the same way). A rank that dies without raising (killed, segfault) is handled by torchrun, which
stops the other workers; one that hangs hits the process group's `timeout`.

**Launch.** `torchrun --nproc-per-node N -m probflow ...` (add `--nnodes M --node-rank R
--rdzv-endpoint HOST:PORT` or `--master-addr/--master-port` on several machines) sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `world()` joins the process group from them
(gloo on CPU, NCCL on CUDA). Without them it is a world of one process and no process group is made.

Python::

    from probflow import ranks
    w = ranks.world()                                      # rank/size from torchrun's variables, or 0/1
    parts = ranks.map_chunks(lambda a, b: solve(a, b), n, chunk=64)  # list of chunk results on rank 0
    ranks.on_rank0(lambda: write(parts), w=w)              # rank 0 writes; every rank learns the outcome
    ranks.finish()
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["World", "RankFailed", "world", "joined", "finish", "chunk_bounds", "map_chunks", "map_cells", "on_rank0",
           "default_threads", "set_threads", "cat_batch", "Abort", "is_user_error"]

T = TypeVar("T")
TIMEOUT_S = float(os.environ.get("PROBFLOW_DIST_TIMEOUT", 1800))
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """Raised on every rank when one or more ranks failed; the message names them and their errors.
    `user_error`: every failure was bad input (ValueError, a file error, a number out of range), not a crash."""

    def __init__(self, message: str, user_error: bool = False) -> None:
        super().__init__(message)
        self.user_error = user_error


@dataclass(frozen=True)
class World:
    """This process's place in the run: `rank` of `size` (global), `local_rank` of `local_size` on its
    machine, the `device` its work should use, and whether a process group is live."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    device: str = "cpu"
    grouped: bool = False


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}: expected an integer from torchrun, got {v!r}") from None


def _grouped(tdist) -> World:
    """The World of the live process group (its backend decides the device: NCCL → cuda:LOCAL_RANK)."""
    local_rank = _env_int("LOCAL_RANK", 0)
    device = f"cuda:{local_rank}" if tdist.get_backend() == "nccl" else "cpu"
    return World(tdist.get_rank(), tdist.get_world_size(), local_rank, _env_int("LOCAL_WORLD_SIZE", 1), device, True)


def world(device: str | None = None, timeout: float | None = None) -> World:
    """This process's place in the run started by torchrun, joining its process group on the first call.

    Nothing is kept in this module: the World is read from torch.distributed's process group (once it is
    made, later calls return the same ranks and device whatever they ask) and torchrun's variables.
    device: "cpu" (gloo) or "cuda" (NCCL, GPU LOCAL_RANK); default cuda when available. timeout: seconds
    any collective may wait (default $PROBFLOW_DIST_TIMEOUT or 1800: it must exceed the longest imbalance
    of local work between ranks). Without torchrun's variables: World() — one process, no process group.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return _grouped(tdist)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    size = _env_int("WORLD_SIZE", 1)
    if size == 1:
        return World(device=device if device == "cpu" else f"cuda:{_env_int('LOCAL_RANK', 0)}")
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: launch with torchrun")
    if device == "cuda":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    tdist.init_process_group("nccl" if device == "cuda" else "gloo",
                             timeout=datetime.timedelta(seconds=timeout or TIMEOUT_S))
    return _grouped(tdist)


def joined() -> bool:
    """Whether this process is in a live process group (`world()` under torchrun, or the caller's own)."""
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def finish() -> None:
    """Leave the process group, if one is live; `world()` may then be called again."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def default_threads(local_size: int | None = None, cores: int | None = None) -> int:
    """Torch intra-op threads per rank: ⌊usable cores / ranks on this machine⌋, at least 1.

    usable cores: the CPUs this process may run on (`os.sched_getaffinity`), less those already busy by
    the 1-minute load average (other processes), at least 1 — so ranks × threads never exceeds the cores,
    and a shared machine is not oversubscribed (two threads on two cores that other processes also use run
    an 8×8-digit batch ~15× slower than one). `local_size` defaults to torchrun's LOCAL_WORLD_SIZE.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        try:
            busy = os.getloadavg()[0]
        except (OSError, AttributeError):
            busy = 0.0
        cores = max(1, cores - int(busy + 0.5)) if busy >= 0.5 else cores
    local_size = local_size or _env_int("LOCAL_WORLD_SIZE", 1)
    return max(1, cores // max(1, local_size))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default `default_threads()`); returns the number set."""
    n = default_threads() if threads is None else threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads: expected a positive integer, got {threads!r}")
    torch.set_num_threads(n)
    return n


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, stop)] of the chunks of n sample indices, `chunk` each (the last may be shorter)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of items, got {n!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"--chunk: expected a positive integer, got {chunk!r}")
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def _to_cpu(obj: Any) -> Any:
    """Tensors (in containers and dataclasses) moved to the CPU so they pickle device-free."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in fields(obj) if f.init})
    return obj


# what the CLI reports as bad input
_USER_ERRORS = (ValueError, OSError, OverflowError, FloatingPointError)


def is_user_error(e: BaseException) -> bool:
    """Whether `e` is bad input rather than a crash: a ValueError, a file error, a number out of range, or an
    exception whose class says so with `user_error = True` (a bound the user set, e.g.
    `probflow.integrate.MaxStepsError` for --max-steps)."""
    return isinstance(e, _USER_ERRORS) or getattr(e, "user_error", False) is True


def _error_text(e: BaseException) -> str:
    return f"{'!' if is_user_error(e) else ''}{type(e).__name__}: {e}"


def _agree(w: World, error: str | None) -> None:
    """Every rank contributes its status (None = ok, or its error message); all raise RankFailed if any
    rank failed. The only collective besides the result gather, reached by every rank."""
    if w.size == 1:
        statuses = [error]
    else:
        import torch.distributed as tdist

        statuses: list[str | None] = [None] * w.size
        tdist.all_gather_object(statuses, error)
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:  # a leading "!" marks a user error (bad input)
        raise RankFailed("; ".join(f"rank {r} of {w.size} failed: {s.lstrip('!')}" for r, s in failed),
                         all(s.startswith("!") for _, s in failed))


class _Stopped(BaseException):
    """Another rank failed: this rank stops its local work (a BaseException, so that no `except Exception`
    on the way up mistakes it for a failure of its own)."""


class Abort:
    """Early abort without a collective and without a second thread: a rank whose work raises sets a key in
    the rendezvous key-value store (a point-to-point request); every rank's main thread looks for that key
    between chunks and — through the models that `probflow.chunks.run_chunks` runs — before each model
    evaluation, at most every `poll` seconds, and stops (`_Stopped`), so the others stop within about a second
    and go to the status meeting instead of finishing their chunks. The key is numbered per `map_chunks` call by
    a counter kept in the store itself (each rank counts its own calls, which every rank makes in the same
    order)."""

    def __init__(self, w: World, poll: float = 0.2) -> None:
        self.store, self.key, self.poll, self.next = None, "", poll, 0.0
        if w.size > 1:
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self.store = _get_default_store()
                self.key = f"probflow/failed/{self.store.add(f'probflow/calls/{w.rank}', 1)}"
            except Exception:  # no store: failures are still reported at the meeting, only later
                self.store = None

    def check(self) -> None:
        """Raise `_Stopped` when another rank has failed (polls the store at most every `poll` s)."""
        if self.store is None or time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.poll
        try:
            hit = self.store.check([self.key])
        except Exception:
            return
        if hit:
            raise _Stopped

    def fail(self) -> None:
        if self.store is not None:
            try:
                self.store.set(self.key, "1")
            except Exception:
                pass


def _run_local(w: World, fn: Callable[..., Any], bounds: list[tuple[int, int]], abort: Abort, with_abort: bool):
    """This rank's chunks → ({k: result}, error message or None); stops early when another rank failed."""
    local: dict[int, Any] = {}
    try:
        for k in range(w.rank, len(bounds), w.size):
            abort.check()
            local[k] = _to_cpu(fn(*bounds[k], abort) if with_abort else fn(*bounds[k]))
    except _Stopped:
        return {}, None  # another rank failed: its message comes from the meeting
    except Exception as e:  # reach the meeting with the error instead of leaving the others waiting
        if w.size == 1:  # one process: the error itself, as a plain loop would raise it
            raise
        abort.fail()
        if not is_user_error(e):  # a crash: its traceback, on this rank's stderr
            traceback.print_exc(file=sys.stderr)
        return {}, _error_text(e)
    return local, None


def map_chunks(fn: Callable[[int, int], T], n: int, chunk: int, *, w: World | None = None,
               everywhere: bool = False, with_abort: bool = False) -> list[T] | None:
    """Run `fn(start, stop)` on every chunk of n indices (`chunk_bounds`), chunk k on rank k mod W, and
    gather the results in chunk order: the list on rank 0 (on every rank with `everywhere`), None on the
    others. `fn` must not use collectives. If any rank's `fn` raises, the others stop at their next chunk (or,
    `with_abort`, wherever `fn(start, stop, abort)` calls `abort.check()`; `Abort`) and every rank raises
    `RankFailed` with that rank's message (a crash's traceback — anything but bad input, `is_user_error` — is
    printed on its own stderr). In a world of one, `fn`'s error is raised as is."""
    w = w or world()
    bounds = chunk_bounds(n, chunk)
    local, error = _run_local(w, fn, bounds, Abort(w), with_abort)
    _agree(w, error)
    if w.size == 1:
        parts = [local]
    else:
        import torch.distributed as tdist

        if everywhere:
            parts = [None] * w.size
            tdist.all_gather_object(parts, local)
        else:
            parts = [None] * w.size if w.rank == 0 else None
            tdist.gather_object(local, parts, dst=0)
    if parts is None:
        return None
    merged = {k: v for p in parts for k, v in p.items()}
    return [merged[k] for k in range(len(bounds))]


def map_cells(fn: Callable[[int], T], cells: int, *, w: World | None = None) -> list[T]:
    """`fn(i)` for i in range(cells), cell i on rank i mod W, results in cell order on every rank (for
    independent benchmark cells; a cell's result must not depend on which rank computed it)."""
    return map_chunks(lambda a, b: fn(a), cells, 1, w=w, everywhere=True)


def on_rank0(write: Callable[[], T], *, w: World | None = None) -> T | None:
    """Run `write()` on rank 0 only, then share its status: every rank raises RankFailed if it failed (use
    probflow's atomic writer inside, so a failure leaves no partial file). Returns write()'s value on rank 0."""
    w = w or world()
    out, error = None, None
    if w.rank == 0:
        try:
            out = write()
        except Exception as e:
            if w.size == 1:
                raise
            if not is_user_error(e):
                traceback.print_exc(file=sys.stderr)
            error = _error_text(e)
    _agree(w, error)
    return out


def cat_batch(parts: Sequence[Any], dim: int = 0) -> Any:
    """Concatenate chunk results along the batch: tensors with `torch.cat` (0-d tensors and plain values
    must agree and are kept once), tuples/lists/dicts item by item, None stays None."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        if first.ndim == 0:
            if any(not torch.equal(p, first) for p in parts):
                raise ValueError("chunks: a scalar tensor differs between chunks")
            return first
        return torch.cat(list(parts), dim=dim)
    if isinstance(first, (list, tuple)):
        return type(first)(cat_batch([p[i] for p in parts], dim) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: cat_batch([p[k] for p in parts], dim) for k in first}
    if any(p != first for p in parts):
        raise ValueError(f"chunks: value {first!r} differs between chunks")
    return first
