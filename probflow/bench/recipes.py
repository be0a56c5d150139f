"""Named configurations per NFE, shared by the README, `probflow bench` and the tests.

`RECOMMENDED`: the README's recommendation for a fixed NFE ("Recommendation, from the held-out numbers"),
{nfe: (probflow method, grid builder)}. `FAIR_CHOSEN`: the configurations chosen on the tuning problems of
benchmarks/FAIR.md (`benchmarks/fair_fewstep.py`: per NFE, the smallest median over tuning problems of log(error /
best of any configuration)) for each side: "probflow" (a probflow method) and "peer" (a k-diffusion sampler
`k_*` of `probflow.bench.kdiffusion`, or a diffusers scheduler `d_*` of `probflow.bench.peers` run on that grid).
`FAIR_PEERS`: the peers every grid of a run is given (`probflow bench --peers fair`): k-diffusion's DPM++(2M),
DPM++(3M) (eta = 0), LMS, Heun, DPM++(2S) (eta = 0) and diffusers' DPM-Solver++ and UniPC of orders 2 and 3.

Grid builders are `f(schedule, steps) -> σ grid` (σ_max … 0, decreasing), named by their `__name__` in the rows.
For an NFE not in a table, `recipe_for` takes the entry of the nearest NFE (the smaller on a tie).
"""

from __future__ import annotations

from torch import Tensor

from probflow import grids as G
from probflow.bench.grids import GridBuilder
from probflow.schedules import Schedule

__all__ = ["RECOMMENDED", "FAIR_CHOSEN", "FAIR_PEERS", "FAIR_METHODS", "K_PEERS", "D_PEERS", "recipe_for",
           "peer_library"]


def quadratic(s: Schedule, n: int) -> Tensor:
    """DDIM trailing timesteps quadratic in t, then 0."""
    return G.ddim(s, n, "quadratic")


def log_snr_tuned(s: Schedule, n: int) -> Tensor:
    """Log-SNR uniform from σ_max to 3σ_0, then 0 (`grids.log_snr_tuned`)."""
    return G.log_snr_tuned(s, n)


def logsnr_2s0(s: Schedule, n: int) -> Tensor:
    """Log-SNR uniform from σ_max to 2σ_0, then 0 (`grids.log_uniform(σ_max, 2σ_0, steps)`)."""
    return G.log_uniform(s.sigma_max, 2.0 * s.sigma_min, n)


def logsnr(s: Schedule, n: int) -> Tensor:
    """Log-SNR uniform from σ_max to σ_0, then 0."""
    return G.log_uniform(s.sigma_max, s.sigma_min, n)


def _t_power(q: float, end: float) -> GridBuilder:
    def f(s: Schedule, n: int) -> Tensor:
        return G.t_power(s, n, q, end)

    f.__name__ = f"t^{q:g}/{end:g}"
    f.__doc__ = f"`grids.t_power(schedule, steps, {q:g}, {end:g})`: power {q:g} in t down to σ = {end:g}, then 0."
    return f


# The README's "Recommendation" paragraph, NFE → (method, grid). At NFE 50 the README allows log-SNR uniform to
# any end in σ_0 … 4σ_0; the table takes σ_0 (`logsnr`), the end benchmarks/FAIR.md measured as the README's recipe.
RECOMMENDED: dict[int, tuple[str, GridBuilder]] = {
    5: ("dpmpp_2m", quadratic),
    10: ("unipc", log_snr_tuned),
    20: ("unipc_3", logsnr_2s0),
    50: ("unipc_3", logsnr),
    100: ("unipc_3", logsnr),
}

# benchmarks/FAIR.md's table, columns "probflow chosen" and "peer chosen" (d_: diffusers, k_: k-diffusion).
FAIR_CHOSEN: dict[str, dict[int, tuple[str, GridBuilder]]] = {
    "probflow": {5: ("unipc_3", _t_power(2.5, 0.1)), 10: ("unipc", _t_power(2.5, 0.03)),
                 20: ("unipc_3", _t_power(2.0, 0.02)), 50: ("unipc_3", _t_power(2.5, 0.02)),
                 100: ("unipc_3", logsnr)},
    "peer": {5: ("d_unipc", _t_power(2.0, 0.1)), 10: ("k_dpmpp_2m", _t_power(2.5, 0.02)),
             20: ("d_unipc_3", logsnr), 50: ("k_lms", quadratic), 100: ("k_lms", quadratic)},
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
