"""Exact inversion for an ordinary decoder: x_T such that the explicit sampler reproduces x_0 to round-off.

A fixed-grid single-step decoder on the decreasing grid σ_0 > σ_1 > … > σ_N is a chain of steps in x̄
(MATH.md §1–2), x̄_{i+1} = Φ_i(x̄_i), each Φ_i one call of the registered method through `integrate` on
[σ_i, σ_{i+1}]. Decoding is explicit; encoding is not: an explicit step run upwards (plain DDIM inversion)
is only an O(h²) inverse of the step. `encode_exact` solves the implicit equations instead,

    Φ_i(y) = x̄_{i+1}   for y = x̄_i,   i = N−1 … 0,                                                    (X1)

by Anderson-accelerated fixed-point iteration on g(y) = x̄_{i+1} − Φ_i(y) (type II, memory m, least-squares
mixing per sample, so a sample's iterates do not depend on the rest of the batch). For Euler (DDIM) this is
backward Euler by fixed point: y = x̄_{i+1} − h ε(y, σ_i). The new direction is scaled by σ_i/σ_{i+1}, the
inverse of ∂Φ_i/∂y when the denoiser D = x̄ − σε does not depend on x̄ (exact solution of Eq. 12 with D
fixed: x̄_{i+1} − D = (σ_{i+1}/σ_i)(x̄_i − D)); at large σ, where ∂D/∂x̄ ≈ s²/σ² is small, this converges in
a few iterations. Warm start: a linear extrapolation in σ through the two x̄ below (x̄_{i+1} alone for the
first step). When every open sample has stalled, plain fixed-point iteration from the best iterate finishes
(where a lower-precision network's output is piecewise constant it lands on an exact fixed point); a solve
that diverges restarts from its best iterate with a smaller step. A sample's step is solved when
|g|_∞ ≤ tol·max(1, |x̄_{i+1}|_∞) (tol = 2 ulp of the state's dtype by default), or when it has stalled at
round-off below 256× that; a network running in a lower precision than the state raises that failure bound
by 16·eps(model dtype)·|Φ_i(y_0) − y_0|_∞ (the increment it computes).

A sample whose fixed-point solve of a step fails (stalls or diverges above the failure bound) is handed to
Newton's method on that step alone (`probflow.newton`: dense Jacobian of Φ_i from D forward-mode tangents,
Levenberg–Marquardt damping), from its best iterate; only if that fails too does the solve raise. Measured: digits,
heun2 on 10 quadratic_open steps, held-out test image 1 at σ 1.22 → 0.75 (float32); Euler on 10 trailing
steps of sharp 64-D mixtures at σ 0.72 → 0.34.

Every solve ends with a verification: the decoder runs from the stored latent x_T through `integrate`
(`probflow.decode`'s path) and must return x_0 within verify_tol·max(1, |x_0|_∞). A step that does not converge,
or a failed verification, raises `InversionError` naming σ and the residual: never a silently inexact latent.
`Solution.info` holds the per-step iteration counts and residuals, the NFE of solve and verification and the
verified round-trip error.

Multistep decoders (dpmpp_2m/3m, unipc, unipc_3) share a history between steps, so inverting one step needs
the earlier steps' denoiser values: a backward sweep with lagged history amounts to inverting the denoiser D
itself and stagnated (~5e-3). They are solved at the trajectory level instead, as a shooting problem on x_T
alone,

    F(x_T) = decode(x_T) − x_0 = 0,                                                                   (X2)

where decode is the ordinary decoder (`probflow.decode`'s path through `integrate`), by Newton's method per
sample (`probflow.newton`): warm start from the method's own explicit encode on the flipped grid; a dense
per-sample Jacobian of the whole decoder from D forward-mode tangents (finite differences when the model does
not carry tangents), kept up to date by Broyden's rank-one updates; Levenberg–Marquardt damping after a
rejected step; a fresh Jacobian only where damped steps keep failing or accepted steps crawl.
Every residual is a decode, so the solution is
verified by construction (and once more on the whole batch). NFE is reported per sample with the Jacobian's
D tangents counted as D decodes: the trajectory
solve costs about (D + iterations) decodes, so it suits small states (D ≤ `dense_max`, default 4096).

Limits (measured, benchmarks/INVERSION.md). The step into σ = 0 inverts the denoiser itself (Euler:
x_0 = D(y, σ_{N−1})); on the digits network D is nearly singular there (eigenvalues of ∂D/∂x̄ from −0.23 to
1.18, smallest singular value ~1e−3 at σ = 0.17), the solve stalls and raises rather than return an inexact
latent; grids that end at the table's smallest σ (`grids.NAMED["quadratic_open"]`) avoid that step. Large steps
on sharp models can fail the same way (Euler with 10 trailing steps on some 64-D mixtures, at σ 0.72 → 0.34).
A multistep decoder with large steps need not reach every x_0 near its warm start: on a 16-D mixture
(seed 13, std 0.1–0.5, 3 samples) dpmpp_3m on the 10-step quadratic and Karras grids and all four multistep
decoders on the 10-step DDIM trailing grid leave samples whose damped Newton solve gives up (continuation from
the warm start meets a fold, where the Jacobian is singular); it raises, never returns an inexact latent.
In float32 a latent is exact to the resolution of the float32 decoder, not beyond: where the decoder expands
round-off (heun2 on 10 quadratic_open steps of the digits network; dpmpp_2m and unipc on 10 log-SNR steps of
a sharp 64-D mixture), a one-ulp change of x_T moves the float32 decode by 1e-5–4e-5 max-abs, as much as the
round trip left, and the float32 decode of the latent differs from its float64 decode by an MSE of the same order
(0.1–20× the round trip's); the solve stops there (stall bound) and `info["roundtrip_max_abs"]` reports the round
trip reached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field
from probflow.flows import _decreasing
from probflow.integrate import Solution, check_state, integrate, scale_in, scale_out
from probflow.newton import newton_solve
from probflow.solvers import Method, get_method

__all__ = ["InversionError", "encode_exact", "exact_methods"]


class InversionError(ValueError):
    """The implicit solve (X1) did not reach its tolerance: the latent would not be exact."""


def exact_methods() -> list[str]:
    """Registered methods `encode_exact` can invert: fixed-grid, deterministic, not reversible (those are
    exact by construction) and not Adams (equal steps only)."""
    from probflow.solvers import METHODS

    return [n for n, m in METHODS.items()
            if not m.adaptive and not m.reversible and not m.uniform_steps and m.backend != "scipy"]


class _Anderson:
    """Anderson acceleration (type II) of y ← y + g(y), per sample over the flattened state."""

    def __init__(self, memory: int, damping: float = 1.0) -> None:
        self.m, self.beta = memory, damping
        self.dy: list[Tensor] = []
        self.dg: list[Tensor] = []
        self.y_prev: Tensor | None = None
        self.g_prev: Tensor | None = None

    def next(self, y: Tensor, g: Tensor) -> Tensor:
        yf, gf = y.reshape(y.shape[0], -1).double(), g.reshape(g.shape[0], -1).double()
        if self.y_prev is not None and self.m > 0:
            self.dy.append(yf - self.y_prev)
            self.dg.append(gf - self.g_prev)
            self.dy, self.dg = self.dy[-self.m:], self.dg[-self.m:]
        self.y_prev, self.g_prev = yf, gf
        if not self.dy:
            return (yf + self.beta * gf).to(y.dtype).reshape(y.shape)
        dg = torch.stack(self.dg, -1)  # (B, D, k)
        dy = torch.stack(self.dy, -1)
        a = dg.transpose(1, 2) @ dg
        reg = 1e-14 * a.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)[:, None, None]
        gamma = torch.linalg.solve(a + reg * torch.eye(a.shape[-1], dtype=a.dtype), dg.transpose(1, 2) @ gf[..., None])
        out = yf + self.beta * gf - ((dy + self.beta * dg) @ gamma)[..., 0]
        return out.to(y.dtype).reshape(y.shape)


def _ulp_tol(x: Tensor, tol: float) -> Tensor:
    """Per-sample bound tol·max(1, |x|_∞)."""
    return tol * x.reshape(x.shape[0], -1).abs().amax(1).clamp_min(1.0)


def _maxabs(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).abs().amax(1)


def _step(field: DDIMField, m: Method, y: Tensor, s: Tensor, s_next: Tensor) -> Tensor:
    """Φ(y): one decoder step σ → σ_next through the one integrate path."""
    return integrate(field, y, torch.stack([s, s_next]), m).x


def _solve_step(field, m, target, guess, s, s_next, tol, max_iter, memory, patience=3, floor_eps=0.0):
    """(X1) for one step: y with Φ(y) = target, per sample.

    Anderson first; once every open sample has stalled for `patience` iterations (or half of `max_iter` is
    spent), plain fixed-point iteration y ← y + (target − Φ(y)) from the best iterate: where the network's
    output is piecewise constant in y (a lower-precision network), it lands on an exact fixed point. A sample
    is done when |g|_∞ ≤ tol·max(1, |target|_∞), or, in the second phase, when it has stalled below the
    failure bound 256·tol·max(1, |target|_∞) (+ the network's floor). Converged samples stop moving.
    Returns (y, iterations, best residual per sample, failure bound per sample)."""
    bound = _ulp_tol(target, tol).double().cpu()
    fail = 256 * bound
    ratio = float(s_next) / float(s)
    acc = _Anderson(memory, damping=1.0 / ratio if ratio > 0 else 1.0)
    y = guess
    b = target.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    best_r = torch.full((b,), float("inf"), dtype=torch.float64)
    best_y = y.clone()
    stall = torch.zeros(b, dtype=torch.long)
    iters, polish = 0, False
    while True:
        phi = _step(field, m, y, s, s_next)
        g = target - phi
        res = _maxabs(g).double().cpu()
        if floor_eps and iters == 0:  # the network's own precision bounds what the step can resolve
            fail = fail + 4 * floor_eps * _maxabs(phi - y).double().cpu()  # |increment| the network computed
        better = (res < best_r) & ~done
        best_r = torch.where(better, res, best_r)
        best_y = torch.where(_bmask(better, y), y, best_y)
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        done = done | (best_r <= bound) | (polish & (stall >= patience) & (best_r <= fail))
        if bool(done.all()) or iters >= max_iter:
            break
        iters += 1
        if bool((res[~done] > 10 * best_r[~done]).any()) and acc.beta > 1 / 16:
            # diverging: restart from the best iterate with a smaller step (the scaled one overshoots first)
            acc = _Anderson(memory if not polish else 0, 1.0 if acc.beta > 1.0 else acc.beta / 2)
            y = best_y
            continue
        if not polish and (bool((stall[~done] >= patience).all()) or iters >= max_iter // 2):
            polish, acc = True, _Anderson(0, 1.0)
            stall.zero_()
            y = best_y
            continue
        y = torch.where(_bmask(done, y), best_y, acc.next(y, g))  # converged samples keep their solution
    return best_y, iters, best_r, fail


def _bmask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def _single_step() -> list[str]:
    return [n for n in exact_methods() if not _is_multistep(get_method(n))]


def _is_multistep(m: Method) -> bool:
    """Whether the method's steps carry a history (a state) from one step to the next: torchdiffeq's
    fixed-grid methods never do; a probflow step is probed on a 1-element problem (the probe's model calls
    are not counted, and the field is not the user's)."""
    if m.backend != "probflow":
        return False
    probe = DDIMField(lambda x, s: torch.zeros_like(x))
    one = torch.ones(1, 1, dtype=torch.float64)
    _, state = m.step(probe, one, torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), None)
    return state is not None


def _model_eps(field: DDIMField, dtype: torch.dtype) -> float:
    """eps of the dtype the network computes in, when lower than the state's (else 0)."""
    md = field.model_dtype or getattr(field.model, "model_dtype", None)
    if md is None or not md.is_floating_point or torch.finfo(md).eps <= torch.finfo(dtype).eps:
        return 0.0
    return 4 * torch.finfo(md).eps


def _guess(targets: dict[int, Tensor], sigmas: Tensor, i: int) -> Tensor:
    """Warm start for x̄_i: linear extrapolation in σ through x̄_{i+1}, x̄_{i+2} (or x̄_{i+1} alone)."""
    if i + 2 not in targets:
        return targets[i + 1].clone()
    s0, s1, s2 = (float(sigmas[k]) for k in (i, i + 1, i + 2))
    w = (s0 - s1) / (s1 - s2)
    return targets[i + 1] + w * (targets[i + 1] - targets[i + 2])


def _backward(field, m, x_end, sigmas, tol, max_iter, memory, dense_max=4096):
    """One backward pass of (X1) from x̄_N = x_end. Returns (x̄_0, trajectory x̄_0 … x̄_N, per-step
    iterations, residuals, bounds, Newton fallbacks), per-step lists indexed by decoder step i (σ_0 first)."""
    n = len(sigmas) - 1
    targets = {n: x_end}
    iters, res, bounds = [0] * n, [0.0] * n, [0.0] * n
    fallbacks: list[dict] = []
    for i in range(n - 1, -1, -1):
        y, k, r, b = _solve_step(field, m, targets[i + 1], _guess(targets, sigmas, i), sigmas[i], sigmas[i + 1],
                                 tol, max_iter, memory, floor_eps=_model_eps(field, x_end.dtype))
        bad = r > b
        if bad.any() and y[0].numel() <= dense_max:  # the fixed point stalled or diverged: Newton on those samples
            y, r, fb = _newton_step(field, m, targets[i + 1], y, r, b, bad, sigmas[i], sigmas[i + 1], tol, max_iter)
            fallbacks.append({"step": i, **fb})
            k += fb["iterations"]
            bad = r > b
        if bad.any():
            j = int(torch.argmax(r / b))
            raise InversionError(
                f"encode_exact: the {m.name} step σ = {float(sigmas[i]):.6g} → {float(sigmas[i + 1]):.6g} (step {i} "
                f"of {n}) did not converge in {max_iter} iterations: residual {float(r[j]):.3e} > tolerance "
                f"{float(b[j]):.3e} (sample {j}); the latent would not be exact")
        targets[i] = y
        iters[i], res[i], bounds[i] = k, float(r.max()), float(b.max())
    return targets[0], [targets[i] for i in range(n + 1)], iters, res, bounds, fallbacks


def _newton_step(field, m, target, y, r, b, bad, s, s_next, tol, max_iter):
    """The per-step fallback: Newton (probflow.newton, dense Jacobian of the step) for the samples whose
    fixed-point solve failed, from their best iterate, evaluated on the whole batch; the others are untouched.
    Returns (y, r, record) with the record's `tangent_nfe`: model calls of the Jacobians' tangents per sample
    (D per stage)."""
    inf = torch.full_like(r, float("inf"))  # the other samples count as converged: never moved, still evaluated
    nt = newton_solve(lambda v: _step(field, m, v, s, s_next), target, y,
                      torch.where(bad, _ulp_tol(target, tol).double().cpu(), inf), b, max_iter=max_iter)
    better = bad & (nt.res < r)
    y = torch.where(_bmask(better, y), nt.z, y)
    r = torch.where(better, nt.res, r)
    return y, r, {"samples": bad.nonzero()[:, 0].tolist(), "iterations": int(nt.iterations.max()),
                  "jacobians": int(nt.jacobians.max()), "tangent_nfe": int(nt.jacobians.max()) * nt.dim * m.stages,
                  "converged": bool(nt.done.all()), "residual": float(nt.res[bad].max()), "history": nt.history}


def _decoder_x(field: DDIMField, m: Method, sigmas: Tensor):
    """x_T ↦ x_0 exactly as probflow.decode: x → x̄ at σ_0, integrate, x̄ → x at σ_N (the residual of (X2))."""
    s0, sn = sigmas[0], sigmas[-1]

    def decode_x(z: Tensor) -> Tensor:
        return scale_out(integrate(field, scale_in(z, s0), sigmas, m).x, sn)

    return decode_x


def _stall_bound(field: DDIMField, x0: Tensor, sigmas: Tensor, bound: Tensor) -> Tensor:
    """Per sample: where a shooting solve (X2) counts as stalled at round-off — 256× its bound, plus what a
    lower-precision network can resolve through len(sigmas) steps."""
    return 256 * bound + 64 * len(sigmas) * _model_eps(field, x0.dtype) * _maxabs(x0).double().cpu()


def _polish(field, m, x0, sigmas, xT, miss, tol, max_iter):
    """Shooting (X2) from the per-step latent for the samples whose verified round trip has an RMS error
    above 8·max(tol, 2 eps(float32)): a chain
    that expands can amplify each step's round-off (digits, heun2, 10 steps, held-out image 1: 276× the bound);
    Newton on x_T (probflow.newton, whole batch evaluated, the others untouched) brings it to round-off of the
    decode itself. Returns (x_T, record) with `tangent_nfe` per polished sample."""
    decode_x = _decoder_x(field, m, sigmas)
    bound = _ulp_tol(x0, tol).double().cpu()
    stall = _stall_bound(field, x0, sigmas, bound)
    nt = newton_solve(decode_x, x0, xT, torch.where(miss, bound, torch.full_like(bound, float("inf"))), stall,
                      max_iter=max_iter)
    z = torch.where(_bmask(miss, xT), nt.z, xT)
    n_dec = (len(sigmas) - 1) * m.stages
    return z, {"samples": miss.nonzero()[:, 0].tolist(), "iterations": int(nt.iterations.max()),
               "jacobians": int(nt.jacobians.max()), "tangent_nfe": int(nt.jacobians.max()) * nt.dim * n_dec,
               "residual": float(nt.res[miss].max())}


def encode_exact(
    model: EpsModel | DDIMField,
    x0: Tensor,
    sigmas: Tensor,
    method: str | Method = "euler",
    *,
    tol: float | None = None,
    max_iter: int = 100,
    memory: int = 20,
    trajectory: bool = False,
    verify: bool = True,
    verify_tol: float | None = None,
    dense_max: int = 4096,
    polish: bool = True,
) -> Solution:
    """x_0 → x_T such that `probflow.decode(model, x_T, sigmas, method)` returns x_0 to round-off.

    Single-step methods: per-step solves (X1); multistep methods: the trajectory-level Newton solve (X2), whose
    `info` has `solve` = "trajectory", `newton_iterations` and `jacobians` per sample, `nfe_solve_per_sample`
    (warm start + decodes + D tangent decodes per Jacobian), `history` (largest open residual per iteration);
    max_iter then bounds the Newton iterations and dense_max the state size of its dense Jacobians. A single
    step whose fixed-point solve fails falls back to Newton on that step for the failing samples (dense_max
    bounds it too; `info["newton_fallbacks"]`: step, samples, iterations, Jacobians, tangent NFE per sample). A
    sample whose verified round trip has an RMS error above 8·max(tol, 2·eps(float32))·max(1, |x_0|_∞) (per-image
    MSE ~1e-12 on the [0, 1] scale; float64 chains stay far below it) is polished by the trajectory solve (X2) from
    its latent (`info["shooting"]`, same fields; None when not needed; polish=False skips it).

    sigmas: the decreasing sampling grid the decoder will use. method: a fixed-grid registered method
    (`exact_methods()`). tol: per-step residual bound relative to max(1, |x̄|_∞) (default 2 ulp of x0's
    dtype; a step stalled at round-off is accepted up to 256× that). max_iter: iterations per step solve;
    memory: Anderson's history. verify_tol: bound of the verified round trip relative to max(1, |x_0|_∞)
    (default 64·len(sigmas)·tol). Returns a Solution on the flipped (increasing) grid with x = x_T and
    `info`: per-step `iterations` and `residuals` (decoder step order, σ_0 first), `nfe_solve`,
    `nfe_verify`, `roundtrip_max_abs` (the verified |decode(x_T) − x_0|_∞, in x) and `decoder`. Raises
    InversionError if a step does not converge or the verification fails.
    """
    field = as_field(model)
    m = method if isinstance(method, Method) else get_method(method)
    if m.name not in exact_methods() and not isinstance(method, Method):
        raise ValueError(f"method: encode_exact needs a fixed-grid, non-reversible decoder, one of {exact_methods()}; "
                         f"got {m.name!r}")
    x0 = check_state(x0, "x0")
    sigmas = _decreasing(sigmas).to(dtype=x0.dtype, device=x0.device)
    tol = 2 * torch.finfo(x0.dtype).eps if tol is None else float(tol)
    verify_tol = 64 * len(sigmas) * tol if verify_tol is None else float(verify_tol)
    if not (tol > 0):
        raise ValueError(f"tol: expected a positive tolerance, got {tol!r}")
    if _is_multistep(m):
        return _encode_trajectory(field, m, x0, sigmas, tol, verify_tol, max_iter, verify, dense_max, trajectory)
    nfe0 = field.nfe
    x_end = scale_in(x0, sigmas[-1])
    xbar_T, traj, iters, res, bounds, fallbacks = _backward(field, m, x_end, sigmas, tol, max_iter, memory, dense_max)
    tangents = sum(f["tangent_nfe"] for f in fallbacks)  # the field counts a batched tangent call once
    nfe_solve = field.nfe - nfe0 + tangents
    err, polish_, polish = None, polish, None
    if verify:  # the ordinary decoder from the stored latent (in x, as decode reads it) must give x_0 back
        xbar_T = scale_in(scale_out(xbar_T, sigmas[0]), sigmas[0])
        back = integrate(field, xbar_T, sigmas, m).x
        e = _maxabs(back - x_end).double().cpu()
        rms = (back - x_end).double().reshape(len(x0), -1).pow(2).mean(1).sqrt().cpu()
        floor = 8 * max(tol, 2 * torch.finfo(torch.float32).eps)  # float32: per-image MSE ≈ 1e-12 on [0, 1]
        miss = rms > _ulp_tol(x_end, floor).double().cpu()
        if polish_ and bool(miss.any()) and x0[0].numel() <= dense_max:  # the chain amplified round-off: (X2)
            n1 = field.nfe
            xT_new, polish = _polish(field, m, x0, sigmas, scale_out(xbar_T, sigmas[0]), miss, tol, max_iter)
            nfe_solve += field.nfe - n1 + polish["tangent_nfe"]
            tangents += polish["tangent_nfe"]
            xbar_T = scale_in(xT_new, sigmas[0])
            e = _maxabs(integrate(field, xbar_T, sigmas, m).x - x_end).double().cpu()
        bound = _ulp_tol(x_end, verify_tol).double().cpu()
        err = float(e.max())
        if not bool((e <= bound).all()):
            raise InversionError(f"encode_exact: the {m.name} decoder from the solved latent misses x_0 by {err:.3e} "
                                 f"> {float(bound.max()):.3e} (is the model deterministic?); the latent would not be "
                                 "exact")
    nfe_verify = field.nfe - nfe0 - nfe_solve + tangents
    up = sigmas.flip(0)
    xT = scale_out(xbar_T, sigmas[0])
    out_traj = None
    if trajectory:
        scale = torch.rsqrt(1 + up**2).reshape(-1, *([1] * x0.ndim))
        out_traj = torch.stack(traj[::-1]) * scale
    info = {"decoder": m.name, "iterations": iters, "residuals": res, "tolerances": bounds,
            "nfe_solve": nfe_solve, "nfe_verify": nfe_verify, "newton_fallbacks": fallbacks, "shooting": polish,
            "roundtrip_max_abs": None if err is None else err / float(torch.sqrt(1 + sigmas[-1] ** 2))}
    return Solution(xT, nfe_solve + nfe_verify, up, out_traj, None, m.name, info)


def _encode_trajectory(field, m, x0, sigmas, tol, verify_tol, max_iter, verify, dense_max, trajectory) -> Solution:
    """Multistep decoders (X2): Newton on x_T alone for decode(x_T) = x_0 (probflow.newton), from the method's
    own explicit encode on the flipped grid; every residual is the ordinary decode (`probflow.decode`'s path)."""
    s0, sn = sigmas[0], sigmas[-1]
    decode_x = _decoder_x(field, m, sigmas)
    nfe0 = field.nfe
    z0 = scale_out(integrate(field, scale_in(x0, sn), sigmas.flip(0), m).x, s0)  # warm start: explicit encode
    warm = field.nfe - nfe0
    with torch.no_grad():
        r0 = decode_x(z0) - x0
    n_dec = field.nfe - nfe0 - warm
    bound = _ulp_tol(x0, tol).double().cpu()
    stall = _stall_bound(field, x0, sigmas, bound)
    verify_bound = torch.maximum(_ulp_tol(x0, verify_tol).double().cpu(), stall)
    nt = newton_solve(decode_x, x0, z0, bound, stall, max_iter=max_iter, dense_max=dense_max, r0=r0)
    d = nt.dim
    per_sample = warm + n_dec * (nt.evals + d * nt.jacobians)  # every model call, the Jacobians' tangents included
    if not bool(nt.done.all()):
        j = int(torch.argmax(nt.res / stall))
        raise InversionError(
            f"encode_exact: the {m.name} trajectory solve (Newton on x_T, σ = {float(s0):.6g} → {float(sn):.6g}, "
            f"{len(sigmas) - 1} steps) did not converge ({int(nt.iterations[j])} Newton iterations, "
            f"{int(nt.jacobians[j])} Jacobians, at most {max_iter}): residual {float(nt.res[j]):.3e} > "
            f"tolerance {float(stall[j]):.3e} (sample {j}); the latent would not be exact")
    z = nt.z
    err = float(nt.res.max())
    nfe_verify = 0
    if verify:  # the ordinary decoder on the whole batch, as the user will run it
        n1 = field.nfe
        with torch.no_grad():
            e = _maxabs(decode_x(z) - x0).double().cpu()
        nfe_verify = field.nfe - n1
        err = float(e.max())
        if not bool((e <= verify_bound).all()):
            raise InversionError(f"encode_exact: the {m.name} decoder from the solved latent misses x_0 by {err:.3e} "
                                 f"> {float(verify_bound.max()):.3e} (is the model deterministic?); the latent would "
                                 "not be exact")
    info = {"decoder": m.name, "solve": "trajectory", "iterations": [int(nt.iterations.max())],
            "newton_iterations": nt.iterations.tolist(), "jacobians": nt.jacobians.tolist(), "jacobian": nt.how,
            "residuals": [float(nt.res.max())], "tolerances": [float(stall.max())], "history": nt.history,
            "nfe_solve": int(per_sample.max()), "nfe_solve_per_sample": per_sample.tolist(), "nfe_warm": warm,
            "nfe_verify": nfe_verify, "roundtrip_max_abs": err}
    traj = None
    if trajectory:  # the decoder's own path from the latent (one more decode, not counted in nfe), σ increasing
        with torch.no_grad():
            path = integrate(field, scale_in(z, s0), sigmas, m, trajectory=True).trajectory
        traj = (path * torch.rsqrt(1 + sigmas**2).reshape(-1, *([1] * x0.ndim))).flip(0)
    return Solution(z, int(per_sample.max()) + nfe_verify, sigmas.flip(0), traj, None, m.name, info)
