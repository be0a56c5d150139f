"""The memory an exact inversion keeps beyond the model, and the refusal before allocating (`estimate_memory`)."""

from __future__ import annotations

from torch import Tensor

from probflow.solvers import Method, get_method

__all__ = ["check_memory", "estimate_memory", "uses_trajectory"]


def estimate_memory(x0: Tensor, sigmas: Tensor, method: str | Method = "euler", *, memory: int = 8,
                    solve: str = "auto", trajectory: bool = False) -> int:
    """Bytes the solve itself keeps (the model's own activations, as in sampling, not included): per-step,
    (2·memory + 12) float64 copies of the batch state (Anderson's differences, iterate, residual, best iterate,
    warm-start history; Newton–Krylov's Krylov basis fits in the same); trajectory solves, (2·memory + 8) copies of
    the whole trajectory (N states) plus the surrogate's N×N matrices per sample."""
    m, n, state = (method if isinstance(method, Method) else get_method(method)), len(sigmas) - 1, x0.numel() * 8
    if uses_trajectory(m, solve):
        return (2 * memory + 8) * n * state + 2 * x0.shape[0] * n * n * 8
    return (2 * memory + 12) * state + ((n + 1) * x0.element_size() * x0.numel() if trajectory else 0)


def uses_trajectory(m: Method, solve: str) -> bool:
    if solve not in ("auto", "step", "trajectory"):
        raise ValueError(f"solve: expected 'auto', 'step' or 'trajectory', got {solve!r}")
    if solve == "step" and m.multistep:
        raise ValueError(f"solve: the multistep {m.name} carries history between steps; its steps cannot be "
                         "solved one at a time (use 'auto' or 'trajectory')")
    return solve == "trajectory" or (solve == "auto" and m.multistep)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(v.split()[1]) * 1024 for v in f if v.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def check_memory(need: int, max_memory: int | None, x0: Tensor, n: int, how: str) -> None:
    limit = max_memory
    if limit is None:
        avail = _available_memory()
        limit = None if avail is None else avail // 2
    if limit is not None and need > limit:
        raise ValueError(f"x0: the {how} solve of {x0.shape[0]} × {tuple(x0.shape[1:])} over {n} steps needs about "
                         f"{need / 2**20:.0f} MiB beyond the model (limit {limit / 2**20:.0f} MiB: max_memory, "
                         "default half the available memory); encode fewer images at a time")
