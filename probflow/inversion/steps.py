"""The per-step solve of (X1) for single-step decoders: backward substitution, one step at a time (docs/MATH.md §12;
the method in `probflow.inversion`'s docstring)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probflow.integrate import scale_in, scale_out
from probflow.inversion.common import HINT, InversionError, bmask, halving, maxabs, model_eps, run_step, ulp_tol
from probflow.inversion.surrogate import surrogate_slopes
from probflow.newton import Anderson, newton_krylov

__all__ = ["backward", "fallback", "resolution"]


def _solve_step(field, m, target, guess, s, s_next, a, tol, max_iter, memory, patience=3, floor_eps=0.0, pre=None,
                give_up=16, settle=None):
    """(X1) for one single-step decoder step: y with Φ(y) = target per sample, by Anderson on y ← y + g/a
    (a: the surrogate slope per sample). Once every open sample has stalled for `patience` iterations (or half
    of max_iter is spent), plain iteration from the best iterate (where a lower-precision network's output is
    piecewise constant it lands on an exact fixed point); a diverging solve restarts from its best iterate with
    half the step. After the first iteration the step size per sample is the secant's (`_secant_beta`). A solve
    whose best residual has not halved in `give_up` calls ends (Newton–Krylov takes over); settle: a residual a
    stalled sample may end below (a level bound), besides the failure bound. A network in the state's dtype: a
    sample within 4 ulps of its evaluation's largest term (max(|y|_∞, |target|_∞)) that has not halved in two calls,
    the last no better, ends at once (the module docstring). A sample contracting fast (rate < 1/4 per call) takes its
    next iterate without a call when that iterate's predicted residual (residual × rate) is below `_margin` × bound.
    Returns (y, calls, best residual, failure bound) per sample."""
    bound, y, b = ulp_tol(target, tol), guess, target.shape[0]
    fail, acc = 256 * bound, Anderson(memory, (1.0 / a).clamp(0.5, 1e6))
    done, stall = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.long)
    best_r = torch.full((b,), float("inf"), dtype=torch.float64)
    best_y = y.clone()
    ref, slow = best_r.clone(), torch.zeros(b, dtype=torch.long)  # iterations since the best residual last halved
    iters, polish, prev = 0, False, None
    while True:
        phi = run_step(field, m, y if pre is None else pre(y), s, s_next)[0]
        g = target - phi
        res = maxabs(g)
        if floor_eps and iters == 0:  # the network's own precision bounds what the step can resolve
            fail = fail + 32 * floor_eps * maxabs(phi - y)
        if iters == 0:
            stop = fail if settle is None else fail.clamp_min(settle)
            rnd = 4 * torch.finfo(y.dtype).eps * torch.maximum(maxabs(y), maxabs(target))
        better = (res < best_r) & ~done
        best_r = torch.where(better, res, best_r)
        best_y = torch.where(bmask(better, y), y, best_y)
        stall = torch.where(better, torch.zeros_like(stall), stall + 1)
        ref, slow = halving(best_r, ref, slow)
        done = done | (best_r <= bound) | (polish & (stall >= patience) & (best_r <= stop))
        if not floor_eps:  # at the evaluation's own round-off (4 ulps of its largest term) and fluctuating there
            done = done | ((slow >= 2) & (stall >= 1) & (best_r <= torch.minimum(stop, rnd)))
        iters += 1
        if bool(done.all()) or iters > max_iter or bool((slow[~done] >= give_up).all()):
            break  # not converging (no halving in give_up calls): Newton–Krylov takes over (`fallback`)
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
        y = torch.where(bmask(done, y), best_y, acc.next(y, g))  # converged samples keep their solution
        if acc.dy:  # the step's own secant slope per sample replaces the surrogate's from now on
            acc.beta = _secant_beta(acc.dy[-1], acc.dg[-1], beta)
        if prev is not None and not polish:  # contracting fast: take the next iterate without its own call
            rate = res / prev.clamp_min(1e-300)
            take = ~done & better & (rate < 0.25) & (res * rate <= bound * _margin(y.dtype))
            best_y = torch.where(bmask(take, y), y, best_y)
            best_r = torch.where(take, res * rate, best_r)
            done = done | take
            if bool(done.all()):
                break
        prev = res
    return best_y, iters, best_r, fail


def _margin(dtype: torch.dtype) -> float:
    """The share of a step's bound that a predicted (uncalled) iterate's residual must be under: 1/2 in float32, 1/4
    in float64, whose round trips (target 1e-24) keep the wider margin (benchmarks/INVERSION.md)."""
    return 0.5 if torch.finfo(dtype).bits <= 32 else 0.25


def _secant_beta(dy: Tensor, dg: Tensor, beta: Tensor) -> Tensor:
    """1/a per sample, a = <ΔΦ, Δy>/|Δy|² = −<Δg, Δy>/|Δy|² the Rayleigh quotient of ∂Φ/∂y along the last step
    (a network whose ε does not scale like the Gaussian surrogate's, e.g. random weights, is far from a_i);
    clamped to [1/4, 4]× the current value and [0.5, 1e6] (a sample without a usable secant keeps it)."""
    den = (dy * dy).sum(1)
    a = (-(dg * dy).sum(1) / den.clamp_min(1e-300)).cpu()
    new = torch.where((den.cpu() > 0) & (a > 0), 1.0 / a.clamp_min(1e-300), beta)
    return torch.minimum(torch.maximum(new, beta / 4), beta * 4).clamp(0.5, 1e6)


def _guess(xs: dict[int, Tensor], sigmas: Tensor, i: int) -> Tensor:
    """Warm start for x̄_i: the slope of the solved steps above, extrapolated linearly in log σ (in σ where the
    window reaches σ = 0), from the midpoints of the two intervals above (a constant slope with one solved step,
    x̄_{i+1} itself with none). log σ: a network's ε varies smoothly in its time input, which grids and schedules
    space roughly in log σ; linear in σ extrapolates far beyond the data on grids that widen fast (such a step
    takes the constant slope)."""
    if i + 2 not in xs:
        return xs[i + 1].clone()
    sg = [float(sigmas[k]) for k in range(i, min(i + 4, len(sigmas)))]
    v1 = (xs[i + 2] - xs[i + 1]) / (sg[2] - sg[1])
    if i + 3 in xs:
        v2 = (xs[i + 3] - xs[i + 2]) / (sg[3] - sg[2])
        logs = min(sg) > 0
        u, reach = ([math.log(v) for v in sg], 2.0) if logs else (sg, 1.0)
        m0, m1, m2 = (u[0] + u[1]) / 2, (u[1] + u[2]) / 2, (u[2] + u[3]) / 2
        w = (m0 - m1) / (m1 - m2)
        if w <= reach:  # beyond that multiple of the last interval's length: constant slope
            v1 = v1 + w * (v1 - v2)
    return xs[i + 1] - (sg[1] - sg[0]) * v1


def fallback(field, m, target, y, r, fail, bad, s, s_next, tol, max_iter, pre=None, level=None):
    """Newton–Krylov on the step for the samples whose Anderson solve failed (the others count as converged:
    never moved, still evaluated); a sample below the failure bound whose residual stops halving for two Newton
    steps has stalled at round-off and ends there (the Anderson solve's rule), one whose residual has not halved in
    four is not converging (a step map that folds: Newton's own rate would halve it every step near a regular
    root). With a level bound (`backward`'s), a sample below it that stops halving for two Newton steps ends there
    too and the step is accepted at the level: a round-off root further on is not searched for (fewer calls, and
    fewer latents exact to round-off rather than to the levels: benchmarks/GUIDANCE.md). Returns (y, r, calls,
    record)."""
    inf = torch.full_like(r, float("inf"))
    settle = fail if level is None else fail.clamp_min(level)
    nk = newton_krylov(lambda v: run_step(field, m, v if pre is None else pre(v), s, s_next)[0], target, y,
                       torch.where(bad, ulp_tol(target, tol), inf), torch.where(bad, settle, inf),
                       max_iter=min(max_iter, 20), patience=2, give_up=4)
    better = bad & (nk.res < r)
    y = torch.where(bmask(better, y), nk.z, y)
    r = torch.where(better, nk.res, r)
    return y, r, nk.evals, {"samples": bad.nonzero()[:, 0].tolist(), "newton_iterations": int(nk.iterations.max()),
                            "calls": nk.evals, "residual": float(nk.res[bad].max()),
                            "converged": bool((nk.res[bad] <= fail[bad]).all())}


def resolution(field, m, y: Tensor, s: Tensor, s_next: Tensor, pre=None) -> Tensor:
    """The step's own round-off floor per sample: |Φ(y') − Φ(y)|_∞ with y' = y moved by one ulp of its dtype
    (alternating signs), what no solve in that dtype can go below (two calls of the step)."""
    sign = torch.ones_like(y).reshape(len(y), -1)
    sign[:, 1::2] = -1
    y1 = torch.nextafter(y, torch.where(sign.reshape(y.shape) > 0, torch.inf, -torch.inf).to(y))
    ys = torch.cat([y1, y]) if pre is None else torch.cat([pre(y1), pre(y)])
    out = run_step(field, m, ys, s, s_next)[0]
    return maxabs(out[:len(y)] - out[len(y):])


def _step_error(m, sigmas, i, n, r, b, how, floor):
    j = int(torch.argmax(r / b))
    return InversionError(
        f"encode_exact: the {m.name} step σ = {float(sigmas[i]):.6g} → {float(sigmas[i + 1]):.6g} (step {i} of {n}) "
        f"did not converge ({how}): residual {float(r[j]):.3e} > tolerance {float(b[j]):.3e} (sample {j}; the step's "
        f"own round-off floor there is {float(floor[j]):.1e}, so this is not round-off: the step map is hard to invert "
        f"there); the latent would not be exact; {_hint(i, n)}")


def _hint(i: int, n: int) -> str:
    """What to try, naming the step: the first decoder step (σ_max, the largest in σ on most grids) or the last."""
    if i == 0 and n > 1:
        return "try more steps (a shorter first step from σ_max) or a float64 state and network"
    return HINT


def _settle(field, m, target, guess, s, s_next, a, tol, max_iter, memory, feps, pre, level):
    """One step of (X1), cheapest first: Anderson (handing over once it stops halving), Newton–Krylov on the
    samples it left; only where the step would still be refused (above its bound, or above the level with one),
    Anderson again from the warm start with its whole budget and no hand-over (a solve whose residual first grows,
    then restarts with half the step, needs more than the hand-over allows), then Newton–Krylov once more from the
    best iterate of all. Returns (y, calls, residual, failure bound, fallback records)."""
    y, k, r, b = _solve_step(field, m, target, guess, s, s_next, a, tol, max_iter, memory, floor_eps=feps, pre=pre)
    records = []
    for again in (False, True):
        bad = r > b
        if bad.any():  # Anderson stalled or diverged: Newton–Krylov on those samples
            y, r, kk, fb = fallback(field, m, target, y, r, b, bad, s, s_next, tol, max_iter, pre, level)
            records.append(fb)
            k += kk
        short = r > (b if level is None else b.clamp_min(level))  # what the step would still be refused with
        if again or not short.any():
            break
        y2, k2, r2, _ = _solve_step(field, m, target, guess, s, s_next, a, tol, max_iter, memory, floor_eps=feps,
                                    pre=pre, give_up=max_iter + 1, settle=level)
        y, r, k = torch.where(bmask(r2 < r, y), y2, y), torch.minimum(r, r2), k + k2
    return y, k, r, b, records


def _one_at_a_time(field, m, target, guess, s, s_next, a, tol, max_iter, memory, feps, pre, level, y, r, b):
    """The samples a batched step left above its bound, solved again alone (`_settle` on batches of one): a sample
    whose step nearly folds can need more calls than the batched solve allows it (digits, 10 steps, the first
    step: benchmarks/DESIGN.md). Each alone-solution is checked in the batch, as the decoder will run it (a float32
    network may round differently there), and kept where its residual there is the lower. Returns (y, r, calls,
    record)."""
    limit = b if level is None else b.clamp_min(level)
    redo = (r > limit).nonzero()[:, 0].tolist()
    alone, calls = y.clone(), 0
    for j in redo:
        sl = slice(j, j + 1)
        alone[sl], kj = _settle(field, m, target[sl], guess[sl], s, s_next, a[sl], tol, max_iter, memory, feps, pre,
                                level)[:2]
        calls += kj
    new = maxabs(target - run_step(field, m, alone if pre is None else pre(alone), s, s_next)[0])  # in the batch
    keep = (new < r) & (r > limit)
    y, r = torch.where(bmask(keep, y), alone, y), torch.where(keep, new, r)
    return y, r, calls + 1, {"one_at_a_time": redo, "calls": calls + 1, "residual": float(r[redo].max()),
                             "converged": bool((r[redo] <= limit[redo]).all())}


def backward(field, m, x_end, sigmas, s2, tol, max_iter, memory, keep, level=None):
    """Backward substitution of (X1) from x̄_N = x_end, one step at a time. Returns (x̄_0, trajectory or None,
    per-step calls, residuals, bounds, fallback records, level steps), per-step lists indexed by decoder step (σ_0
    first). level: a residual bound a step that neither solver resolves may still end below (`encode_exact`'s
    `quantum`), else None; such steps are listed as {"step", "residual"} records."""
    n = len(sigmas) - 1
    slopes = surrogate_slopes(m, sigmas, s2)
    xs = {n: x_end}
    calls, res, bounds, fallbacks, coarse = [0] * n, [0.0] * n, [0.0] * n, [], []
    feps = model_eps(field, x_end.dtype)
    for i in range(n - 1, -1, -1):
        # step 0 sees x̄_0 as the decoder will, through the stored (rounded) latent x_T = x̄_0/sqrt(1+σ_0²)
        pre = (lambda v: scale_in(scale_out(v, sigmas[0]), sigmas[0])) if i == 0 else None
        guess = _guess(xs, sigmas, i)
        y, k, r, b, fbs = _settle(field, m, xs[i + 1], guess, sigmas[i], sigmas[i + 1], slopes[i], tol, max_iter,
                                  memory, feps, pre, level)
        fallbacks += [{"step": i, **fb} for fb in fbs]
        if bool((r > (b if level is None else b.clamp_min(level))).any()) and len(y) > 1:
            y, r, kk, rec = _one_at_a_time(field, m, xs[i + 1], guess, sigmas[i], sigmas[i + 1], slopes[i], tol,
                                           max_iter, memory, feps, pre, level, y, r, b)
            k += kk
            fallbacks.append({"step": i, **rec})
        bad = r > b
        if bad.any() and level is not None:  # below the data's own level is enough there: verified at the end
            bad = r > b.clamp_min(level)
            if not bad.any():
                coarse.append({"step": i, "residual": float(r.max())})
        if bad.any():
            alone = ", then alone" if len(y) > 1 else ""
            raise _step_error(m, sigmas, i, n, r, b if level is None else b.clamp_min(level),
                              f"{k} calls of the step, Anderson then Newton–Krylov{alone}",
                              resolution(field, m, y, sigmas[i], sigmas[i + 1], pre))
        xs[i] = y
        if not keep:
            xs.pop(i + 3, None)
        calls[i], res[i], bounds[i] = k, float(r.max()), float(b.max())
    traj = [xs[i] for i in range(n + 1)] if keep else None
    return xs[0], traj, calls, res, bounds, fallbacks, coarse
