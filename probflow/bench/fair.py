"""Fair peers and named configurations in a benchmark run, and which differences the reference resolves.

`fair_plan` adds to a workload's solves (`probflow bench --peers fair`):
- the README's recommended configuration per NFE (`recipes.RECOMMENDED`, rows of family "probflow", role
  "recommended") and benchmarks/FAIR.md's chosen configuration of each side (`recipes.FAIR_CHOSEN`, role "chosen");
- every fair peer (`recipes.FAIR_PEERS`: k-diffusion's samplers where `kdiffusion.available()`, diffusers'
  DPM-Solver++ and UniPC of orders 2 and 3 where diffusers imports) on every grid that probflow's methods get in
  the run (family "fair_peer"; the model-fitted `calibrated` grid is probflow's opt-in and is not given to them),
  and both sides (the peers, and probflow's `recipes.FAIR_METHODS`) on the three named configurations' grids.
The "oracle" of a side is its best row per NFE (peers: any peer row, diffusers' native grids included).

Resolution. A row's RMSE e = ‖x − x_ref‖ differs from its true error ‖x − x*‖ by at most ‖x_ref − x*‖ (triangle
inequality in the RMS norm), so two rows' RMSEs rank the solvers for certain only when they differ by more than
2·ε_ref, ε_ref = the reference's measured RMS error (`reference_error`): `resolved(a, b, ε_ref)`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

from probflow.bench import kdiffusion as _kd
from probflow.bench import peers as _peers
from probflow.bench import recipes as R
from probflow.bench.grids import CALIBRATED, UNIFORM_STEP_GRID, GridBuilder, grid_name, grid_sigmas
from probflow.bench.runner import _cast_model, _finish, _row, run_fixed
from probflow.bench.workloads import Workload

__all__ = ["PEER_MODES", "fair_peers", "run_fair_peer", "fair_plan", "fair_rows", "resolved", "reference_error"]

# --peers: "fair" = diffusers' peers on their own grids (as before) + the fair peers on probflow's grids + the
# named configurations; "default" = diffusers' peers on their own grids only; "none" = no peer at all.
PEER_MODES = ("fair", "default", "none")


def fair_peers() -> list[str]:
    """The fair peers whose library loads here (k-diffusion's `k_*`, diffusers' `d_*`)."""
    out = list(R.K_PEERS) if _kd.available() else []
    return out + (list(R.D_PEERS) if _peers.available() else [])


def _peer_steps(name: str, nfe: int) -> int:
    lib, peer = R.peer_library(name)
    return _kd.steps_for_nfe(peer, nfe) if lib == "kdiffusion" else _peers.steps_for_nfe(peer, nfe)


def run_fair_peer(w: Workload, name: str, grid: str | GridBuilder, nfe: int, role: str | None = None) -> dict:
    """One fair peer (`recipes.peer_library(name)`) at NFE ≤ `nfe` on `grid`, through its library's own loop
    (`kdiffusion.run_kpeer`, `peers.run_peer(..., sigmas=...)`)."""
    steps = _peer_steps(name, nfe)
    row = _row(w, "fair_peer", name, grid_name(grid), nfe_target=nfe, steps=steps, role=role)
    model = w.model if w.model_dtype is None else _cast_model(w.model, w.model_dtype)
    try:
        sig = grid_sigmas(grid, w.schedule, steps)
        lib, peer = R.peer_library(name)
        t0 = time.perf_counter()
        if lib == "kdiffusion":
            r = _kd.run_kpeer(peer, model, w.noise, sig)
        else:
            r = _peers.run_peer(peer, model, w.noise, w.schedule, steps, sigmas=sig)
        row["wall_s"] = time.perf_counter() - t0
        row["nfe"] = r.nfe
        _finish(row, w, r.x)
    except (FloatingPointError, RuntimeError, ValueError) as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def _with_role(task: Callable[[], dict], role: str) -> dict:
    row = task()
    row["role"] = role
    return row


def _named(n: int) -> list[tuple[str, str, GridBuilder]]:
    """(role, name, grid) of the named configurations at NFE `n`: recommended, probflow chosen, peer chosen."""
    return [("recommended", *R.recipe_for(R.RECOMMENDED, n)), ("chosen", *R.recipe_for(R.FAIR_CHOSEN["probflow"], n)),
            ("chosen", *R.recipe_for(R.FAIR_CHOSEN["peer"], n))]


def fair_plan(w: Workload, grids: Sequence[str | GridBuilder], nfe: Sequence[int],
              methods: Sequence[str] = R.FAIR_METHODS, peers: Sequence[str] | None = None
              ) -> list[Callable[[], dict]]:
    """The solves `--peers fair` adds. Per NFE: the recommended and the two chosen configurations; every fair
    peer (`peers`, default `fair_peers()`) on every grid of `grids` (but `calibrated` and the uniform-step one)
    and on the three named configurations' grids; and probflow's `methods` (those of `recipes.FAIR_METHODS` the
    run has) on the named grids too, so that both sides get the same grids."""
    peers = fair_peers() if peers is None else list(peers)
    methods = [m for m in methods if m in R.FAIR_METHODS]
    tasks: list[Callable[[], dict]] = []
    for n in nfe:
        named = _named(n)
        for role, m, g in named:
            if m in R.FAIR_PEERS:
                if m in peers:
                    tasks.append(functools.partial(run_fair_peer, w, m, g, n, role))
            else:
                tasks.append(functools.partial(_with_role, functools.partial(run_fixed, w, m, g, n), role))
        done = {(m, grid_name(g)) for _, m, g in named}
        for g in {grid_name(g): g for _, _, g in named}.values():
            tasks += [functools.partial(run_fixed, w, m, g, n) for m in methods if (m, grid_name(g)) not in done]
            tasks += [functools.partial(run_fair_peer, w, p, g, n) for p in peers if (p, grid_name(g)) not in done]
    for p in peers:
        for g in grids:
            if g not in (CALIBRATED, UNIFORM_STEP_GRID) and grid_name(g) != CALIBRATED:
                tasks += [functools.partial(run_fair_peer, w, p, g, n) for n in nfe]
    return tasks


def reference_error(ref: dict) -> float:
    """ε_ref: the RMS difference of the reference to its solve at a tenth of its tolerance ("error_rmse"), else
    (older results) to its looser check solve, which bounds it from above."""
    v = ref.get("error_rmse")
    return float(v) if v is not None else float(ref["check_rmse"])


def resolved(a: float, b: float, ref_err: float) -> bool:
    """Whether RMSEs `a` and `b` measured against a reference of RMS error `ref_err` rank their solvers for
    certain: |a − b| > 2·ref_err (see the module doc)."""
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) > 2.0 * ref_err


def _ok(r: dict, n: int) -> bool:
    return (r["nfe_target"] == n and r["error"] is None and r["nfe"] is not None and r["nfe"] <= n
            and math.isfinite(r["rmse"]))


def _best(rows: Sequence[dict], keep: Callable[[dict], bool]) -> dict | None:
    ok = [r for r in rows if keep(r)]
    return min(ok, key=lambda r: r["rmse"]) if ok else None


def fair_rows(rows: Sequence[dict]) -> list[dict]:
    """Per NFE target with named rows: probflow's recommended and chosen rows and its oracle (best probflow row),
    the peers' chosen row and their oracle (best of any peer row), by RMSE with counted NFE ≤ the target."""
    out = []
    for n in sorted({r["nfe_target"] for r in rows if r.get("role") and r["nfe_target"] is not None}):
        at = [r for r in rows if _ok(r, n)]
        out.append({"nfe": n,
                    "recommended": _best(at, lambda r: r.get("role") == "recommended"),
                    "chosen": _best(at, lambda r: r["family"] == "probflow" and r.get("role") == "chosen"),
                    "oracle": _best(at, lambda r: r["family"] == "probflow"),
                    "peer_chosen": _best(at, lambda r: r["family"] == "fair_peer" and r.get("role") == "chosen"),
                    "peer_oracle": _best(at, lambda r: r["family"] in ("peer", "fair_peer"))})
    return out

