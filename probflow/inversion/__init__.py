"""Exact inversion for an ordinary decoder: x_T such that the explicit sampler reproduces x_0 to round-off.

A fixed-grid decoder on the decreasing grid σ_0 > σ_1 > … > σ_N is a chain of steps in x̄ (docs/MATH.md §1–2),

    x̄_{i+1} = Φ_i(x̄_i; h_i),                                                                           (X1)

each Φ_i one step of the registered method on [σ_i, σ_{i+1}], h_i the history a multistep method carries from the
steps before (its earlier denoiser values; UniPC also its corrected state). Decoding is explicit; encoding is not
(plain DDIM inversion is an O(h²) inverse of each step). `encode_exact` solves (X1) for x̄_0 … x̄_{N−1} given
x̄_N = x_0·sqrt(1+σ_N²) (docs/MATH.md §12), matrix-free: only forward calls of the model (no forward-mode AD, no
backward pass, no Jacobian matrix), memory O(k·state) (`estimate_memory`; a batch that would not fit is refused
before anything is allocated).

Preconditioner: the Gaussian surrogate (`probflow.inversion.surrogate`): for data N(0, s²I) every decoder step
is linear in x̄, with coefficients from the method's own step function; the iterations correct what the network's
denoiser does beyond it.

Module map: `common` (the error, the step as the decoder runs it, teacher-forced residuals), `memory` (the
estimate and the refusal), `surrogate`, `steps` (per-step solves), `trajectory` (trajectory solves), `verify`
(the round trip and the shooting polish); this module holds the API.

Single-step decoders (euler, heun2, rk4, …): the steps are solved one at a time, i = N−1 … 0 (backward
substitution), each by Anderson acceleration (`probflow.newton.Anderson`, memory m) of
y ← y + (x̄_{i+1} − Φ_i(y))/a_i, with a_i the surrogate's ∂Φ_i/∂y per sample; one call of Φ_i per iteration. The
warm start extrapolates the slope (x̄_{j+1} − x̄_j)/(σ_{j+1} − σ_j) of the two solved steps above linearly in log σ
(in σ where the window reaches σ = 0; local error O(h³)). A step whose Anderson residual has not halved in 16
calls, or that stalls or diverges above its failure bound, is handed to inexact Newton–Krylov
(`probflow.newton.newton_krylov`: GMRES on forward differences of Φ_i, forward calls only); only where the step
would still be refused, Anderson runs again from there with its whole budget and Newton–Krylov once more
(`steps._settle`); a sample a batched step still leaves is solved again alone and checked in the batch
(`steps._one_at_a_time`: a step that nearly folds can need more calls than the batched solve gives it).

Multistep decoders (dpmpp_2m/3m, unipc, unipc_3): a step's history couples it to the steps before it, so the
trajectory X = (x̄_0 … x̄_{N−1}) is solved as one unknown. The residual R_i = x̄_{i+1} − Φ_i(x̄_i; h_i(X)) of all N
equations comes from one teacher-forced pass of the method's step function (each step run on the iterate's x̄_i,
its history from the same pass): one call per step, the cost of one decode. Newton's correction with the
surrogate Jacobian, δ = −A⁻¹R (A: N×N per sample, shared by all pixels), is accelerated by Anderson over the whole
trajectory (each x̄_i scaled to the data's scale by 1/sqrt(1+σ_i²)). Warm start: the method's own explicit encode
on the flipped grid (one decode), whose model calls the first pass reuses (the same σ and bytes: about one call).
`solve="trajectory"` applies the same solve to single-step decoders.

Tolerances and verification. A step (or the trajectory) is solved when every residual |R_i|_∞ ≤
tol·max(1, |x̄_{i+1}|_∞) (tol = 1 ulp of the state's dtype by default, at least 1e-13), or when it has
stalled at round-off below 256× that (a lower-precision network raises the bound by what it can resolve); a
step also when its best residual is within 4 ulps of the largest term of its evaluation (max(|y|_∞, |x̄_{i+1}|_∞):
above tol where |x̄_i| ≫ |x̄_{i+1}|, the large-σ steps in float32), fluctuates (the last call no better) and has not
halved in two calls (no plain-iteration search for a luckier rounding there; a network in a lower precision than the
state keeps that search, which can land on an exact fixed point of its piecewise-constant output); the
trajectory also when every step's residual is within 4 ulps of the largest term of its evaluation
(max(1, |x̄_i|_∞, |x̄_{i+1}|_∞): the round-off of the residual's own evaluation; accepted at once, passes spent
waiting for a stall there cannot improve it), or within 8 ulps of it and not halved in two passes (a multistep
step also adds its history's terms; float64: both below tol, no change). Every
solve ends with a verification: the ordinary decoder (`probflow.decode`'s path) runs from the stored latent x_T
alone and must return x_0 within verify_tol·max(1, |x_0|_∞). A float32 chain can amplify each step's round-off; a
sample whose verified round trip has an RMS error above 16·max(tol, eps, 1e-13) (the round-trip targets, 1e-12 MSE in
float32 and 1e-24 in float64 on the [0, 1] scale, at the default tol) is polished by Newton–Krylov on x_T
(shooting, decode(x_T) = x_0; to half that RMS bound, or below the bound itself once a Newton step no longer
halves it: the chain's round-off), forward calls only. A solve that does not
converge, or a failed verification, raises `InversionError` naming σ, the residual and what to try (a failed
step also names its own round-off floor, |Φ_i(y') − Φ_i(y)|_∞ for y' one ulp from the iterate, so that a miss of
the tolerance by round-off is told apart from a step map the solvers do not resolve); never a silently inexact
latent. For quantised data (`quantum`: 8-bit images) a step whose map folds, so that
x_0 has no preimage near the solve (a guided model's last step, docs/MATH.md (X3)), may end below a quarter of a
level; the verified round trip must then be too, and `info["exact"]` says "quantum" instead of "round-off". So
does a verified round trip that the chain amplified beyond the polish's reach but not beyond quantum/4.
Measured costs and limits: benchmarks/INVERSION.md (under guidance: benchmarks/GUIDANCE.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field
from probflow.flows import sampling_grid
from probflow.integrate import Solution, check_state, scale_in, scale_out
from probflow.inversion.common import InversionError
from probflow.inversion.memory import check_memory, estimate_memory, uses_trajectory
from probflow.inversion.steps import backward
from probflow.inversion.surrogate import scales
from probflow.inversion.trajectory import solve_trajectory, trajectory_error
from probflow.inversion.verify import verify as verify_roundtrip
from probflow.solvers import Method, get_method

__all__ = ["InversionError", "encode_exact", "estimate_memory", "exact_methods", "invertible"]


def exact_methods() -> list[str]:
    """Registered methods `encode_exact` can invert (`invertible`)."""
    from probflow.solvers import METHODS
    return [n for n, m in METHODS.items() if invertible(m)]


def invertible(m: Method) -> bool:
    """`encode_exact` needs a fixed-grid, deterministic, non-reversible, non-Adams method (docs/MATH.md §14)."""
    return not (m.adaptive or m.reversible or m.uniform_steps or m.stochastic or m.backend == "scipy")


def _default_tol(dtype: torch.dtype) -> float:
    """1 ulp of the state's dtype (2 ulp cost digits images a polish), at least 1e-13: the per-step residuals
    compound to about N·tol relative to the image scale; 1e-13 keeps a float64 round trip's MSE below 1e-24."""
    return max(torch.finfo(dtype).eps, 1e-13)


def _check_options(dtype: torch.dtype, tol, max_iter, memory, quantum) -> tuple[float, float | None]:
    """(tol, level): the step tolerance (default `_default_tol`) and the level bound quantum/4 (None without
    quantum), the options checked."""
    tol = _default_tol(dtype) if tol is None else float(tol)
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol: expected a positive tolerance, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1) or not (isinstance(memory, int) and memory >= 0):
        raise ValueError(f"max_iter, memory: expected integers >= 1 and >= 0, got {max_iter!r}, {memory!r}")
    if quantum is not None and not (isinstance(quantum, (int, float)) and 0 < quantum < math.inf):
        raise ValueError(f"quantum: expected a positive finite level spacing (e.g. 2/255), got {quantum!r}")
    return tol, None if quantum is None else quantum / 4


def encode_exact(
    model: EpsModel | DDIMField,
    x0: Tensor,
    sigmas: Tensor,
    method: str | Method = "euler",
    *,
    tol: float | None = None,
    max_iter: int = 100,
    memory: int = 8,
    solve: str = "auto",
    trajectory: bool = False,
    verify: bool = True,
    verify_tol: float | None = None,
    polish: bool = True,
    max_memory: int | None = None,
    quantum: float | None = None,
) -> Solution:
    """x_0 → x_T such that `probflow.decode(model, x_T, sigmas, method)` returns x_0 to round-off (module docstring).

    sigmas: the decreasing sampling grid the decoder will use. method: a fixed-grid registered method
    (`exact_methods()`). solve: "auto" (per step for single-step decoders, the trajectory for multistep ones),
    "step" or "trajectory". tol: residual bound relative to max(1, |x̄|_∞) (default `_default_tol`: 1 ulp of
    x0's dtype, at least 1e-13; a solve stalled at round-off is accepted up to 256× that). max_iter: iterations
        per step solve, or passes of the trajectory solve. memory: Anderson's history. verify_tol: bound of the
    verified round trip relative to
    max(1, |x_0|_∞) (default 64·len(sigmas)·tol). polish: Newton–Krylov on x_T where the chain amplified
    round-off. max_memory: bytes the solve may keep beyond the model (default half the available memory; the
    estimate is `estimate_memory`), else ValueError before allocating. Only forward calls of the model are made.
    quantum: the spacing of the levels x_0 was quantised to, in x's units (2/255 for 8-bit images on [−1, 1]; the
    command line passes it for images), or None. With it, a step that neither solver brings to its tolerance (a
    step map that folds, as a guided model's last step can) is accepted where its residual is below quantum/4, and
    the verified round trip must then be below quantum/4 everywhere: the decoded values round to x_0's levels; a
    verified round trip above the round-off bound after the polish is accepted there too (`exact` "quantum").

    Returns a Solution on the flipped (increasing) grid with x = x_T and `info`: `solve` ("step"/"trajectory"),
    `iterations` (per-step calls, decoder step order σ_0 first; or [passes]), `residuals`, `tolerances`,
    `nfe_solve` (model calls, warm start included), `nfe_verify` (the verification decode and any polish),
    `newton_fallbacks`, `shooting` (the polish record or None), `roundtrip_max_abs` (verified |decode(x_T) − x_0|_∞),
    `memory_bytes` (the estimate), `decoder` and `exact`: "round-off", or "quantum" with `coarse_steps` (the
    steps accepted below quantum/4, {"step", "residual"}). Raises InversionError if a solve does not converge or the
    verification fails.
    """
    field = as_field(model)
    m = method if isinstance(method, Method) else get_method(method)
    if not invertible(m):  # a Method object is checked like a registered name
        raise ValueError(f"method: encode_exact needs a fixed-grid, non-reversible decoder, one of {exact_methods()}; "
                         f"got {m.name!r}")
    x0 = check_state(x0, "x0")
    sigmas = sampling_grid(sigmas).to(dtype=x0.dtype, device=x0.device)
    tol, level = _check_options(x0.dtype, tol, max_iter, memory, quantum)
    verify_tol = 64 * len(sigmas) * tol if verify_tol is None else float(verify_tol)
    traj_solve = uses_trajectory(m, solve)
    need = estimate_memory(x0, sigmas, m, memory=memory, solve=solve, trajectory=trajectory)
    check_memory(need, max_memory, x0, len(sigmas) - 1, "trajectory" if traj_solve else "per-step")
    nfe0 = field.nfe
    x_end = scale_in(x0, sigmas[-1])
    s2 = scales(x0)
    n = len(sigmas) - 1
    fallbacks: list[dict] = []
    coarse: list[dict] = []
    if traj_solve:
        xs, passes, r, b, hist = solve_trajectory(field, m, x_end, sigmas, s2, tol, max_iter, memory)
        if bool((r > b).any()):  # below the data's own level is enough there: verified at the end
            if level is None or bool((r > b.clamp_min(level)).any()):
                raise trajectory_error(m, sigmas, r, b if level is None else b.clamp_min(level), passes, hist)
            coarse = [{"step": None, "residual": float(r.max())}]  # relative residual over the whole trajectory
        xbar_T, traj, iters = xs[0], (list(xs) + [x_end] if trajectory else None), [passes]
        res, bounds = [float(r.max())], [float(b.max())]
    else:
        xbar_T, traj, iters, res, bounds, fallbacks, coarse = backward(field, m, x_end, sigmas, s2, tol, max_iter,
                                                                        memory, trajectory, level)
        hist = None
    nfe_solve = field.nfe - nfe0
    xT = scale_out(xbar_T, sigmas[0])
    err, shoot, at_level = None, None, bool(coarse)
    if verify:
        xT, err, shoot, at_level = verify_roundtrip(field, m, x0, xT, sigmas, tol, verify_tol, polish, max_iter,
                                                    level, bool(coarse))
    nfe_verify = field.nfe - nfe0 - nfe_solve
    up = sigmas.flip(0)
    sc = torch.rsqrt(1 + up**2).reshape(-1, *([1] * x0.ndim))
    out_traj = torch.stack(traj[::-1]) * sc if trajectory else None
    info = {"decoder": m.name, "solve": "trajectory" if traj_solve else "step", "iterations": iters,
            "residuals": res, "tolerances": bounds, "nfe_solve": nfe_solve, "nfe_verify": nfe_verify,
            "newton_fallbacks": fallbacks, "shooting": shoot, "history": hist, "roundtrip_max_abs": err,
            "memory_bytes": need, "steps": n, "exact": "quantum" if at_level else "round-off", "coarse_steps": coarse}
    return Solution(xT, nfe_solve + nfe_verify, up, out_traj, None, m.name, info)
