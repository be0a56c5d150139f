"""Log-likelihood through the ODE (docs/MATH.md §8): Eq. 12 integrated from σ = 0 up to σ_max together with the
divergence of its field, by the one integrate path; bits/dim of quantised images; the cost of a request.

Instantaneous change of variables. Along a solution x̄(σ) of dx̄/dσ = f(σ, x̄) = ε(x̄/sqrt(1+σ²), σ),
d log p_σ(x̄(σ))/dσ = −∇·f, so with ℓ(σ) = ∫_0^σ ∇·f(s, x̄(s)) ds

    log p_0(x_0) = log p_{σmax}(x̄(σmax)) + ℓ(σmax),        x̄(0) = x_0                      (L1)

in nats, for x_0 in the model's variable x (x̄ = x at σ = 0). The pair y = (x̄, ℓ) solves one ODE, the
*augmented* field g(σ, y) = (f, ∇·f) of `AugmentedField`, which `integrate` runs like any field (a flat state
(B, D + P): x̄ flattened to D numbers, then P divergence accumulators).

Modules: `core` (the augmented field and the divergence estimators), `api` (`likelihood`), `bpd` (dequantisation and
bits/dim, `bits_per_dim`), `cost` (`estimate`: model calls, VJPs and seconds of a request from a short pilot,
the budget, the progress bar).
"""

from probflow.likelihood.api import likelihood
from probflow.likelihood.bpd import BitsPerDim, bits_per_dim, dequantise
from probflow.likelihood.core import (
    DEFAULT_PROBES,
    EXACT_MAX_DIM,
    SE_CHANNELS,
    AugmentedField,
    Likelihood,
    ProbeStream,
    choose_divergence,
    path_norm,
    per_sample_norm,
    probes,
)
from probflow.likelihood.cost import BudgetError, Cost, estimate

__all__ = ["AugmentedField", "Likelihood", "BitsPerDim", "Cost", "BudgetError", "likelihood", "bits_per_dim",
           "estimate", "probes", "dequantise", "per_sample_norm", "path_norm", "choose_divergence", "EXACT_MAX_DIM",
           "DEFAULT_PROBES", "SE_CHANNELS", "ProbeStream"]
