"""The verification of an exact latent: the ordinary decoder from x_T alone, and the shooting polish (docs/MATH.md
§12)."""

from __future__ import annotations

import torch
from torch import Tensor

from probflow.field import DDIMField
from probflow.integrate import integrate, scale_in, scale_out
from probflow.inversion.common import HINT, InversionError, bmask, maxabs, model_eps, ulp_tol
from probflow.newton import newton_krylov
from probflow.solvers import Method

__all__ = ["decoder_x", "verify"]


def decoder_x(field: DDIMField, m: Method, sigmas: Tensor):
    """x_T ↦ x_0 exactly as probflow.decode: x → x̄ at σ_0, integrate, x̄ → x at σ_N."""
    s0, sn = sigmas[0], sigmas[-1]

    def decode_x(z: Tensor) -> Tensor:
        return scale_out(integrate(field, scale_in(z, s0), sigmas, m).x, sn)

    return decode_x


def verify(field, m, x0, xT, sigmas, tol, verify_tol, polish, max_iter, level=None, coarse=False):
    """Decode from x_T alone; samples whose RMS error exceeds 16·max(tol, eps, 1e-13)·max(1, |x_0|_∞), or whose
    max error exceeds verify_tol·max(1, |x_0|_∞) (the chain amplified the steps' residuals), are polished by
    Newton–Krylov on x_T (shooting) until the RMS error is below half that bound, or below the bound and no longer
    halved by a Newton step (the chain's round-off). level: the data's level bound (`encode_exact`'s quantum/4) or
    None: a round trip the polish leaves above the round-off bound but below it is accepted at the level (the
    decoded values still round to x_0's levels); with `coarse` (a step was accepted below the level) it is the bound
    from the start, without a polish (the step map itself is what stops at it).
    Returns (x_T, max |round trip|_∞, polish record or None, whether accepted at the level only); raises
    InversionError when the verified round trip misses its bound."""
    decode_x = decoder_x(field, m, sigmas)
    back = decode_x(xT)
    e = maxabs(back - x0)
    rms = (back - x0).double().reshape(len(x0), -1).pow(2).mean(1).sqrt().cpu()
    lim, rms_lim = ulp_tol(x0, verify_tol), ulp_tol(x0, 16 * max(tol, torch.finfo(x0.dtype).eps, 1e-13))
    miss = (rms > rms_lim) | (e > lim)
    record = None
    if coarse:
        lim, polish = torch.full_like(lim, level), False
    if polish and bool(miss.any()):
        # the polish only has to bring the amplified round-off under the test that sent it there, with room to
        # spare: half the RMS bound (and the max-norm bound, far looser, below), not the step tolerance in max norm;
        # a Newton step that does not halve the RMS once it is below the bound itself has met the chain's own
        # round-off: the polish ends there (above the bound it goes on to its budget)
        bound = rms_lim / 2
        stall = rms_lim + 64 * len(sigmas) * model_eps(field, x0.dtype) * maxabs(x0)
        inf = torch.full_like(bound, float("inf"))
        last: list[Tensor] = []

        def decode_kept(z: Tensor) -> Tensor:  # keeps the polish's last decode (input, output)
            out = decode_x(z)
            last[:] = [z, out]
            return out

        nk = newton_krylov(decode_kept, x0, xT, torch.where(miss, bound, inf), torch.where(miss, stall, inf),
                           max_iter=3, krylov=4, r0=back - x0, rms=True, patience=1)
        better = miss & (nk.res < rms)
        xT = torch.where(bmask(better, xT), nk.z, xT)
        # the verified round trip of the polished latent: the polish's last decode where it ran on this very batch
        # (the decoder is deterministic: the same batch gives the same bytes), else one more decode
        reuse = bool(last) and last[0].shape == xT.shape and torch.equal(last[0], xT)
        e = maxabs((last[1] if reuse else decode_x(xT)) - x0)
        record = {"samples": miss.nonzero()[:, 0].tolist(), "newton_iterations": int(nk.iterations.max()),
                  "decodes": nk.evals + (0 if reuse else 1), "residual_rms": float(nk.res[miss].max())}
    at_level = coarse
    if not bool((e <= lim).all()) and level is not None and bool((e <= level).all()):
        lim, at_level = torch.full_like(lim, level), True  # exact to the levels, not to round-off: said
    if not bool((e <= lim).all()):
        j = int(torch.argmax(e / lim))
        what = "" if not coarse else " (a quarter of the data's quantum, a step having stopped above round-off)"
        raise InversionError(f"encode_exact: the {m.name} decoder from the solved latent misses x_0 by "
                             f"{float(e[j]):.3e} > {float(lim[j]):.3e}{what} (sample {j}; the decoder amplified the "
                             "steps' residuals along its chain beyond the polish, or the model is not deterministic); "
                             f"the latent would not be exact; {HINT}")
    return xT, float(e.max()), record, at_level
