"""Named configurations per NFE, shared by the README, `probflow bench` and the tests.

`RECOMMENDED`: the README's recommendation for a fixed NFE ("Recommendation, from the held-out numbers"),
{nfe: (probflow method, grid builder)}. `FAIR_CHOSEN`: the configurations chosen on the tuning problems of
benchmarks/FAIR.md (`benchmarks/fair_fewstep.py`: per NFE, the smallest maximum over tuning problems of log(error /
best of any configuration)) for each side: "probflow" (a probflow method) and "peer" (a k-diffusion sampler
`k_*` of `probflow.bench.kdiffusion`, or a diffusers scheduler `d_*` of `probflow.bench.peers` run on that grid).
`FAIR_PEERS`: the peers every grid of a run is given (`probflow bench --peers fair`): k-diffusion's DPM++(2M),
DPM++(3M) (eta = 0), LMS, Heun, DPM++(2S) (eta = 0) and diffusers' DPM-Solver++ and UniPC of orders 2 and 3.

Grid builders are `f(schedule, steps) -> σ grid` (σ_max … 0, decreasing), named by their `__name__` in the rows
(FAIR.md's grid names, `family_grid`).
For an NFE not in a table, `recipe_for` takes the entry of the nearest NFE (the smaller on a tie).
"""

from __future__ import annotations

from torch import Tensor

from probflow import grids as G
from probflow.bench.grids import GridBuilder
from probflow.schedules import Schedule

__all__ = ["RECOMMENDED", "RECOMMENDED_NAMES", "FAIR_CHOSEN", "FAIR_PEERS", "FAIR_METHODS", "K_PEERS", "D_PEERS",
           "recipe_for", "peer_library", "family_grid"]


def quadratic(s: Schedule, n: int) -> Tensor:
    """DDIM trailing timesteps quadratic in t, then 0."""
    return G.ddim(s, n, "quadratic")


def log_snr_tuned(s: Schedule, n: int) -> Tensor:
    """Log-SNR uniform from σ_max to 3σ_0, then 0 (`grids.log_snr_tuned`)."""
    return G.log_snr_tuned(s, n)


def logsnr(s: Schedule, n: int) -> Tensor:
    """Log-SNR uniform from σ_max to σ_0, then 0."""
    return G.log_uniform(s.sigma_max, s.sigma_min, n)


def family_grid(name: str) -> GridBuilder:
    """The builder of a grid of benchmarks/FAIR.md's family by its name there: "uniform", "quadratic" (DDIM
    trailing), "karras{ρ}/{end}" (`grids.karras`), "logsnr/{end}" (`grids.log_uniform`), "t^{q}/{end}"
    (`grids.t_power`), each from σ_max to σ_min = end ("s0": the schedule's σ_0), then one step to 0."""
    if name in ("uniform", "quadratic"):
        def f(s: Schedule, n: int) -> Tensor:
            return G.ddim(s, n, name)
    else:
        try:
            kind, end = name.split("/")
            e = None if end == "s0" else float(end)
            if kind.startswith("t^"):
                q = float(kind[2:])

                def f(s: Schedule, n: int) -> Tensor:
                    return G.t_power(s, n, q, s.sigma_min if e is None else e)
            elif kind == "logsnr" or kind.startswith("karras"):
                rho = None if kind == "logsnr" else float(kind[6:])

                def f(s: Schedule, n: int) -> Tensor:
                    lo = s.sigma_min if e is None else e
                    return G.log_uniform(s.sigma_max, lo, n) if rho is None else G.karras(s.sigma_max, lo, n, rho)
            else:
                raise ValueError(kind)
        except ValueError:
            raise ValueError(f"grid: expected a FAIR.md family name (uniform, quadratic, karras<ρ>/<end>, "
                             f"logsnr/<end>, t^<q>/<end>; end a number or s0), got {name!r}") from None
    f.__name__ = name
    f.__doc__ = f"benchmarks/FAIR.md's grid {name!r} (`recipes.family_grid`)."
    return f


def _table(entries: dict[int, str]) -> dict[int, tuple[str, GridBuilder]]:
    """{nfe: "method|grid"} → {nfe: (method, builder)}."""
    out = {}
    for n, key in entries.items():
        m, g = key.split("|")
        out[n] = (m, family_grid(g))
    return out


# The README's "Recommendation" paragraph, NFE → (method, grid): benchmarks/FAIR.md's probflow configuration
# chosen on its tuning problems (minimax regret, the same rule as the peers'), so that the README's recipe is
# FAIR.md's chosen row. FAIR.md measured NFE 5–100; other NFEs take the nearest entry (`recipe_for`).
RECOMMENDED_NAMES: dict[int, str] = {5: "unipc_3|uniform", 10: "unipc_3|t^2/0.05", 20: "unipc_3|t^2/0.02",
                                     50: "unipc_3|t^2.5/s0", 100: "unipc_3|t^2.5/s0"}
RECOMMENDED: dict[int, tuple[str, GridBuilder]] = _table(RECOMMENDED_NAMES)

# benchmarks/FAIR.md's table, columns "probflow chosen" and "peer chosen" (d_: diffusers, k_: k-diffusion).
FAIR_CHOSEN: dict[str, dict[int, tuple[str, GridBuilder]]] = {
    "probflow": dict(RECOMMENDED),
    "peer": _table({5: "d_unipc|t^2.5/0.05", 10: "d_dpmpp_3m|logsnr/0.03", 20: "d_unipc_3|t^2.5/s0",
                    50: "k_lms|quadratic", 100: "k_lms|quadratic"}),
}

# probflow's methods of benchmarks/FAIR.md's study (they also get every named configuration's grid)
FAIR_METHODS = ("dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3")
K_PEERS = ("k_dpmpp_2m", "k_dpmpp_3m", "k_lms", "k_heun", "k_dpmpp_2s")
D_PEERS = ("d_dpmpp_2m", "d_dpmpp_3m", "d_unipc", "d_unipc_3")
FAIR_PEERS = K_PEERS + D_PEERS


def recipe_for(table: dict[int, tuple[str, GridBuilder]], nfe: int) -> tuple[str, GridBuilder]:
    """The entry of `table` at `nfe`, else at the nearest NFE of the table (the smaller on a tie)."""
    if not table:
        raise ValueError("table: empty")
    return table[min(table, key=lambda k: (abs(k - nfe), k))]


def peer_library(name: str) -> tuple[str, str]:
    """("kdiffusion", sampler) for "k_*" (the name is k-diffusion's `KPEERS` key), ("diffusers", scheduler) for
    "d_*" (`peers.PEERS` key); ValueError otherwise."""
    if name.startswith("k_"):
        return "kdiffusion", name
    if name.startswith("d_"):
        return "diffusers", name[2:]
    raise ValueError(f"peer: expected a k-diffusion 'k_*' or diffusers 'd_*' fair peer, got {name!r}")
