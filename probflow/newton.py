"""Matrix-free solvers of fn(z) = target per sample of a batch: Anderson acceleration and Newton–Krylov.

`fn` maps a batch (B, *S) to a batch (B, *S) sample by sample (a decoder step, or a whole decoder). Both solvers
use only calls of `fn` (no autograd of any kind: no forward-mode tangents, no backward pass), so they work on any
`nn.Module` that runs forward, and keep O(k·B·D) numbers (k a small memory, D = prod(S)), never a D×D matrix.
Every sample is solved on its own (its own mixing coefficients, Krylov basis, step and stopping test), so a
sample's iterates do not depend on the rest of the batch; `fn` is always called on the whole batch (a network's
float32 rounding can depend on the batch it runs in, and the latent must be exact for that batch).

`Anderson`: type-II Anderson acceleration (Walker & Ni 2011) of a preconditioned fixed-point map y ← y + g(y),
memory m, mixing coefficients by a regularized least-squares problem per sample:

    y⁺ = y + β g − (ΔY + β ΔG) γ,    γ = argmin_γ |g − ΔG γ|₂,                                           (A1)

with ΔY, ΔG the last m differences of iterates and preconditioned residuals. On a linear map it is a Krylov method
equivalent to GMRES on the preconditioned system, with one call of fn per iteration.

`newton_krylov`: inexact Newton per sample, δ from GMRES(k) on J δ = −r, J v by a forward difference of fn,

    J v ≈ (fn(z + h v) − fn(z)) / h,    h = sqrt(eps)·max(1, |z|_∞)   (|v|₂ = 1),                        (A2)

one call of fn per Krylov vector, then a backtracking step (the full step, halved while |r|₂ does not fall).
Used where the Anderson iteration of a step stalls or diverges, and for the shooting polish of a decoder chain
(`probflow.inversion`, docs/MATH.md §9).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Anderson", "NewtonResult", "newton_krylov"]


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


class Anderson:
    """(A1) per sample over the flattened state, in float64; `next(y, g)` returns the next iterate in y's dtype.
    `beta`: the step of the unaccelerated map (a scalar or a per-sample tensor (B,))."""

    def __init__(self, memory: int, beta: float | Tensor = 1.0) -> None:
        self.m, self.beta = memory, beta
        self.dy: list[Tensor] = []
        self.dg: list[Tensor] = []
        self.y_prev: Tensor | None = None
        self.g_prev: Tensor | None = None

    def _beta(self, like: Tensor) -> Tensor | float:
        if isinstance(self.beta, Tensor):
            return self.beta.to(like).reshape(-1, 1)
        return self.beta

    def next(self, y: Tensor, g: Tensor) -> Tensor:
        yf, gf = _flat(y).double(), _flat(g).double()
        beta = self._beta(yf)
        if self.y_prev is not None and self.m > 0:
            self.dy.append(yf - self.y_prev)
            self.dg.append(gf - self.g_prev)
            self.dy, self.dg = self.dy[-self.m:], self.dg[-self.m:]
        self.y_prev, self.g_prev = yf, gf
        if not self.dy:
            return (yf + beta * gf).to(y.dtype).reshape(y.shape)
        dg = torch.stack(self.dg, -1)  # (B, D, k)
        a = dg.transpose(1, 2) @ dg
        reg = 1e-14 * a.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)[:, None, None]
        gamma = torch.linalg.solve(a + reg * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device),
                                   dg.transpose(1, 2) @ gf[..., None])[..., 0]  # (B, k)
        out = yf + beta * gf
        for j in range(len(self.dy)):  # no (B, D, k) copy of ΔY + βΔG: one column at a time
            out -= gamma[:, j:j + 1] * (self.dy[j] + beta * self.dg[j])
        return out.to(y.dtype).reshape(y.shape)


class NewtonResult:
    """z (best iterate per sample), res (its |fn(z) − target|_∞ per sample), done (per sample), iterations (Newton
    steps per sample), evals (calls of fn, Krylov products included; the same for every sample: fn runs on the
    whole batch), history (largest open residual after each Newton step)."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _gmres(jv: Callable[[Tensor], Tensor], b: Tensor, krylov: int, rtol: float) -> tuple[Tensor, int]:
    """GMRES(krylov) from 0 on J δ = b per sample (rows of b), modified Gram–Schmidt; stops when every sample's
    least-squares residual is below rtol·|b|₂. Returns (δ, products used)."""
    n = b.shape[0]
    beta = b.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    vs = [b / beta[:, None]]
    h = torch.zeros(n, krylov + 1, krylov, dtype=torch.float64, device=b.device)
    y = torch.zeros(n, 0, dtype=torch.float64, device=b.device)
    k = 0
    for k in range(1, krylov + 1):
        w = jv(vs[-1])
        for j, v in enumerate(vs):
            h[:, j, k - 1] = (w * v).sum(1)
            w = w - h[:, j, k - 1, None] * v
        h[:, k, k - 1] = w.norm(dim=1)
        vs.append(w / h[:, k, k - 1].clamp_min(torch.finfo(torch.float64).tiny)[:, None])
        e1 = torch.zeros(n, k + 1, 1, dtype=torch.float64, device=b.device)
        e1[:, 0, 0] = beta
        y = torch.linalg.lstsq(h[:, :k + 1, :k], e1).solution[..., 0]
        res = (e1[..., 0] - (h[:, :k + 1, :k] @ y[..., None])[..., 0]).norm(dim=1)
        if bool((res <= rtol * beta).all()):
            break
    return sum(y[:, j:j + 1] * vs[j] for j in range(k)), k


def newton_krylov(fn: Callable[[Tensor], Tensor], target: Tensor, z0: Tensor, bound: Tensor, stall_bound: Tensor, *,
                  max_iter: int = 20, krylov: int = 10, rtol: float = 1e-3, r0: Tensor | None = None,
                  patience: int | None = None, give_up: int | None = None, rms: bool = False) -> NewtonResult:
    """Solve fn(z) = target per sample from z0 by inexact Newton (module docstring, (A2)).

    bound, stall_bound: per-sample tensors (B,) of the accepted |residual|_∞ (converged; stalled at round-off: a
    Newton step whose backtracking finds no decrease ends the sample, done if below stall_bound). krylov: GMRES
    vectors per Newton step (one call of fn each); rtol: GMRES's relative residual. patience: if set, a sample
    already below stall_bound whose residual has not halved in that many Newton steps has stalled at round-off
    too (ends, done). give_up: if set, a sample whose residual has not halved in that many Newton steps is not
    converging (ends, not done unless below stall_bound). rms: residuals (and the bounds) are per-sample RMS instead
    of max norms. Samples already within bound are not moved."""
    bound, stall_bound = bound.double().cpu(), stall_bound.double().cpu()
    z = z0.detach().clone()
    evals = 0
    with torch.no_grad():
        if r0 is None:
            r0 = fn(z) - target
            evals += 1
        r = _flat(r0).double()
        res, norm = _size(r, rms), r.norm(dim=1).cpu()
        done = res <= bound
        stuck = torch.zeros_like(done)
        iters = torch.zeros(z.shape[0], dtype=torch.long)
        mark, slow = res.clone(), torch.zeros_like(iters)  # the residual at the last halving, steps since
        history: list[float] = []
        eps = torch.finfo(z.dtype).eps
        for _ in range(max_iter):
            open_ = ~(done | stuck)
            if not bool(open_.any()):
                break
            hstep = (eps ** 0.5) * _flat(z).abs().amax(1).clamp_min(1.0).double()
            jv = _fd_jvp(fn, z, _flat(target).double() + r, hstep, open_.to(z.device))
            delta, used = _gmres(jv, torch.where(open_.to(r.device)[:, None], -r, 0.0), krylov, rtol)
            evals += used
            iters += open_.long()
            z, r, res, norm, ok, e = _backtrack(fn, target, z, delta, r, res, norm, open_, rms)
            evals += e
            done |= res <= bound
            stuck |= open_ & ~ok & ~done
            halved = res <= mark / 2
            mark, slow = torch.where(halved, res, mark), torch.where(halved, 0, slow + open_.long())
            if patience is not None:
                stuck |= open_ & ~done & (slow >= patience) & (res <= stall_bound)
            if give_up is not None:
                stuck |= open_ & ~done & (slow >= give_up)
            history.append(float(res[open_].max()))
    settled = done | (stuck & (res <= stall_bound))
    return NewtonResult(z=z, res=res, done=settled, iterations=iters, evals=evals, history=history)


def _fd_jvp(fn, z: Tensor, base: Tensor, hstep: Tensor, mask: Tensor):
    """v ↦ J v by (A2) for the samples in mask (0 elsewhere); base = fn(z) flattened in float64 (the residual
    plus the target: no extra call)."""
    def jv(v: Tensor) -> Tensor:
        zt = torch.where(_bmask(mask, z), z + (hstep[:, None] * v).to(z.dtype).reshape(z.shape), z)
        dz = _flat(zt).double() - _flat(z).double()  # the step z actually took, after rounding
        scale = (dz * v).sum(1)  # ≈ h (|v|₂ = 1)
        ok = mask & (scale > 0)
        out = (_flat(fn(zt)).double() - base) / torch.where(ok, scale, 1.0)[:, None]
        return torch.where(ok[:, None], out, 0.0)
    return jv


def _bmask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def _size(r: Tensor, rms: bool) -> Tensor:
    """Per-sample size of flattened residuals: RMS or max norm."""
    return (r.pow(2).mean(1).sqrt() if rms else r.abs().amax(1)).cpu()


def _backtrack(fn, target, z, delta, r, res, norm, open_, rms: bool = False, tries: int = 4):
    """z + t δ for t = 1, 1/2, … (tries): per sample the first t that lowers |r|₂ is taken. Returns the new
    (z, r, res, norm), which samples moved, and the calls of fn made."""
    moved = torch.zeros_like(open_)
    evals = 0
    t = 1.0
    for _ in range(tries):
        want = open_ & ~moved
        if not bool(want.any()):
            break
        m = want.to(z.device)
        zt = torch.where(m.reshape(-1, *([1] * (z.ndim - 1))), z + (t * delta).to(z.dtype).reshape(z.shape), z)
        rt = _flat(fn(zt) - target).double()
        evals += 1
        nt = rt.norm(dim=1).cpu()
        ok = want & (nt < norm)
        okd = ok.to(z.device)
        z = torch.where(okd.reshape(-1, *([1] * (z.ndim - 1))), zt, z)
        r = torch.where(okd[:, None], rt, r)
        res = torch.where(ok, _size(rt, rms), res)
        norm = torch.where(ok, nt, norm)
        moved |= ok
        t /= 2
    return z, r, res, norm, moved, evals
