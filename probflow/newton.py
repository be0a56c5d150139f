"""Newton's method per sample for a batched map: solve fn(z) = target for every sample of a batch.

`fn` maps a batch (B, *S) to a batch (B, *S) sample by sample (a decoder: the whole trajectory, or one step);
`probflow.inversion` uses it for the trajectory-level inversion of multistep decoders (shooting on x_T) and as
the fallback of the per-step solve. Each sample is solved on its own: its Jacobian, its steps, its
damping and its stopping test depend on it alone, so its result does not depend on the rest of the batch.

Jacobian: dense, per sample, D = prod(S) columns, built from D tangents in batched calls of `fn`
(forward-mode AD through `torch.autograd.forward_ad`, one dual call per chunk of the batch repeated D times;
checked against a central difference along one direction per sample (2 calls); when
fn does not carry tangents or the check fails, central differences with h = eps^(1/3)·max(1, |z|_∞)). Why dense rather
than matrix-free GMRES: on the digits network the Jacobian of a 20-step decoder has eigenvalues of modulus
0.009 … 1.4 (condition ~150, measured), so unpreconditioned GMRES needs close to D Krylov vectors (one
decode each) for every Newton step, while the dense Jacobian costs D tangents once and is then kept up to
date by Broyden's rank-one updates from the residuals Newton evaluates anyway (no model calls). A fresh
Jacobian is built only for a sample whose damped steps keep failing, or whose accepted steps crawl (8 in a row
that do not halve |r|₂: a Broyden-updated Jacobian can lose the fast directions and creep).
Dense is limited to D ≤ `dense_max` (memory B·D², cost D decodes); larger states are refused with a ValueError naming D.

Every residual is evaluated on the whole batch, converged samples included (so a network whose float32
rounding depends on the batch is solved for the batch it will be decoded in; the Jacobians' tangent calls are
per open sample). Iteration: δ = −J⁻¹ r (Newton), and after a rejected step the Levenberg–Marquardt step
δ = −(JᵀJ + μ·max diag(JᵀJ)·I)⁻¹ Jᵀ r with μ = 1e-6, ×8 per rejection, ÷4 per accepted step (back to Newton
below 1e-12); a sample takes z + δ when its residual norm falls. A Broyden-updated Jacobian damped past
μ = 1e-2 is rebuilt at the iterate (μ = 0 again); a fresh one is damped further. Done when |r|_∞ ≤ bound, or when the
Newton and the first damped step were both rejected while |r|_∞ ≤ stall_bound (stalled at round-off) and the
Jacobian is fresh (else a fresh one first; a Broyden-updated Jacobian stalled a float32 digits solve at 119×
the bound, a fresh one went on to 2.8×). A sample above the stall bound is given up (returned not done) after
16 rejections in a row with a fresh Jacobian (μ ≈ 4e6), or after 2·max_jacobians Jacobians.

Why damping rather than shorter Newton steps: on the digits network (50 dpmpp_2m steps, held-out test image 1)
the decoder's Jacobian spans singular values 0.004 … 33 and curves within 3e-3 of the iterate; Newton steps
shortened along their own direction gained ~10 % each (40 iterations, 8 Jacobians: residual 2.7e-3 → 1.6e-3,
then given up), damped steps reached 4.8e-7 in 44 iterations with 2 Jacobians.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

__all__ = ["jacobian", "newton_solve", "NewtonResult"]

_MAX_REJECTIONS = 16  # from a fresh Jacobian: Newton, then damping μ = 1e-6 … 8¹⁴·1e-6 ≈ 4e6; then the sample is stuck
_MAX_SLOW = 8  # accepted steps in a row that do not halve |r|₂ before a Broyden-updated Jacobian is rebuilt


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _jacobian_ad(fn: Callable[[Tensor], Tensor], zz: Tensor, tangents: Tensor) -> Tensor | None:
    with fwad.dual_level():
        out = fn(fwad.make_dual(zz, tangents))
        _, t = fwad.unpack_dual(out)
    return None if t is None else t.detach()


def jacobian(fn: Callable[[Tensor], Tensor], z: Tensor, chunk: int = 1024) -> tuple[Tensor, str]:
    """Dense per-sample Jacobians J[b] = ∂fn(z)[b]/∂z[b], shape (B, D, D), and how they were built ("ad" or
    "fd"). The batch is repeated D times (sample b's copies at rows b·D … b·D + D − 1), `chunk` rows a call."""
    b, d = z.shape[0], z[0].numel()
    zz = z.detach().repeat_interleave(d, 0)
    eye = torch.eye(d, dtype=z.dtype, device=z.device).repeat(b, 1).reshape(zz.shape)
    cols = []
    for a in range(0, b * d, chunk):
        t = _jacobian_ad(fn, zz[a:a + chunk], eye[a:a + chunk])
        if t is None or (a == 0 and not bool(t.abs().amax() > 0)):  # fn does not carry tangents
            return _jacobian_fd(fn, z, chunk), "fd"
        cols.append(_flat(t))
    j = torch.cat(cols).reshape(b, d, d).transpose(1, 2)
    if not _agrees_with_fd(fn, z, j):  # a model that drops tangents part of the way (numpy, detach) is caught
        return _jacobian_fd(fn, z, chunk), "fd"
    return j, "ad"


def _agrees_with_fd(fn: Callable[[Tensor], Tensor], z: Tensor, j: Tensor) -> bool:
    """J·v against a central difference along one fixed direction v per sample (2 calls of fn)."""
    v = torch.ones_like(z) / z[0].numel() ** 0.5
    h = torch.finfo(z.dtype).eps ** (1 / 3) * _flat(z).abs().amax(1).clamp_min(1.0).reshape(-1, *([1] * (z.ndim - 1)))
    with torch.no_grad():
        fd = _flat(fn(z + h * v) - fn(z - h * v)) / (2 * _flat(h))
    jv = (j @ _flat(v)[..., None])[..., 0]
    err = (fd - jv).norm(dim=1) / jv.norm(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
    return bool((err <= 1e-2).all())


def _jacobian_fd(fn: Callable[[Tensor], Tensor], z: Tensor, chunk: int) -> Tensor:
    b, d = z.shape[0], z[0].numel()
    h = torch.finfo(z.dtype).eps ** (1 / 3) * _flat(z).abs().amax(1).clamp_min(1.0)  # per sample
    zz = z.detach().repeat_interleave(d, 0)
    hh = h.repeat_interleave(d).reshape(-1, *([1] * (z.ndim - 1)))
    eye = torch.eye(d, dtype=z.dtype, device=z.device).repeat(b, 1).reshape(zz.shape) * hh
    cols = []
    with torch.no_grad():
        for a in range(0, b * d, chunk):
            up, dn = fn(zz[a:a + chunk] + eye[a:a + chunk]), fn(zz[a:a + chunk] - eye[a:a + chunk])
            cols.append(_flat(up - dn) / (2 * hh[a:a + chunk].reshape(-1, 1)))
    return torch.cat(cols).reshape(b, d, d).transpose(1, 2)


class NewtonResult:
    """z (the best iterate per sample), res (its |fn(z) − target|_∞ per sample), done (per sample), iterations
    (Newton steps taken per sample), jacobians (Jacobians built per sample), evals (calls of fn per sample, the
    Jacobians' D tangents not included), how ("ad"/"fd"), history (max residual over open samples per step)."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _solve(j: Tensor, r: Tensor, mu: Tensor) -> Tensor:
    """δ per sample, in float64: Newton's −J⁻¹ r where mu = 0 (least squares where J is singular), else the
    Levenberg–Marquardt step −(JᵀJ + mu·max diag(JᵀJ)·I)⁻¹ Jᵀ r."""
    jd, rd = j.double(), r.double()[..., None]
    out = torch.zeros_like(rd[..., 0])
    lm = mu > 0
    nw = ~lm  # only the undamped samples: a singular J elsewhere must not send them to least squares
    if bool(nw.any()):
        try:
            out[nw] = -torch.linalg.solve(jd[nw], rd[nw])[..., 0]
        except RuntimeError:
            out[nw] = -torch.linalg.lstsq(jd[nw], rd[nw]).solution[..., 0]
    if bool(lm.any()):
        jl = jd[lm]
        a = jl.transpose(1, 2) @ jl
        scale = a.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(torch.float64).tiny)  # J = 0: δ = 0
        damp = (mu[lm].double().to(a.device) * scale)[:, None, None]
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        out[lm] = -torch.linalg.solve(a + damp * eye, jl.transpose(1, 2) @ rd[lm])[..., 0]
    return out


def _broyden(j: Tensor, dz: Tensor, dr: Tensor) -> Tensor:
    """Good Broyden, per sample: J + (Δr − J Δz) Δzᵀ / (Δzᵀ Δz)."""
    den = (dz * dz).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    u = dr - (j @ dz[..., None])[..., 0]
    return j + u[..., None] * dz[:, None, :] / den[:, None, None]


def _rebuild(fn, z: Tensor, idx: Tensor, chunk: int, jac: Tensor, jacs: Tensor, fresh_j: Tensor,
             reset: tuple[Tensor, ...]) -> str:
    """A fresh Jacobian at the current iterate of samples idx (in place); their damping and counters restart."""
    j, how = jacobian(fn, z[idx], chunk)
    jac[idx] = j.double()
    jacs[idx] += 1
    fresh_j[idx] = True
    for t in reset:
        t[idx] = 0
    return how


def newton_solve(fn: Callable[[Tensor], Tensor], target: Tensor, z0: Tensor, bound: Tensor, stall_bound: Tensor, *,
                 max_iter: int = 30, dense_max: int = 4096, chunk: int = 1024, r0: Tensor | None = None,
                 jac: Tensor | None = None, max_jacobians: int = 4) -> NewtonResult:
    """Solve fn(z) = target per sample from z0 (module docstring). bound, stall_bound: per-sample tensors (B,)
    of the accepted |residual|_∞ (converged; stalled at round-off). r0: fn(z0) − target when already known.
    max_jacobians: Jacobians built per sample before a stall above 8× the bound is accepted."""
    b, d = z0.shape[0], z0[0].numel()
    if d > dense_max:
        raise ValueError(f"z: the Newton solve builds dense per-sample Jacobians and is limited to {dense_max} numbers "
                         f"per sample (dense_max); got {d}")
    bound, stall_bound = bound.double().cpu(), stall_bound.double().cpu()
    z = z0.detach().clone()
    evals = torch.zeros(b, dtype=torch.long)
    with torch.no_grad():
        if r0 is None:
            r0 = fn(z) - target
            evals += 1
    r = _flat(r0).double()
    res = r.abs().amax(1).cpu()
    norm = r.norm(dim=1).cpu()
    done = res <= bound
    jacs = torch.zeros(b, dtype=torch.long)
    how = "given"
    fresh_j = torch.zeros(b, dtype=torch.bool)  # the Jacobian was built at the current iterate
    if jac is None:
        jac = torch.zeros(b, d, d, dtype=torch.float64, device=z.device)
        if not bool(done.all()):
            how = _rebuild(fn, z, (~done).nonzero()[:, 0], chunk, jac, jacs, fresh_j, ())
    iters = torch.zeros(b, dtype=torch.long)
    fails = torch.zeros(b, dtype=torch.long)
    mu = torch.zeros(b, dtype=torch.float64)  # Levenberg–Marquardt damping per sample (0: the Newton step)
    slow = torch.zeros(b, dtype=torch.long)  # accepted steps in a row that did not halve |r|₂
    history: list[float] = []
    stuck_all = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        open_ = ~done
        dz = _solve(jac[open_], r[open_], mu[open_])
        zt = z[open_] + dz.to(z.dtype).reshape(z[open_].shape)
        zfull = z.clone()
        zfull[open_] = zt
        with torch.no_grad():  # the whole batch, as it will be decoded (a network's rounding can depend on it)
            rt = _flat(fn(zfull) - target).double()[open_]
        evals += 1
        iters[open_] += 1
        rest, nt = rt.abs().amax(1).cpu(), rt.norm(dim=1).cpu()
        ok = (nt < norm[open_]) | (rest <= bound[open_])
        idx = open_.nonzero()[:, 0]
        acc, rej = idx[ok], idx[~ok]
        if len(acc):
            slow[acc] = torch.where(nt[ok] <= norm[acc] / 2, 0, slow[acc] + 1)
            jac[acc] = _broyden(jac[acc], zt[ok].reshape(len(acc), -1).double() - _flat(z[acc]).double(),
                                rt[ok] - r[acc])
            z[acc] = zt[ok]
            r[acc] = rt[ok]
            res[acc], norm[acc] = rest[ok], nt[ok]
            mu[acc] = torch.where(mu[acc] > 4e-12, mu[acc] / 4, 0.0)
            fails[acc] = 0
        fails[rej] += 1
        fresh_j[acc] = False
        # stalled at round-off: the Newton step and the first damped one both rejected, below the stall bound, with a
        # Jacobian built at this iterate (a Broyden-updated one can be what stalls), or within 8× the bound, or
        # after max_jacobians
        settled = fresh_j | (res <= 8 * bound) | (jacs >= max_jacobians)
        done = done | (res <= bound) | ((fails >= 2) & (res <= stall_bound) & settled)
        # stuck: with a fresh Jacobian a damped step tends to a short gradient step of |r|², which lowers it unless
        # round-off rules; none did up to μ ≈ 4e6 — or the sample needed 2·max_jacobians Jacobians
        stuck = ~done & (res > stall_bound) & ((fresh_j & (fails >= _MAX_REJECTIONS)) | (jacs > 2 * max_jacobians))
        stuck_all |= stuck
        done = done | stuck
        rej = rej[~done[rej]]
        # damping rather than shorter Newton steps: see the module docstring (digits, 50 dpmpp_2m steps, image 1)
        mu[rej] = torch.clamp(mu[rej] * 8, min=1e-6)
        # a Broyden-updated Jacobian damped to μ > 1e-2 (5 rejections; a decode each, against D tangent decodes for
        # a Jacobian): a new one at the current iterate, the Newton step again (a fresh one at the same iterate
        # would give the same steps: those samples are damped further instead)
        fresh = rej[(mu[rej] > 1e-2) & ~fresh_j[rej]]
        # a Broyden-updated Jacobian whose accepted steps crawl (digits, 50 unipc_3 steps, float64: 100 accepted
        # steps on one Jacobian ended at 2.4e-6) is rebuilt too
        crawl = (~done & ~fresh_j & (slow >= _MAX_SLOW) & (res > stall_bound)).nonzero()[:, 0]
        fresh = torch.unique(torch.cat([fresh, crawl]))
        if len(fresh):
            how2 = _rebuild(fn, z, fresh, chunk, jac, jacs, fresh_j, (mu, fails, slow))
            how = how2 if how == "given" else how
        history.append(float(res[open_].max()))
    return NewtonResult(z=z, res=res, done=done & ~stuck_all, iterations=iters, jacobians=jacs, evals=evals, how=how,
                        history=history, dim=d)
