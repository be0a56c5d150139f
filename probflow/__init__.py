"""probflow: DDIM is the Euler method on the σ-ODE (Eq. 12). Compare solvers, invert exactly, teach the limit.

    dx̄/dσ = ε_θ(x̄/sqrt(σ² + 1), σ),     x̄ = x·sqrt(1 + σ²),     σ = sqrt((1 − ᾱ)/ᾱ)

Public API: `DDIMField` (Eq. 12), `integrate` (the one integrate path; `Control`, its step-size control),
`sample`/`decode`/`encode`/`interpolate` (in the model's variable x), `grids`, `schedules`, `models`, `solvers`
(the name → method registry). Heavy optional modules (diffusers) are imported lazily, never here.
"""

import importlib

from probflow.version import __version__

# Names resolve on first use (PEP 562), so `python -m probflow` can answer Ctrl-C with one line even while torch is
# still being imported (probflow.__main__), and `import probflow` stays cheap until something is used.
_LAZY = {
    "grids": "probflow.grids", "models": "probflow.models", "schedules": "probflow.schedules",
    "solvers": "probflow.solvers", "DDIMField": "probflow.field", "as_field": "probflow.field",
    "decode": "probflow.flows", "encode": "probflow.flows", "interpolate": "probflow.flows", "lerp": "probflow.flows",
    "noise": "probflow.flows", "sample": "probflow.flows", "slerp": "probflow.flows",
    "Control": "probflow.integrate", "Solution": "probflow.integrate", "integrate": "probflow.integrate",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'probflow' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"probflow.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
