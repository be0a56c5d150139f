"""Solver comparison against exact ground truth and against diffusers (`probflow bench`).

Every solver integrates Eq. 12, dx̄/dσ = ε(x̄/sqrt(1+σ²), σ), *down* from σ_max (t = T−1) to σ = 0 from the same
x_T; at σ = 0, x̄ = x = x_0, which is compared with a reference x_0 from the same noise (docs/MATH.md §7).

Modules: `grids` (grids by name), `workloads` (a model, its noise and reference; models by spec), `reference`
(the tight adaptive reference, its check against a looser one and its error against a tighter one), `recipes`
(the README's recommended configuration per NFE, `RECOMMENDED`, and benchmarks/FAIR.md's chosen ones), `fair`
(k-diffusion's and diffusers' peers on probflow's grids, both sides' chosen and oracle rows, resolution by the
reference's error), `kdiffusion` (k-diffusion's samplers driven as its users call them), `runner` (one row per
solve; best per NFE; convergence order), `peers` (diffusers' schedulers driven as pipelines drive them),
`overhead` (time per step beyond the model), `suites` (the sizes and suites of a run), `report` (RESULTS.md),
`plots` and `heldout` (a seeded problem family split into tuning and held-out problems); the command's
arguments and run are in `probflow.cli.bench`. The studies run on this harness are scripts in `benchmarks/`.

Helper API for notebooks and other benchmarks, re-exported here: `mixture_workload`, `model_workload`,
`run_workload`, `run_mixture_suite`, `error_vs_nfe`, `convergence_order`, `best_per_nfe`, `solver_overhead`;
grids by name in `GRIDS` (extend with `register_grid`, or pass the name of a function `f(schedule, steps)` in
`probflow.grids`).
"""

from probflow.bench.grids import CALIBRATED, DEFAULT_GRIDS, GRIDS, UNIFORM_STEP_GRID, grid_sigmas, register_grid
from probflow.bench.overhead import solver_overhead
from probflow.bench.reference import REFERENCE, reference
from probflow.bench.runner import (
                                  CALIBRATION,
                                  NFE,
                                  TOLERANCES,
                                  adaptive_methods,
                                  best_per_nfe,
                                  convergence_order,
                                  error_vs_nfe,
                                  fixed_methods,
                                  run_adaptive,
                                  run_fixed,
                                  run_mixture_suite,
                                  run_peer,
                                  run_workload,
                                  steps_for,
)
from probflow.bench.workloads import (
                                  Workload,
                                  digits_workload,
                                  load_model_spec,
                                  mixture_workload,
                                  model_workload,
                                  sharp_mixture,
)

__all__ = [
    "CALIBRATED", "CALIBRATION", "DEFAULT_GRIDS", "GRIDS", "NFE", "REFERENCE", "TOLERANCES", "UNIFORM_STEP_GRID",
    "Workload", "adaptive_methods", "best_per_nfe", "convergence_order", "digits_workload", "error_vs_nfe",
    "fixed_methods", "grid_sigmas", "load_model_spec", "mixture_workload", "model_workload", "reference",
    "register_grid", "run_adaptive", "run_fixed", "run_mixture_suite", "run_peer", "run_workload", "sharp_mixture",
    "solver_overhead", "steps_for",
]
