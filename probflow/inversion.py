"""Exact inversion for an ordinary decoder: x_T such that the explicit sampler reproduces x_0 to round-off.

A fixed-grid decoder on the decreasing grid σ_0 > σ_1 > … > σ_N is a chain of steps in x̄ (docs/MATH.md §1–2),

    x̄_{i+1} = Φ_i(x̄_i; h_i),                                                                           (X1)

each Φ_i one step of the registered method on [σ_i, σ_{i+1}], h_i the history a multistep method carries from the
steps before (its earlier denoiser values; UniPC also its corrected state). Decoding is explicit; encoding is not
(plain DDIM inversion is an O(h²) inverse of each step). `encode_exact` solves (X1) for x̄_0 … x̄_{N−1} given
x̄_N = x_0·sqrt(1+σ_N²) (docs/MATH.md §9), matrix-free: only forward calls of the model (no forward-mode AD, no
backward pass, no Jacobian matrix), memory O(k·state) (`estimate_memory`; a batch that would not fit is refused
before anything is allocated).

Preconditioner: the Gaussian surrogate. For data N(0, s²I) the denoiser is D = s²/(s²+σ²)·x̄, linear, and every
decoder step is a linear map in x̄; its coefficients (one scalar per step, or per pair of steps for multistep
history) are computed by running the method's own step function on that scalar model, with s² the mean square
of each sample's x_0. This is the exact Jacobian of (X1) when ∂D/∂x̄ = s²/(s²+σ²)·I; the iterations below correct
what the network's D does beyond it.

Single-step decoders (euler, heun2, rk4, …): the steps are solved one at a time, i = N−1 … 0 (backward
substitution), each by Anderson acceleration (`probflow.newton.Anderson`, memory m) of
y ← y + (x̄_{i+1} − Φ_i(y))/a_i, with a_i the surrogate's ∂Φ_i/∂y per sample; one call of Φ_i per iteration. The
warm start extrapolates the slope (x̄_{j+1} − x̄_j)/(σ_{j+1} − σ_j) of the two solved steps above linearly in σ
(local error O(h³)). A step whose Anderson solve stalls or diverges above its failure bound is finished by
inexact Newton–Krylov (`probflow.newton.newton_krylov`: GMRES on forward differences of Φ_i, forward calls only).

Multistep decoders (dpmpp_2m/3m, unipc, unipc_3): a step's history couples it to the steps before it, so the
trajectory X = (x̄_0 … x̄_{N−1}) is solved as one unknown. The residual R_i = x̄_{i+1} − Φ_i(x̄_i; h_i(X)) of all N
equations comes from one teacher-forced pass of the method's step function (each step run on the iterate's x̄_i,
its history from the same pass): one call per step, the cost of one decode. Newton's correction with the
surrogate Jacobian, δ = −A⁻¹R (A: N×N per sample, shared by all pixels), is accelerated by Anderson over the whole
trajectory (each x̄_i scaled to the data's scale by 1/sqrt(1+σ_i²)). Warm start: the method's own explicit encode
on the flipped grid (one decode). `solve="trajectory"` applies the same solve to single-step decoders.

Tolerances and verification. A step (or the trajectory) is solved when every residual |R_i|_∞ ≤
tol·max(1, |x̄_{i+1}|_∞) (tol = 1 ulp of the state's dtype by default, at least 1e-13), or when it has
stalled at round-off below 256× that (a lower-precision network raises the bound by what it can resolve). Every
solve ends with a verification: the ordinary decoder (`probflow.decode`'s path) runs from the stored latent x_T
alone and must return x_0 within verify_tol·max(1, |x_0|_∞). A float32 chain can amplify each step's round-off; a
sample whose verified round trip has an RMS error above 16·max(tol, eps, 1e-13) (the round-trip targets, 1e-12 MSE in
float32 and 1e-24 in float64 on the [0, 1] scale, at the default tol) is polished by Newton–Krylov on x_T
(shooting, decode(x_T) = x_0; to half that bound in max norm), forward calls only. A solve that does not
converge, or a failed verification, raises `InversionError` naming σ, the residual and what to try; never a
silently inexact latent. Measured costs and limits: benchmarks/INVERSION.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probflow.field import DDIMField, EpsModel, as_field
from probflow.flows import sampling_grid
from probflow.integrate import Solution, check_state, integrate, scale_in, scale_out
from probflow.newton import Anderson, newton_krylov
from probflow.solvers import Method, get_method

__all__ = ["InversionError", "encode_exact", "exact_methods", "estimate_memory"]

_HINT = "try more steps, another grid (e.g. quadratic_open, which ends above σ = 0), or a float64 state and network"

class InversionError(ValueError):
    """The implicit solve (X1) did not reach its tolerance: the latent would not be exact."""


def exact_methods() -> list[str]:
    """Registered methods `encode_exact` can invert (`invertible`)."""
    from probflow.solvers import METHODS
    return [n for n, m in METHODS.items() if invertible(m)]


def invertible(m: Method) -> bool:
    """`encode_exact` needs a fixed-grid, deterministic, non-reversible, non-Adams method (docs/MATH.md §14)."""
    return not (m.adaptive or m.reversible or m.uniform_steps or m.stochastic or m.backend == "scipy")


# ------------------------------------------------------------------------------------------------ memory


def estimate_memory(x0: Tensor, sigmas: Tensor, method: str | Method = "euler", *, memory: int = 8,
                    solve: str = "auto", trajectory: bool = False) -> int:
    """Bytes the solve itself keeps (the model's own activations, as in sampling, not included): per-step,
    (2·memory + 12) float64 copies of the batch state (Anderson's differences, iterate, residual, best iterate,
    warm-start history; Newton–Krylov's Krylov basis fits in the same); trajectory solves, (2·memory + 8) copies of
    the whole trajectory (N states) plus the surrogate's N×N matrices per sample."""
    m, n, state = (method if isinstance(method, Method) else get_method(method)), len(sigmas) - 1, x0.numel() * 8
    if _uses_trajectory(m, solve):
        return (2 * memory + 8) * n * state + 2 * x0.shape[0] * n * n * 8
    return (2 * memory + 12) * state + ((n + 1) * x0.element_size() * x0.numel() if trajectory else 0)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(v.split()[1]) * 1024 for v in f if v.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _check_memory(need: int, max_memory: int | None, x0: Tensor, n: int, how: str) -> None:
    limit = max_memory
    if limit is None:
        avail = _available_memory()
        limit = None if avail is None else avail // 2
    if limit is not None and need > limit:
        raise ValueError(f"x0: the {how} solve of {x0.shape[0]} × {tuple(x0.shape[1:])} over {n} steps needs about "
                         f"{need / 2**20:.0f} MiB beyond the model (limit {limit / 2**20:.0f} MiB: max_memory, "
                         "default half the available memory); encode fewer images at a time")


# ------------------------------------------------------------------------------------- Gaussian surrogate


def _gauss_field(s2: Tensor) -> DDIMField:
    """ε of N(0, s2·I), per batch element (s2 of shape (B, 1)): D = s2/(s2+σ²)·x̄, ε = (x̄ − D)/σ."""
    def eps(x: Tensor, sigma: Tensor) -> Tensor:
        return x * torch.sqrt(1 + sigma**2) * sigma / (s2 + sigma**2)
    return DDIMField(eps)


def _scales(x0: Tensor) -> Tensor:
    """s² per sample: the mean square of x_0 (at least 1e-4)."""
    return x0.detach().double().reshape(x0.shape[0], -1).pow(2).mean(1).clamp_min(1e-4).cpu()


def _run_step(field: DDIMField, m: Method, y: Tensor, s: Tensor, s_next: Tensor, state=None):
    """(x̄_next, state): one decoder step σ → σ_next as the decoder runs it (its step function, or integrate)."""
    if m.backend == "probflow":
        with torch.no_grad():
            return m.step(field, y, s, s_next, state)
    return integrate(field, y, torch.stack([s, s_next]), m).x, None


def _surrogate_slopes(m: Method, sigmas: Tensor, s2: Tensor) -> Tensor:
    """a[i, b] = ∂Φ_i/∂y of the surrogate for sample b (single-step methods: Φ_i is linear, a = Φ_i(1))."""
    sig = sigmas.double().cpu()
    f = _gauss_field(s2[:, None])
    one = torch.ones(len(s2), 1, dtype=torch.float64)
    return torch.stack([_run_step(f, m, one, sig[i], sig[i + 1])[0][:, 0] for i in range(len(sig) - 1)])


def _surrogate_inverse(m: Method, sigmas: Tensor, s2: Tensor) -> Tensor:
    """A⁻¹ per sample (B, N, N): A = ∂R/∂X of the teacher-forced residuals R_i = x̄_{i+1} − Φ_i(x̄_i; h_i) for the
    surrogate (linear), column k from the unit trajectory e_k (all columns and samples in one batched pass)."""
    n, b = len(sigmas) - 1, len(s2)
    sig = sigmas.double().cpu()
    eye = torch.eye(n, dtype=torch.float64)
    xs = eye.repeat(b, 1).reshape(b * n, n)  # row (sample, k): the unit trajectory e_k
    r = _residuals(_gauss_field(s2.repeat_interleave(n)[:, None]), m, xs.T[..., None], torch.zeros(b * n, 1,
                   dtype=torch.float64), sig)  # (N, B·N, 1): R_i of column k
    a = r[..., 0].T.reshape(b, n, n).transpose(1, 2)  # a[b, i, k] = ∂R_i/∂X_k
    return torch.linalg.inv(a)


# ------------------------------------------------------------------------------------ per-step solves


def _maxabs(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).abs().amax(1).double().cpu()


def _ulp_tol(x: Tensor, tol: float) -> Tensor:
    return tol * _maxabs(x).clamp_min(1.0)  # per-sample bound tol·max(1, |x|_∞)


def _bmask(mask: Tensor, like: Tensor) -> Tensor:  # (B,) → broadcastable over like
    return mask.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def _model_eps(field: DDIMField, dtype: torch.dtype) -> float:
    """4·eps of the dtype the network computes in, when lower than the state's (else 0)."""
    md = field.model_dtype or getattr(field.model, "model_dtype", None)
    if md is None or not md.is_floating_point or torch.finfo(md).eps <= torch.finfo(dtype).eps:
        return 0.0
    return 4 * torch.finfo(md).eps


def _solve_step(field, m, target, guess, s, s_next, a, tol, max_iter, memory, patience=3, floor_eps=0.0, pre=None):
    """(X1) for one single-step decoder step: y with Φ(y) = target per sample, by Anderson on y ← y + g/a
    (a: the surrogate slope per sample). Once every open sample has stalled for `patience` iterations (or half
    of max_iter is spent), plain iteration from the best iterate (where a lower-precision network's output is
    piecewise constant it lands on an exact fixed point); a diverging solve restarts from its best iterate with
    half the step. After the first iteration the step size per sample is the secant's (`_secant_beta`).
    Returns (y, calls, best residual, failure bound) per sample."""
    bound, y, b = _ulp_tol(target, tol), guess, target.shape[0]
    fail, acc = 256 * bound, Anderson(memory, (1.0 / a).clamp(0.5, 1e6))
    done, stall = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.long)
    best_r = torch.full((b,), float("inf"), dtype=torch.float64)
    best_y = y.clone()
    iters, polish, prev = 0, False, None
    while True:
        phi = _run_step(field, m, y if pre is None else pre(y), s, s_next)[0]
        g = target - phi
        res = _maxabs(g)
        if floor_eps and iters == 0:  # the network's own precision bounds what the step can resolve
            fail = fail + 32 * floor_eps * _maxabs(phi - y)
        better = (res < best_r) & ~done
        best_r = torch.where(better, res, best_r)
        best_y = torch.where(_bmask(better, y), y, best_y)
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        done = done | (best_r <= bound) | (polish & (stall >= patience) & (best_r <= fail))
        iters += 1
        if bool(done.all()) or iters > max_iter:
            break
        beta = acc._beta(g).reshape(-1).cpu() if isinstance(acc.beta, Tensor) else torch.full((b,), acc.beta)
        if bool((res[~done] > 10 * best_r[~done]).any()) and float(beta.min()) > 1 / 16:
            acc = Anderson(memory if not polish else 0, beta / 2)  # diverging: from the best iterate, half the step
            y = best_y
            continue
        if not polish and (bool((stall[~done] >= patience).all()) or iters >= max_iter // 2):
            polish, acc = True, Anderson(0, beta)
            stall.zero_()
            y = best_y
            continue
        y = torch.where(_bmask(done, y), best_y, acc.next(y, g))  # converged samples keep their solution
        if acc.dy:  # the step's own secant slope per sample replaces the surrogate's from now on
            acc.beta = _secant_beta(acc.dy[-1], acc.dg[-1], beta)
        if prev is not None and not polish:  # contracting fast: take the next iterate without its own call
            rate = res / prev.clamp_min(1e-300)
            take = ~done & better & (rate < 0.25) & (res * rate <= bound / 4)
            best_y = torch.where(_bmask(take, y), y, best_y)
            best_r = torch.where(take, res * rate, best_r)
            done = done | take
            if bool(done.all()):
                break
        prev = res
    return best_y, iters, best_r, fail


def _secant_beta(dy: Tensor, dg: Tensor, beta: Tensor) -> Tensor:
    """1/a per sample, a = <ΔΦ, Δy>/|Δy|² = −<Δg, Δy>/|Δy|² the Rayleigh quotient of ∂Φ/∂y along the last step
    (a network whose ε does not scale like the Gaussian surrogate's, e.g. random weights, is far from a_i);
    clamped to [1/4, 4]× the current value and [0.5, 1e6] (a sample without a usable secant keeps it)."""
    den = (dy * dy).sum(1)
    a = (-(dg * dy).sum(1) / den.clamp_min(1e-300)).cpu()
    new = torch.where((den.cpu() > 0) & (a > 0), 1.0 / a.clamp_min(1e-300), beta)
    return torch.minimum(torch.maximum(new, beta / 4), beta * 4).clamp(0.5, 1e6)


def _guess(xs: dict[int, Tensor], sigmas: Tensor, i: int) -> Tensor:
    """Warm start for x̄_i: the slope of the solved steps above, extrapolated linearly in σ (a constant slope
    with one solved step, x̄_{i+1} itself with none)."""
    if i + 2 not in xs:
        return xs[i + 1].clone()
    sg = [float(sigmas[k]) for k in range(i, min(i + 4, len(sigmas)))]
    v1 = (xs[i + 2] - xs[i + 1]) / (sg[2] - sg[1])
    if i + 3 in xs:
        v2 = (xs[i + 3] - xs[i + 2]) / (sg[3] - sg[2])
        m0, m1, m2 = (sg[0] + sg[1]) / 2, (sg[1] + sg[2]) / 2, (sg[2] + sg[3]) / 2
        w = (m0 - m1) / (m1 - m2)
        if w <= 1.0:  # extrapolating beyond the last interval's length (grids that widen fast): constant slope
            v1 = v1 + w * (v1 - v2)
    return xs[i + 1] - (sg[1] - sg[0]) * v1


def _fallback(field, m, target, y, r, fail, bad, s, s_next, tol, max_iter, pre=None):
    """Newton–Krylov on the step for the samples whose Anderson solve failed (the others count as converged:
    never moved, still evaluated). Returns (y, r, calls, record)."""
    inf = torch.full_like(r, float("inf"))
    nk = newton_krylov(lambda v: _run_step(field, m, v if pre is None else pre(v), s, s_next)[0], target, y,
                       torch.where(bad, _ulp_tol(target, tol), inf), torch.where(bad, fail, inf),
                       max_iter=min(max_iter, 20))
    better = bad & (nk.res < r)
    y = torch.where(_bmask(better, y), nk.z, y)
    r = torch.where(better, nk.res, r)
    return y, r, nk.evals, {"samples": bad.nonzero()[:, 0].tolist(), "newton_iterations": int(nk.iterations.max()),
                            "calls": nk.evals, "residual": float(nk.res[bad].max()), "converged": bool(nk.done.all())}


def _step_error(m, sigmas, i, n, r, b, how):
    j = int(torch.argmax(r / b))
    return InversionError(
        f"encode_exact: the {m.name} step σ = {float(sigmas[i]):.6g} → {float(sigmas[i + 1]):.6g} (step {i} of {n}) "
        f"did not converge ({how}): residual {float(r[j]):.3e} > tolerance {float(b[j]):.3e} (sample {j}); the "
        f"latent would not be exact; {_HINT}")


def _backward(field, m, x_end, sigmas, s2, tol, max_iter, memory, keep):
    """Backward substitution of (X1) from x̄_N = x_end, one step at a time. Returns (x̄_0, trajectory or None,
    per-step calls, residuals, bounds, fallback records), per-step lists indexed by decoder step (σ_0 first)."""
    n = len(sigmas) - 1
    slopes = _surrogate_slopes(m, sigmas, s2)
    xs = {n: x_end}
    calls, res, bounds, fallbacks = [0] * n, [0.0] * n, [0.0] * n, []
    feps = _model_eps(field, x_end.dtype)
    for i in range(n - 1, -1, -1):
        # step 0 sees x̄_0 as the decoder will, through the stored (rounded) latent x_T = x̄_0/sqrt(1+σ_0²)
        pre = (lambda v: scale_in(scale_out(v, sigmas[0]), sigmas[0])) if i == 0 else None
        y, k, r, b = _solve_step(field, m, xs[i + 1], _guess(xs, sigmas, i), sigmas[i], sigmas[i + 1], slopes[i],
                                 tol, max_iter, memory, floor_eps=feps, pre=pre)
        bad = r > b
        if bad.any():  # Anderson stalled or diverged: Newton–Krylov on those samples
            y, r, kk, fb = _fallback(field, m, xs[i + 1], y, r, b, bad, sigmas[i], sigmas[i + 1], tol, max_iter, pre)
            fallbacks.append({"step": i, **fb})
            k += kk
            bad = r > b
        if bad.any():
            raise _step_error(m, sigmas, i, n, r, b, f"{k} calls of the step, Anderson then Newton–Krylov")
        xs[i] = y
        if not keep:
            xs.pop(i + 3, None)
        calls[i], res[i], bounds[i] = k, float(r.max()), float(b.max())
    traj = [xs[i] for i in range(n + 1)] if keep else None
    return xs[0], traj, calls, res, bounds, fallbacks


# ----------------------------------------------------------------------------------- trajectory solves


def _residuals(field: DDIMField, m: Method, xs: Tensor, target: Tensor, sigmas: Tensor) -> Tensor:
    """Teacher-forced residuals R_i = x̄_{i+1} − Φ_i(x̄_i; h_i), i = 0 … N−1, of the trajectory xs (N, B, *S) with
    x̄_N = target: each step runs on the iterate's own x̄_i, its history from the same pass (one call per step)."""
    n = xs.shape[0]
    out = torch.empty_like(xs)
    state = None
    for i in range(n):
        y, state = _run_step(field, m, xs[i], sigmas[i], sigmas[i + 1], state)
        out[i] = (xs[i + 1] if i + 1 < n else target) - y
    return out


def _solve_trajectory(field, m, x_end, sigmas, s2, tol, max_iter, memory, patience=2):
    """(X1) on the whole trajectory: Anderson on X ← X − A⁻¹R(X) (module docstring). Returns (X (N, B, *S),
    passes, best relative residual per sample, its bound, history)."""
    n, b = len(sigmas) - 1, x_end.shape[0]
    ainv = _surrogate_inverse(m, sigmas, s2).to(x_end.device)  # (B, N, N)
    scale = torch.rsqrt(1 + sigmas.double() ** 2)[:n].to(x_end.device).reshape(n, 1, *([1] * (x_end.ndim - 1)))
    up = integrate(field, x_end, sigmas.flip(0), m, trajectory=True).trajectory  # warm start: the explicit encode
    xs = up.flip(0)[:n].contiguous()
    bound = torch.full((b,), tol, dtype=torch.float64)
    fail = 256 * bound + 64 * n * _model_eps(field, x_end.dtype)
    acc = Anderson(memory)
    best_r = torch.full((b,), float("inf"), dtype=torch.float64)
    best = xs.clone()
    stall = torch.zeros(b, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    history, passes = [], 0
    while True:
        r = _residuals(field, m, xs, x_end, sigmas)
        passes += 1
        rel = _rel_res(r, torch.cat([xs[1:], x_end[None]]))
        better = (rel < best_r) & ~done
        best_r = torch.where(better, rel, best_r)
        best[:, better.to(xs.device)] = xs[:, better.to(xs.device)]
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        done = done | (best_r <= bound) | ((stall >= patience) & (best_r <= fail))
        history.append(float(rel[~done].max()) if bool((~done).any()) else float(best_r.max()))
        if bool(done.all()) or passes > max_iter:
            break
        if bool((rel[~done] > 1e3 * best_r[~done]).any()):  # diverging: restart from the best iterate
            acc, xs = Anderson(memory), best.clone()
            continue
        delta = -torch.einsum("bij,jb...->ib...", ainv, r.double()).to(xs.dtype)  # Newton with the surrogate
        u = (xs * scale).transpose(0, 1)  # (B, N, *S): per-sample vectors for Anderson, on the data's scale
        nxt = acc.next(u, (delta * scale).transpose(0, 1)).transpose(0, 1) / scale
        xs = torch.where(_bmask(done, xs[0])[None], best, nxt.to(xs.dtype))
    return best, passes, best_r, fail, history


def _rel_res(r: Tensor, nxt: Tensor) -> Tensor:
    """max_i |R_i|_∞ / max(1, |x̄_{i+1}|_∞) per sample (r, nxt: (N, B, *S)), float64 on the CPU."""
    n, b = r.shape[:2]
    ra, na = r.reshape(n, b, -1).abs().amax(2), nxt.reshape(n, b, -1).abs().amax(2).clamp_min(1.0)
    return (ra / na).amax(0).double().cpu()


def _traj_error(m, sigmas, r, b, passes, history) -> InversionError:
    j = int(torch.argmax(r / b))
    return InversionError(
        f"encode_exact: the {m.name} trajectory solve (σ = {float(sigmas[0]):.6g} → {float(sigmas[-1]):.6g}, "
        f"{len(sigmas) - 1} steps) did not converge in {passes} passes: residual {float(r[j]):.3e} > tolerance "
        f"{float(b[j]):.3e} (sample {j}, relative to max(1, |x̄|)); the latent would not be exact; {_HINT}")


# ------------------------------------------------------------------------------------ verification


def _decoder_x(field: DDIMField, m: Method, sigmas: Tensor):
    """x_T ↦ x_0 exactly as probflow.decode: x → x̄ at σ_0, integrate, x̄ → x at σ_N."""
    s0, sn = sigmas[0], sigmas[-1]

    def decode_x(z: Tensor) -> Tensor:
        return scale_out(integrate(field, scale_in(z, s0), sigmas, m).x, sn)

    return decode_x


def _verify(field, m, x0, xT, sigmas, tol, verify_tol, polish, max_iter):
    """Decode from x_T alone; samples whose RMS error exceeds 16·max(tol, eps, 1e-13)·max(1, |x_0|_∞), or whose
        max error exceeds verify_tol·max(1, |x_0|_∞) (the chain amplified the steps' residuals), are polished by
    Newton–Krylov on x_T (shooting). Returns (x_T, max |round trip|_∞, polish record or None); raises
    InversionError when the verified round trip misses verify_tol."""
    decode_x = _decoder_x(field, m, sigmas)
    back = decode_x(xT)
    e = _maxabs(back - x0)
    rms = (back - x0).double().reshape(len(x0), -1).pow(2).mean(1).sqrt().cpu()
    lim, rms_lim = _ulp_tol(x0, verify_tol), _ulp_tol(x0, 16 * max(tol, torch.finfo(x0.dtype).eps, 1e-13))
    miss = (rms > rms_lim) | (e > lim)
    record = None
    if polish and bool(miss.any()):
        # the polish only has to bring the amplified round-off under the RMS bound, not to the step tolerance
        bound = torch.maximum(_ulp_tol(x0, tol), rms_lim / 2)
        stall = 256 * bound + 64 * len(sigmas) * _model_eps(field, x0.dtype) * _maxabs(x0)
        inf = torch.full_like(bound, float("inf"))
        nk = newton_krylov(decode_x, x0, xT, torch.where(miss, bound, inf), torch.where(miss, stall, inf),
                           max_iter=3, krylov=4, r0=back - x0)
        better = miss & (nk.res < e)
        xT = torch.where(_bmask(better, xT), nk.z, xT)
        e = _maxabs(decode_x(xT) - x0)
        record = {"samples": miss.nonzero()[:, 0].tolist(), "newton_iterations": int(nk.iterations.max()),
                  "decodes": nk.evals + 1, "residual": float(nk.res[miss].max())}
    if not bool((e <= lim).all()):
        j = int(torch.argmax(e / lim))
        raise InversionError(f"encode_exact: the {m.name} decoder from the solved latent misses x_0 by "
                             f"{float(e[j]):.3e} > {float(lim[j]):.3e} (sample {j}; is the model deterministic?); "
                             f"the latent would not be exact; {_HINT}")
    return xT, float(e.max()), record


# ------------------------------------------------------------------------------------------ the API


def _default_tol(dtype: torch.dtype) -> float:
    """1 ulp of the state's dtype (2 ulp cost digits images a polish), at least 1e-13: the per-step residuals
    compound to about N·tol relative to the image scale; 1e-13 keeps a float64 round trip's MSE below 1e-24."""
    return max(torch.finfo(dtype).eps, 1e-13)


def _uses_trajectory(m: Method, solve: str) -> bool:
    if solve not in ("auto", "step", "trajectory"):
        raise ValueError(f"solve: expected 'auto', 'step' or 'trajectory', got {solve!r}")
    if solve == "step" and m.multistep:
        raise ValueError(f"solve: the multistep {m.name} carries history between steps; its steps cannot be "
                         "solved one at a time (use 'auto' or 'trajectory')")
    return solve == "trajectory" or (solve == "auto" and m.multistep)


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

    Returns a Solution on the flipped (increasing) grid with x = x_T and `info`: `solve` ("step"/"trajectory"),
    `iterations` (per-step calls, decoder step order σ_0 first; or [passes]), `residuals`, `tolerances`,
    `nfe_solve` (model calls, warm start included), `nfe_verify` (the verification decode and any polish),
    `newton_fallbacks`, `shooting` (the polish record or None), `roundtrip_max_abs` (verified |decode(x_T) − x_0|_∞),
    `memory_bytes` (the estimate) and `decoder`. Raises InversionError if a solve does not converge or the
    verification fails.
    """
    field = as_field(model)
    m = method if isinstance(method, Method) else get_method(method)
    if not invertible(m):  # a Method object is checked like a registered name
        raise ValueError(f"method: encode_exact needs a fixed-grid, non-reversible decoder, one of {exact_methods()}; "
                         f"got {m.name!r}")
    x0 = check_state(x0, "x0")
    sigmas = sampling_grid(sigmas).to(dtype=x0.dtype, device=x0.device)
    tol = _default_tol(x0.dtype) if tol is None else float(tol)
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol: expected a positive tolerance, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1) or not (isinstance(memory, int) and memory >= 0):
        raise ValueError(f"max_iter, memory: expected integers >= 1 and >= 0, got {max_iter!r}, {memory!r}")
    verify_tol = 64 * len(sigmas) * tol if verify_tol is None else float(verify_tol)
    traj_solve = _uses_trajectory(m, solve)
    need = estimate_memory(x0, sigmas, m, memory=memory, solve=solve, trajectory=trajectory)
    _check_memory(need, max_memory, x0, len(sigmas) - 1, "trajectory" if traj_solve else "per-step")
    nfe0 = field.nfe
    x_end = scale_in(x0, sigmas[-1])
    s2 = _scales(x0)
    n = len(sigmas) - 1
    fallbacks: list[dict] = []
    if traj_solve:
        xs, passes, r, b, hist = _solve_trajectory(field, m, x_end, sigmas, s2, tol, max_iter, memory)
        if bool((r > b).any()):
            raise _traj_error(m, sigmas, r, b, passes, hist)
        xbar_T, traj, iters = xs[0], (list(xs) + [x_end] if trajectory else None), [passes]
        res, bounds = [float(r.max())], [float(b.max())]
    else:
        xbar_T, traj, iters, res, bounds, fallbacks = _backward(field, m, x_end, sigmas, s2, tol, max_iter, memory,
                                                                trajectory)
        hist = None
    nfe_solve = field.nfe - nfe0
    xT = scale_out(xbar_T, sigmas[0])
    err, shoot = None, None
    if verify:
        xT, err, shoot = _verify(field, m, x0, xT, sigmas, tol, verify_tol, polish, max_iter)
    nfe_verify = field.nfe - nfe0 - nfe_solve
    up = sigmas.flip(0)
    sc = torch.rsqrt(1 + up**2).reshape(-1, *([1] * x0.ndim))
    out_traj = torch.stack(traj[::-1]) * sc if trajectory else None
    info = {"decoder": m.name, "solve": "trajectory" if traj_solve else "step", "iterations": iters,
            "residuals": res, "tolerances": bounds, "nfe_solve": nfe_solve, "nfe_verify": nfe_verify,
            "newton_fallbacks": fallbacks, "shooting": shoot, "history": hist, "roundtrip_max_abs": err,
            "memory_bytes": need, "steps": n}
    return Solution(xT, nfe_solve + nfe_verify, up, out_traj, None, m.name, info)
