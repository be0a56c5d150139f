"""probflow: DDIM is the Euler method on the σ-ODE (Eq. 12). Compare solvers, invert exactly, teach the limit.

    dx̄/dσ = ε_θ(x̄/sqrt(σ² + 1), σ),     x̄ = x·sqrt(1 + σ²),     σ = sqrt((1 − ᾱ)/ᾱ)

Public API: `DDIMField` (Eq. 12), `integrate` (the one integrate path; `Control`, its step-size control),
`sample`/`decode`/`encode`/`interpolate` (in the model's variable x), `grids`, `schedules`, `models`, `solvers`
(the name → method registry). Heavy optional modules (diffusers) are imported lazily, never here.
"""

from probflow import grids, models, schedules, solvers
from probflow.field import DDIMField, as_field
from probflow.flows import decode, encode, interpolate, lerp, noise, sample, slerp
from probflow.integrate import Control, Solution, integrate
from probflow.version import __version__

__all__ = [
    "__version__",
    "Control",
    "DDIMField",
    "Solution",
    "as_field",
    "decode",
    "encode",
    "grids",
    "integrate",
    "interpolate",
    "lerp",
    "models",
    "noise",
    "sample",
    "schedules",
    "slerp",
    "solvers",
]
