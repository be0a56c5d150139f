"""Round-trip inversion table: per-dimension MSE of decode(encode(x_0)) vs NFE, and the distance of
each encoded latent from the exact ODE latent, on held-out digits and on a Gaussian mixture.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/inversion.py [--model digits|FOLDER] [--n 16] [--force]

For every solver the same grid is used both ways: encode runs Eq. 12 up the flipped sampling grid
(σ: 0 → σ_max, x̄ = x·sqrt(1+σ²), docs/MATH.md §1–2), decode runs it down; reversible methods decode from the
encode's state. Digits: the first n images of the held-out test split (probflow.digits.load_split),
network in float32, state in float64; the MSE is reported on the [0, 1] pixel scale (x/2 + 1/2, i.e. the
[−1, 1] MSE divided by 4), as in the DDIM paper's Table 2. Mixture: 64-D, 8 components
(GaussianMixture.random(64, 8, seed=1)), exact ε, MSE in its own units. Latent distance: per-dimension MSE
between the encoded x_T and scipy's DOP853 (tight tolerances, float64) encoding of the same x_0.

Peer: diffusers' DDIM inversion convention, driven as its inversion pipelines drive it: DDIMInverseScheduler
up (trailing spacing, the model called at the *target* timestep of each upward step with the current sample),
DDIMScheduler down; float64 ᾱ table, clip_sample=False, set_alpha_to_one=True.

Exact latents (`probflow.inversion.encode_exact`): every decoder it inverts (euler, heun2, rk4, dpmpp_2m,
dpmpp_3m, unipc, unipc_3) × 10/20/50 steps × float64/float32 on both cases; float64 digits rows run the network in
float64. `--exact-only` runs only those tables (with the ODE latent they are measured against, the diffusers
interoperability and the robustness tables); `--exact-n`, `--exact-steps`, `--exact-dtypes`, `--exact-methods`
select a subset. The "latent MSE implied" column (20-step rows) builds a dense Jacobian of the 64-D decoder by
central differences
(`_fd_jacobian`, benchmark only; the solver itself never builds one).

Image scale: `--suite image [--sizes 32,64] [--kinds prior+unet,unet] [--methods euler,dpmpp_2m] [--steps 20]
[--dtypes float32] [--n 2] [--json FILE]` prints a markdown table (diffusers UNet2DModels with attention built with
random weights here; see `_ImageEps`; kind `digits32`: the trained class-conditional 1×32×32 model at w = 1 on its
held-out test images as 8-bit PNG pixels, encoded with the CLI's quantum 2/255): round trip, encode ÷ decode model
calls (median and worst image), peak RSS of the encode ÷ sampling the same image (each in a fresh process),
encode ÷ decode wall time, and for digits32 the PNG identity of the decoded images.

Digits, quick: `--suite digits-quick [--images 0,1,2,3] [--cases euler:20:float32,heun2:20:float64] [--max-iter
100]` prints, per (decoder, steps, dtype) on those held-out test images (one batch, quadratic_open grid): encode ÷
decode model calls (solve and verification/polish), round-trip MSE on the [0, 1] scale, the polish record, per-step
iterations.

Writes benchmarks/INVERSION.md and benchmarks/inversion.json (atomically; --force to replace them).

Every table from one run: `--all [--workers 2] [--work DIR] [--force]` runs the digits and mixture tables and the
image-scale cells as subprocesses and writes INVERSION.md from their results (benchmarks/inversion_run.py); the
image-scale code is benchmarks/inversion_images.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import probflow  # noqa: E402
from probflow import grids  # noqa: E402
from probflow.field import DDIMField  # noqa: E402
from probflow.io.atomic import atomic_write, check_writable  # noqa: E402
from probflow.models import GaussianMixture  # noqa: E402
from probflow.solvers import METHODS, get_method  # noqa: E402

HERE = Path(__file__).resolve().parent
# fixed-grid runs: (method, grid, steps); "ddim" is DDIM's trailing grid, "quadratic" its quadratic-in-t variant
# (steps crowd near σ = 0, where the round-trip error is made), "log-SNR" grids.log_snr_tuned, "quadratic+floor"
# the quadratic grid with BOTTOM extra points inside (0, σ_0) (see BOTTOM). Step counts put the NFE each way
# at or under the targets' budgets (20, 50); dpmpp_2m and unipc_3 on the quadratic grid also run as a
# convergence series, to show at what NFE the targets are reached.
FIXED = [("euler", "ddim", (10, 20, 50)), ("rk4", "ddim", (3, 5, 12)),
         ("dpmpp_3m", "ddim", (18, 48)), ("dpmpp_3m", "log-SNR", (10, 18, 48)),
         ("unipc", "ddim", (19, 49)), ("unipc", "log-SNR", (10, 19, 49)),
         ("dpmpp_2m", "quadratic", (10, 19, 30, 49, 70, 100, 200)), ("unipc_3", "quadratic", (19, 49, 100, 200)),
         ("dpmpp_2m", "quadratic+floor", (49, 200)), ("unipc_3", "quadratic+floor", (49, 200)),
         ("rk4", "quadratic", (5, 12)),
         ("reversible_heun", "ddim", (10, 50))]
# Below the table's σ_0 a discrete-time network is evaluated at t = 0 whatever σ is, and DDIM grids cross
# (0, σ_0) in one step: on the digits network that step sets a round-trip floor (about 1.5e-7) that more steps
# above σ_0 do not lower. These fractions of σ_0 split it.
BOTTOM = (0.6, 0.35, 0.2, 0.1)


def _quadratic_floor(sch, n: int) -> torch.Tensor:
    """`n` steps: the quadratic DDIM grid of n − len(BOTTOM) steps with BOTTOM·σ_0 inserted before 0."""
    g = grids.ddim(sch, n - len(BOTTOM), spacing="quadratic")
    extra = torch.tensor(BOTTOM, dtype=torch.float64) * float(sch.sigma_min)
    return torch.cat([g[:-1], extra, g[-1:]])


GRIDS = {"ddim": grids.ddim, "log-SNR": grids.log_snr_tuned,
         "quadratic": lambda sch, n: grids.ddim(sch, n, spacing="quadratic"), "quadratic+floor": _quadratic_floor}
ADAPTIVE = {"dopri5": (1e-4, 1e-6)}
PEER_STEPS = (10, 20, 50)
REF_TOL = 1e-9  # DOP853's rtol = atol per sample for the exact ODE latent of the analytic model
REF_STRIDE = 1  # digits: rk4 on every REF_STRIDE-th σ_t of the table
REF_NOTES: dict[str, str] = {}
TARGETS = ("reversible: ≤ 1e-24 (float64), ≤ 1e-10 (float32) at 10 steps; high-order: ≤ 1e-6 at ≤ 20 NFE, ≤ 1e-8 at "
           "≤ 50; exact latents: round trip from x_T alone ≤ 1e-24 (float64), ≤ 1e-12 (float32) at 10, 20 "
           "and 50 steps, encoder NFE ≤ 4× the decoder's at 20 steps on digits, ≤ 1e-24 through diffusers' "
           "DDIMScheduler, ε perturbed by a relative 1e-7 moves x_0 by ≤ ~10× that")


def diffusers_round_trip(model, x0: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """diffusers' DDIM inversion (DDIMInverseScheduler) then DDIM sampling (DDIMScheduler), both on the
    float64 table with trailing spacing; returns (x_T, x_0 back, NFE up, NFE down)."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    sch = model.schedule
    kw = {"num_train_timesteps": sch.T, "clip_sample": False, "set_alpha_to_one": True,
          "timestep_spacing": "trailing", "prediction_type": "epsilon"}
    sigmas = sch.sigmas

    def eps(x, t):
        return model(x, sigmas[int(t)].to(x.dtype))

    inv = DDIMInverseScheduler(**kw)
    inv.alphas_cumprod = sch.alpha_bar.clone()
    inv.set_timesteps(steps)
    x, up = x0.clone(), 0
    for t in inv.timesteps:
        x = inv.step(eps(x, t), t, x).prev_sample
        up += 1
    z = x.clone()
    dec = DDIMScheduler(**kw)
    dec.alphas_cumprod = sch.alpha_bar.clone()
    dec.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    dec.set_timesteps(steps)
    down = 0
    for t in dec.timesteps:
        x = dec.step(eps(x, t), t, x, eta=0.0).prev_sample
        down += 1
    return z, x, up, down


def _row(case, label, method, setting, nfe_up, nfe_down, x0, back, z, exact, scale, dtype, seconds):
    rt = float(((back.double() - x0.double()) ** 2).mean()) * scale
    lat = float(((z.double() - exact) ** 2).mean())
    return {"case": case, "solver": label, "method": method, "setting": setting, "dtype": str(dtype)[6:],
            "nfe_encode": int(nfe_up), "nfe_decode": int(nfe_down), "roundtrip_mse": rt, "latent_mse_vs_ode": lat,
            "seconds": round(seconds, 2)}


def run_case(case: str, model, x0: torch.Tensor, scale: float, model_dtype, log, exact_only: bool = False,
             exact_n: int | None = None) -> list[dict]:
    """Every solver's round trip on (model, x0); `scale` converts the MSE to the reported pixel scale.
    exact_only: only the encode_exact rows (and the ODE latent they are measured against), on the first
    exact_n samples."""
    sch = model.schedule
    n = x0.shape[0]
    t0 = time.time()
    ode = [0.0, sch.sigma_max]
    from probflow.models.adapters import DiscreteTimeModel

    if isinstance(model, DiscreteTimeModel):
        # An adaptive solver at tight tolerance crawls on the learned field near σ → 0 (dopri5 needs ~660 NFE at
        # 1e-5 and ~2400 at 1e-7; the same with a C²-smooth t(σ), so it is not the kinks of the piecewise-linear
        # t(σ)). rk4 with its steps *on* the table's own σ_t (every k-th) sees a smooth field within each step;
        # k and 2k bound its error.
        tab = torch.cat([sch.sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])

        def rk4_on_table(k):
            g = torch.cat([tab[:-1][::k], tab[-1:]])  # σ_{T-1}, σ_{T-1-k}, …, then 0
            f = DDIMField(model, model_dtype)
            return probflow.encode(f, x0, g, "rk4").x.double(), f.nfe

        exact, nfe = rk4_on_table(REF_STRIDE)
        coarse, _ = rk4_on_table(2 * REF_STRIDE)
        ref_note = (f"rk4 stepping on every {REF_STRIDE}. σ_t of the table (NFE {nfe}); its MSE against rk4 on "
                    f"every {2 * REF_STRIDE}. σ_t: {float(((exact - coarse) ** 2).mean()):.1e}")
    else:
        field = DDIMField(model)
        exact = probflow.encode(field, x0, torch.tensor(ode[::-1], dtype=torch.float64), "scipy_dop853",
                                rtol=REF_TOL, atol=REF_TOL, options={"group": n}).x.double()
        ref_note = f"scipy DOP853, rtol = atol = {REF_TOL:g} per sample (NFE {field.nfe})"
    REF_NOTES[case] = ref_note
    log(f"[{case}] exact ODE latent: {ref_note}; {time.time() - t0:.1f}s")
    rows = []
    if exact_only:
        k = exact_n or n
        return exact_rows(case, model, x0[:k], scale, model_dtype, exact[:k], log)

    def one(label, method, setting, grid, dtype=torch.float64, **kw):
        if method not in METHODS:
            log(f"[{case}] {method}: not registered, skipped")
            return
        t1 = time.time()
        x = x0.to(dtype)
        f_up, f_down = DDIMField(model, model_dtype), DDIMField(model, model_dtype)
        enc = probflow.encode(f_up, x, grid, method, **kw)
        state = enc.state if get_method(method).reversible else None  # the pair; other states are not inverses
        dec = probflow.decode(f_down, enc.x, grid, method, state=state, **kw)
        r = _row(case, label, method, setting, enc.nfe, dec.nfe, x, dec.x, enc.x, exact, scale, dtype,
                 time.time() - t1)
        rows.append(r)
        log(f"[{case}] {label:24s} {setting:>18s}  NFE {r['nfe_encode']:4d}+{r['nfe_decode']:<4d} round-trip MSE "
            f"{r['roundtrip_mse']:.2e}  latent MSE vs ODE {r['latent_mse_vs_ode']:.2e}  ({r['seconds']}s)")

    for s in PEER_STEPS:
        t1 = time.time()
        z, back, up, down = diffusers_round_trip(model, x0, s)
        r = _row(case, "diffusers DDIM inversion", "DDIMInverseScheduler+DDIMScheduler", f"ddim, {s} steps", up,
                 down, x0, back, z, exact, scale, torch.float64, time.time() - t1)
        rows.append(r)
        log(f"[{case}] {r['solver']:24s} {r['setting']:>18s}  NFE {up:4d}+{down:<4d} round-trip MSE "
            f"{r['roundtrip_mse']:.2e}  latent MSE vs ODE {r['latent_mse_vs_ode']:.2e}")
    for method, grid, steps in FIXED:
        label = {"euler": "euler (DDIM)"}.get(method, method)
        for s in steps:
            one(label, method, f"{grid}, {s} steps", GRIDS[grid](sch, s))
    for method, tols in ADAPTIVE.items():
        for tol in tols:
            one(method, method, f"tol={tol:g}", torch.tensor(ode[::-1], dtype=torch.float64), rtol=tol, atol=tol)
    one("reversible_heun", "reversible_heun", "ddim, 10 steps", grids.ddim(sch, 10), dtype=torch.float32)
    k = exact_n or n
    rows += exact_rows(case, model, x0[:k], scale, model_dtype, exact[:k], log)
    return rows


# encode_exact runs: (decoder, grid name, steps, dtype): every decoder encode_exact inverts, 10/20/50 steps, float64
# and float32. On the mixture the DDIM trailing grid ("uniform") for the single-step decoders and the log-SNR grid
# ("logsnr") for the multistep ones (on trailing grids with 10 steps some samples have no exact multistep latent,
# probflow.inversion); on the digits network the grid is quadratic_open (the step into σ = 0 inverts the learned
# denoiser itself, which is nearly singular there: the two uniform rows show that failure), and float64 runs the
# network itself in float64 (probflow.precision, model=float64,state=float64); float32 runs it in float32.
SINGLE, MULTI = ("euler", "heun2", "rk4"), ("dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3")
EXACT = {"mixture": [(m, "uniform" if m in SINGLE else "logsnr", s, dt) for m in SINGLE + MULTI for s in (10, 20, 50)
                     for dt in (torch.float64, torch.float32)],
         "digits": [(m, "quadratic_open", s, dt) for m in SINGLE + MULTI for s in (10, 20, 50)
                    for dt in (torch.float32, torch.float64)]
         + [("euler", "uniform", 20, torch.float32), ("euler", "uniform", 20, torch.float64)]}


def _exact_field(model, model_dtype, dtype):
    """The field of an exact run: a discrete-time network in float64 for float64 runs (its own dtype otherwise)."""
    from probflow.models.adapters import DiscreteTimeModel
    from probflow.precision import Precision

    if isinstance(model, DiscreteTimeModel) and dtype == torch.float64:
        return Precision(torch.float64, torch.float64).field(model)
    return DDIMField(model, model_dtype)


def _iterations(info: dict) -> tuple[list, float, str]:
    """(worst three (count, where), mean, kind) of a solve's iterations: per step, or Newton on the trajectory."""
    if info.get("solve") == "trajectory":
        k = info["iterations"][0]
        return [(k, "trajectory")], float(k), "trajectory passes (Anderson, surrogate preconditioner)"
    it = info["iterations"]
    fb = info.get("newton_fallbacks") or []
    kind = "per step" + (f"; Newton–Krylov fallback at steps {[f['step'] for f in fb]}" if fb else "")
    return sorted(((k, f"step {i}") for i, k in enumerate(it)), reverse=True)[:3], sum(it) / len(it), kind


def exact_rows(case, model, x0, scale, model_dtype, exact, log) -> list[dict]:
    """encode_exact for each (decoder, grid, steps, dtype): round trip through the ordinary decoder, NFE
    (solve + verification; per sample, Jacobian tangents counted), iterations (per step worst first, or Newton's on
    the trajectory), the latent's distance to the exact ODE latent and the decoder's own error from that ODE
    latent on the same grid."""
    from probflow.inversion import InversionError, encode_exact

    rows = []
    for method, gname, steps, dtype in EXACT.get(case, []):
        g = grids.named(gname, model.schedule, steps)
        t1 = time.time()
        f_up = _exact_field(model, model_dtype, dtype)
        setting = f"{gname}, {steps} steps"
        try:
            enc = encode_exact(f_up, x0.to(dtype), g, method)
        except InversionError as e:
            rows.append({"case": case, "exact": True, "method": method, "setting": setting,
                         "dtype": str(dtype)[6:], "failed": str(e)[:200], "seconds": round(time.time() - t1, 1)})
            log(f"[{case}] exact {method} {gname} {steps} {dtype}: FAILED {str(e)[:160]}")
            continue
        wall = time.time() - t1
        f_down = _exact_field(model, model_dtype, dtype)
        t2 = time.time()
        back = probflow.decode(f_down, enc.x, g, method)
        wall_dec = time.time() - t2
        own = None
        if dtype != torch.float64:  # the float32 decoder's own round-off at this latent: the same latent decoded
            # in float64 (a digits network run in float64)
            b64 = probflow.decode(_exact_field(model, model_dtype, torch.float64), enc.x.double(), g.double(),
                                  method).x
            own = float(((back.x.double() - b64) ** 2).mean()) * scale
        from_ode = probflow.decode(_exact_field(model, model_dtype, dtype), exact.to(dtype), g, method).x
        implied = None  # 2·D decodes (a dense Jacobian by central differences): on the 20-step rows only
        if steps == 20:
            implied = _implied_latent_mse(_exact_field(model, model_dtype, dtype), method, g.to(dtype), enc.x,
                                          from_ode, x0.to(dtype))
        worst, mean, kind = _iterations(enc.info)
        r = {"case": case, "exact": True, "method": method, "setting": setting,
             "dtype": str(dtype)[6:], "nfe_encode": enc.nfe, "nfe_solve": enc.info["nfe_solve"],
             "nfe_verify": enc.info["nfe_verify"], "nfe_decode": f_down.nfe, "solve": kind,
             "roundtrip_mse": float(((back.x.double() - x0.double()) ** 2).mean()) * scale,
             "decoder_own_roundoff_mse": own,
             "latent_mse_vs_ode": float(((enc.x.double() - exact) ** 2).mean()),
             "decoder_mse_from_ode_latent": float(((from_ode.double() - x0.double()) ** 2).mean()) * scale,
             "latent_mse_implied": implied,
             "iterations_worst_first": worst, "iterations_mean": mean, "seconds": round(wall, 2),
             "decode_seconds": round(wall_dec, 2)}
        rows.append(r)
        log(f"[{case}] exact {method:8s} {gname:>14s} {steps:3d} {r['dtype']}  NFE {r['nfe_solve']}+{r['nfe_verify']} "
            f"(decode {r['nfe_decode']})  round trip {r['roundtrip_mse']:.1e}  latent vs ODE "
            f"{r['latent_mse_vs_ode']:.1e} (implied {implied})  worst iters {worst} ({kind})  {wall:.1f}s")
    return rows


def _implied_latent_mse(field, method: str, g: torch.Tensor, z: torch.Tensor, from_ode: torch.Tensor,
                        x0: torch.Tensor) -> float:
    """The latent distance the decoder's own error implies (item 4): M(z_exact) = x_0 and M(z_ODE) = x_0 + e,
    with e the decoder's error from the ODE latent, so z_ODE − z_exact ≈ J⁻¹ e, J = ∂M/∂x_T at the exact latent
    (dense per sample, forward-mode tangents: `probflow.newton.jacobian`). Returns the per-dimension MSE of J⁻¹ e,
    to set beside the measured latent MSE against the ODE latent (their ratio is 1 where the decoder is linear
    between the two latents)."""
    from probflow.inversion.verify import decoder_x

    j = _fd_jacobian(decoder_x(field, get_method(method), g), z)
    e = (from_ode - x0).reshape(len(x0), -1).double()
    return float(torch.linalg.solve(j.double(), e[..., None]).pow(2).mean())


def _fd_jacobian(fn, z: torch.Tensor) -> torch.Tensor:
    """Dense per-sample Jacobians (B, D, D) by central differences (benchmark only, D = 64: a reference for the
    linearised pull-back; the library itself never builds one)."""
    b, d = z.shape[0], z[0].numel()
    h = torch.finfo(z.dtype).eps ** (1 / 3) * z.reshape(b, -1).abs().amax(1).clamp_min(1.0)
    cols = []
    with torch.no_grad():
        for k in range(d):
            e = torch.zeros_like(z).reshape(b, -1)
            e[:, k] = h
            e = e.reshape(z.shape)
            cols.append((fn(z + e) - fn(z - e)).reshape(b, -1) / (2 * h[:, None]))
    return torch.stack(cols, -1)


class _Perturbed:
    """ε·(1 + rel·ξ), ξ = ±1 fixed per element: a stand-in for another machine, BLAS or thread count."""

    def __init__(self, model, rel: float) -> None:
        self.model, self.rel = model, rel
        self.model_dtype = getattr(model, "model_dtype", None)

    def __call__(self, x, sigma):
        e = self.model(x, sigma)
        xi = torch.sign(torch.sin(torch.arange(e.numel(), dtype=torch.float64) * 12.9898 + 1.0))
        return e * (1 + self.rel * xi.reshape(e.shape).to(e.dtype))


def robustness(model, x0: torch.Tensor, log) -> list[str]:
    """Exact latent (euler, quadratic_open, 20 steps, float32) vs reversible_heun's pair (20 uniform steps):
    decoded with ε perturbed by a relative 1e-7, and encoded on 2 threads then decoded on 1."""
    from probflow.inversion import encode_exact
    from probflow.io.images import to_uint8

    rel, out = 1e-7, []
    cases = {"exact latent, euler, quadratic_open, 20 steps (float32)":
             (lambda: encode_exact(model, x0.float(), grids.named("quadratic_open", model.schedule, 20), "euler"),
              "euler", grids.named("quadratic_open", model.schedule, 20), False),
             "reversible_heun pair, uniform, 20 steps (float64)":
             (lambda: probflow.encode(model, x0.double(), grids.named("uniform", model.schedule, 20),
                                      "reversible_heun"), "reversible_heun", grids.named("uniform", model.schedule, 20),
              True)}
    out += ["## Robust exactness: the same latent decoded on a perturbed ε or another thread count", "",
            f"{len(x0)} held-out digits; max |Δx_0| on the [−1, 1] scale against the decode on the encode's own "
            "environment, its ratio to the perturbation, and 8-bit pixels that differ (max grey levels).", "",
            "| latent | perturbation | max abs Δx_0 | Δx_0 / 1e-7 | pixels that differ | max grey levels |",
            "|---|---|---|---|---|---|"]
    threads = torch.get_num_threads()
    for label, (enc_fn, method, g, pair) in cases.items():
        torch.set_num_threads(2)
        enc = enc_fn()
        st = enc.state if pair else None
        two = probflow.decode(model, enc.x, g, method, state=st).x
        torch.set_num_threads(1)
        one = probflow.decode(model, enc.x, g, method, state=st).x
        base = one if threads == 1 else probflow.decode(model, enc.x, g, method, state=st).x
        pert = probflow.decode(_Perturbed(model, rel), enc.x, g, method, state=st).x
        torch.set_num_threads(threads)
        for what, a, b in (("ε × (1 ± 1e-7)", pert, base), ("encoded and decoded on 2 threads vs decoded on 1", one,
                                                               two)):
            d = float((a.double() - b.double()).abs().max())
            pa, pb = torch.from_numpy(to_uint8(a)).int(), torch.from_numpy(to_uint8(b)).int()
            out.append(f"| {label} | {what} | {d:.1e} | {d / rel:.3g} | {int((pa != pb).sum())} / {pa.numel()} | "
                       f"{int((pa - pb).abs().max())} |")
            log(f"[robust] {label}: {what}: max|Δx0| {d:.1e}, grey levels {int((pa - pb).abs().max())}")
    return out + [""]


def interop(gm, x0: torch.Tensor, log) -> list[str]:
    """A latent exact for euler on the DDIM trailing grid, decoded by diffusers' DDIMScheduler loop."""
    from diffusers import DDIMScheduler

    from probflow.inversion import InversionError, encode_exact

    sch = gm.schedule
    out = ["## Interoperability: exact-for-euler latents decoded by diffusers' DDIMScheduler", "",
           "DDIMScheduler(eta = 0, trailing, float64 ᾱ table, set_alpha_to_one, clip_sample = False), its own "
           f"set_timesteps/step loop, on {len(x0)} samples of the 64-D mixture (float64).", "",
           "| steps | round-trip MSE through diffusers | through probflow.decode |", "|---|---|---|"]
    for steps in (10, 20, 50):
        g = grids.ddim(sch, steps)
        try:
            enc = encode_exact(gm, x0, g, "euler")
        except InversionError as e:
            out.append(f"| {steps} | no latent: {str(e)[:160]} | |")
            log(f"[interop] {steps} steps: encode_exact failed: {e}")
            continue
        d = DDIMScheduler(num_train_timesteps=sch.T, clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing", prediction_type="epsilon")
        d.alphas_cumprod = sch.alpha_bar.clone()
        d.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        d.set_timesteps(steps)
        x = enc.x.clone()
        for t in d.timesteps:
            x = d.step(gm(x, sch.sigmas[int(t)]), t, x, eta=0.0).prev_sample
        ours = probflow.decode(gm, enc.x, g, "euler").x
        m1, m2 = float(((x - x0) ** 2).mean()), float(((ours - x0) ** 2).mean())
        out.append(f"| {steps} | {_fmt(m1)} | {_fmt(m2)} |")
        log(f"[interop] {steps} steps: diffusers {m1:.1e}, probflow {m2:.1e}")
    return out + [""]


def exact_table(rows: list[dict], case: str) -> list[str]:
    """The encode_exact rows of `case` as markdown."""
    ex = [r for r in rows if r["case"] == case and r.get("exact")]
    if not ex:
        return []
    out = [f"### {case}: latents exact for an ordinary decoder (`probflow.inversion.encode_exact`)", "",
           "x_T from x_0 alone, decoded by the ordinary decoder (`probflow.decode`, same grid and method). Model "
           "calls on the batch (one call on the batch counts 1): encode = solve + the verification decode and any "
           "shooting polish, against the decoder's own; iterations: single-step decoders, calls per step solve, "
           "worst three (count, step index from σ_max); multistep decoders, passes of the trajectory solve; the "
           "decoder's own error e when started from the exact ODE latent is the second-last column, the last the "
           "latent MSE that error implies, J⁻¹e with J the decoder's Jacobian at the exact latent by central "
           "differences (20-step rows; benchmark only; the linearised pull-back: it equals the latent MSE vs ODE "
           "where the decoder is linear between the two latents). Float32 rows: the decoder's own round-off is the MSE "
           "between the float32 decode of the latent and its float64 decode (the digits network run in float64): "
           "the scale of the float32 decoder's own error at that latent.",
           "",
           "| decoder | grid | dtype | NFE encode (solve + verify) | NFE decode | encode ÷ decode | round-trip MSE | "
           "float32 decoder's own round-off (MSE) | worst iterations "
           "(count, where) | mean iterations | solve | encode wall s | latent MSE vs ODE | decoder MSE from the ODE "
           "latent | latent MSE implied (J⁻¹e) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ex:
        if "failed" in r:
            out.append(f"| {r['method']} | {r['setting']} | {r['dtype']} | — | — | — | **no latent**: "
                       f"{r['failed']} | | | | | {r['seconds']} | | | |")
            continue
        worst = ", ".join(f"{k} ({i})" for k, i in r["iterations_worst_first"])
        own = "—" if r.get("decoder_own_roundoff_mse") is None else _fmt(r["decoder_own_roundoff_mse"])
        out.append(f"| {r['method']} | {r['setting']} | {r['dtype']} | {r['nfe_solve']} + {r['nfe_verify']} | "
                   f"{r['nfe_decode']} | {r['nfe_encode'] / r['nfe_decode']:.1f} | "
                   f"{_fmt(r['roundtrip_mse'])} | {own} | {worst} | {r['iterations_mean']:.1f} | "
                   f"{r.get('solve', '')} | {r['seconds']} | {_fmt(r['latent_mse_vs_ode'])} | "
                   f"{_fmt(r['decoder_mse_from_ode_latent'])} | "
                   f"{'—' if r['latent_mse_implied'] is None else _fmt(r['latent_mse_implied'])} |")
    return out + [""]


def _fmt(v: float) -> str:
    return "0" if v == 0 else f"{v:.1e}"


def markdown(rows: list[dict], info: dict) -> str:
    out = ["# Inversion: round trip decode(encode(x₀)) and distance from the exact ODE latent", "",
           f"Generated by `{info.get('command', 'python benchmarks/inversion.py')}` "
           f"({info['date']}, {info['seconds']:.0f} s, torch {info['torch']}, {info['threads']} thread(s)).", "",
           "Same σ grid both ways (DDIM's trailing grid for fixed-step methods, [0, σ_max] for dopri5); "
           "round-trip MSE per dimension (digits on the [0, 1] pixel scale, as the DDIM paper's Table 2; "
           "mixture in its own units); latent MSE per dimension against the exact ODE latent (reference per "
           "case below). dtype: the state's (x, x̄) dtype; the "
           "digits network runs in float32 (in float64 for the float64 exact-latent rows, probflow.precision); "
           "reversible_heun keeps its pair in 64-bit fixed point whatever the dtype (probflow/reversible.py).", "",
           "Reference (the DDIM paper, Table 2, CIFAR-10, [0, 1] scale, DDIM inversion round trip): 0.014 at 10 "
           "steps each way, 6.5e-3 at 20, 2.3e-3 at 50, ≈1e-4 only at 500–1000.", "",
           f"Targets: {TARGETS}.", ""]
    for case, desc in info["cases"].items():
        out += [f"## {case}: {desc}", "", f"Exact ODE latent: {REF_NOTES.get(case, '?')}.", "",
                "| solver | setting | dtype | NFE encode + decode | round-trip MSE | latent MSE vs ODE |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            if r["case"] == case and not r.get("exact"):
                out.append(f"| {r['solver']} | {r['setting']} | {r['dtype']} | {r['nfe_encode']} + {r['nfe_decode']} | "
                           f"{_fmt(r['roundtrip_mse'])} | {_fmt(r['latent_mse_vs_ode'])} |")
        out.append("")
        out += exact_table(rows, case)
    out += info.get("notes", [])
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--suite" in argv and "digits-quick" in argv:
        return digits_quick(argv)
    if "--suite" in argv and "image" in argv:
        from inversion_images import image_suite

        return image_suite(argv)
    if "--all" in argv:
        from inversion_run import run_all

        return run_all(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits", help="'digits' (shipped) or a digits checkpoint folder")
    ap.add_argument("--n", type=int, default=8, help="held-out digits images and mixture samples (default 8)")
    ap.add_argument("--out", default=str(HERE), help="folder for INVERSION.md and inversion.json")
    ap.add_argument("--force", action="store_true", help="replace existing INVERSION.md / inversion.json")
    ap.add_argument("--cases", default="digits,mixture", help="comma-separated subset of digits,mixture")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--exact-only", action="store_true", help="only the exact-latent tables (encode_exact rows, "
                    "interoperability, robustness)")
    ap.add_argument("--exact-n", type=int, default=None, help="samples for the encode_exact rows (default --n)")
    ap.add_argument("--exact-steps", default="10,20,50", help="step counts of the encode_exact rows")
    ap.add_argument("--exact-dtypes", default="float64,float32", help="dtypes of the encode_exact rows")
    ap.add_argument("--exact-methods", default=",".join(SINGLE + MULTI), help="decoders of the encode_exact rows")
    ap.add_argument("--mixture-seed", type=int, default=1, help="seed of GaussianMixture.random (default 1, the "
                    "held-out mixture; another seed tunes a solver without touching it)")
    args = ap.parse_args(argv)
    keep_steps = {int(v) for v in args.exact_steps.split(",")}
    keep_dt = {getattr(torch, v.strip()) for v in args.exact_dtypes.split(",")}
    keep_m = {v.strip() for v in args.exact_methods.split(",")}
    for c in EXACT:
        EXACT[c] = [e for e in EXACT[c] if e[0] in keep_m and e[2] in keep_steps and e[3] in keep_dt]
    out = Path(args.out)
    md_path, js_path = out / "INVERSION.md", out / "inversion.json"
    cases = [c.strip() for c in args.cases.split(",")]
    if not set(cases) <= {"digits", "mixture"}:
        ap.exit(2, f"inversion.py: --cases: expected a subset of digits,mixture, got {args.cases!r}\n")
    for p in (md_path, js_path):
        try:
            check_writable(p, args.force, "--out")
        except (OSError, ValueError) as e:
            ap.exit(2, f"inversion.py: {e}\n")
    from probflow import digits
    from probflow.cli.common import load_image_model

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    model = load_image_model(args.model)
    torch.set_num_threads(args.threads)  # after the loader, which sets the command line's default threads
    x_test = digits.load_split()["x_test"][: args.n].double()
    gm = GaussianMixture.random(64, 8, seed=args.mixture_seed, std_range=(0.1, 0.5))
    xg = gm.sample(args.n, generator=torch.Generator().manual_seed(0))
    gm.schedule = model.schedule  # the mixture on the same σ table (linear, T = 1000)
    kw = {"exact_only": args.exact_only, "exact_n": args.exact_n}
    rows = run_case("digits", model, x_test, 0.25, torch.float32, log, **kw) if "digits" in cases else []
    rows += run_case("mixture", gm, xg, 1.0, None, log, **kw) if "mixture" in cases else []
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.time() - t0,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": {"name": model.name, "fingerprint": model.fingerprint},
            "cases": {c: d for c, d in {"digits": f"{args.n} held-out test images of the digits model (sha256 "
                                f"{model.fingerprint[:12]}…), network float32",
                      "mixture": f"{args.n} samples of GaussianMixture.random(64, 8, seed={args.mixture_seed}), "
                                 "exact ε"}.items()
                      if c in cases},
            "method_orders": {m: get_method(m).order for m in {r['method'] for r in rows} if m in METHODS}}
    extra = []
    if "mixture" in cases:
        extra += interop(gm, xg, log)
    if "digits" in cases:
        extra += robustness(model, x_test, log)
    info["notes"] = notes(rows) + exact_notes(rows) + extra
    info["reference"] = dict(REF_NOTES)
    atomic_write(js_path, lambda tmp: Path(tmp).write_text(json.dumps({"info": info, "rows": rows}, indent=1)),
                 args.force, "--out")
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(markdown(rows, info)), args.force, "--out")
    log(f"wrote {md_path} and {js_path} in {time.time() - t0:.0f}s")
    return 0


def digits_quick(argv: list[str]) -> int:
    """`--suite digits-quick`: encode_exact on a few held-out digits in one batch (module docstring)."""
    from probflow import digits
    from probflow.cli.common import load_image_model
    from probflow.inversion import InversionError, encode_exact

    ap = argparse.ArgumentParser(description="encode_exact on held-out digits: cost and round trip")
    ap.add_argument("--suite")
    ap.add_argument("--images", default="0,1,2,3", help="indices into the held-out test split")
    ap.add_argument("--cases", default="euler:20:float32,heun2:20:float32,euler:20:float64,heun2:20:float64")
    ap.add_argument("--max-iter", type=int, default=100, help="encode_exact's max_iter (default 100, its own)")
    args = ap.parse_args(argv)
    if args.max_iter < 1:
        ap.error(f"--max-iter: expected a positive integer, got {args.max_iter}")
    model = load_image_model("digits")
    torch.set_num_threads(1)  # one thread, as every row of the report (the loader sets the command line's default)
    x0 = digits.load_split()["x_test"][[int(i) for i in args.images.split(",")]].double()
    for case in args.cases.split(","):
        method, steps, dname = case.split(":")
        dtype = getattr(torch, dname)
        g = grids.named("quadratic_open", model.schedule, int(steps))
        t = time.time()
        try:
            enc = encode_exact(_exact_field(model, torch.float32, dtype), x0.to(dtype), g, method,
                               max_iter=args.max_iter)
        except InversionError as e:  # reported as the row's outcome: the next case still runs
            print(f"{case}: no latent: {e}", flush=True)
            continue
        wall = time.time() - t
        f_down = _exact_field(model, torch.float32, dtype)
        back = probflow.decode(f_down, enc.x, g, method).x
        mse = float(((back.double() - x0) ** 2).mean()) * 0.25
        i, d = enc.info, f_down.nfe
        print(f"{case}: encode {enc.nfe} calls (solve {i['nfe_solve']} + verify {i['nfe_verify']}) / decode {d} = "
              f"{enc.nfe / d:.2f}x (solve {i['nfe_solve'] / d:.2f}x); round trip MSE {mse:.2e}; polish "
              f"{i['shooting']}; per-step iterations {i['iterations']}; {wall:.1f}s", flush=True)
    return 0


def exact_notes(rows: list[dict]) -> list[str]:
    """The exact-latent targets, from the encode_exact rows."""
    lines = ["## Exact latents: targets, as measured", ""]
    for case in ("mixture", "digits"):
        ex = [r for r in rows if r["case"] == case and r.get("exact")]
        for dt, lim in (("float64", 1e-24), ("float32", 1e-12)):
            ok = [r for r in ex if r["dtype"] == dt and "failed" not in r]
            bad = [r for r in ex if r["dtype"] == dt and "failed" in r]
            if ok:
                worst = max(ok, key=lambda r: r["roundtrip_mse"])
                verdict = "meets" if worst["roundtrip_mse"] <= lim else "MISSES"
                lines.append(f"- {case}, {dt}: worst round trip {_fmt(worst['roundtrip_mse'])} ({worst['method']}, "
                             f"{worst['setting']}) — {verdict} ≤ {lim:g}")
                for r in (r for r in ok if r["roundtrip_mse"] > lim and r.get("decoder_own_roundoff_mse") is not None):
                    lines.append(f"  - {r['method']}, {r['setting']}: round trip {_fmt(r['roundtrip_mse'])}; the "
                                 f"float32 decoder's own round-off at that latent (float32 vs float64 decode) "
                                 f"{_fmt(r['decoder_own_roundoff_mse'])}")
            for r in bad:
                lines.append(f"- {case}, {dt}, {r['method']} {r['setting']}: no exact latent (the solve refuses): "
                             f"{r['failed'][:120]}…")
        for single, lim in ((True, 4.0), (False, 12.0)):
            grid = "quadratic_open" if case == "digits" else "uniform" if single else "logsnr"  # EXACT's grids
            cells = [r for r in ex if (r["method"] in SINGLE) == single and r["setting"].startswith(grid + ",")]
            met = [r for r in cells if "failed" not in r and r["nfe_encode"] <= lim * r["nfe_decode"]]
            miss = [f"{r['method']} {r['setting'].split(', ')[1]} {r['dtype']} "
                    + ("no latent" if "failed" in r else f"{r['nfe_encode'] / r['nfe_decode']:.1f}×")
                    for r in cells if r not in met]
            if cells:
                lines.append(f"- {case}, {'single-step' if single else 'multistep'} decoders, encode ≤ {lim:g}× the "
                             f"decoder's model calls (verification included): met by {len(met)} of {len(cells)} rows"
                             + (" (" + ", ".join(f"{r['method']} {r['setting'].split(', ')[1]} {r['dtype']} "
                                                 f"{r['nfe_encode'] / r['nfe_decode']:.1f}×" for r in met) + ")"
                                if met else "") + (f"; missed: {', '.join(miss)}" if miss else ""))
    return lines + [""]


def notes(rows: list[dict]) -> list[str]:
    """Target checks, computed from the rows."""
    lines = ["## Targets, as measured", ""]
    for case in ("digits", "mixture"):
        rev = [r for r in rows if r["case"] == case and r["method"] == "reversible_heun"
               and r["setting"] == "ddim, 10 steps" and not r.get("exact")]
        for r in rev:
            lim = 1e-24 if r["dtype"] == "float64" else 1e-10
            lines.append(f"- {case}, reversible_heun, 10 steps, {r['dtype']}: round-trip MSE "
                         f"{_fmt(r['roundtrip_mse'])} "
                         f"({'meets' if r['roundtrip_mse'] <= lim else 'MISSES'} ≤ {lim:g}); latent MSE vs ODE "
                         f"{_fmt(r['latent_mse_vs_ode'])}")
        for budget, lim in ((20, 1e-6), (50, 1e-8)):
            high = [r for r in rows if r["case"] == case and r["method"] not in ("euler", "reversible_heun")
                    and "DDIM" not in r["method"] and not r.get("exact")]
            cands = [r for r in high if max(r["nfe_encode"], r["nfe_decode"]) <= budget]
            best = min(cands, key=lambda r: r["roundtrip_mse"], default=None)
            if best is None:
                lines.append(f"- {case}, high-order at ≤ {budget} NFE each way: no run in budget")
                continue
            lines.append(f"- {case}, best high-order at ≤ {budget} NFE each way: {best['solver']} {best['setting']} "
                         f"(NFE {best['nfe_encode']}+{best['nfe_decode']}): {_fmt(best['roundtrip_mse'])} "
                         f"({'meets' if best['roundtrip_mse'] <= lim else 'MISSES'} ≤ {lim:g})")
            ok = [r for r in high if r["roundtrip_mse"] <= lim]
            first = min(ok, key=lambda r: max(r["nfe_encode"], r["nfe_decode"]), default=None)
            lines.append(f"  - fewest NFE each way measured to reach ≤ {lim:g}: " + (
                "none in this table" if first is None else
                f"{first['solver']} {first['setting']} (NFE {first['nfe_encode']}+{first['nfe_decode']}): "
                f"{_fmt(first['roundtrip_mse'])}"))
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
