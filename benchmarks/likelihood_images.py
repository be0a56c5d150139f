"""Likelihood at image scale: solver error on image models, variance per model call of the divergence
estimators, bits/dim of the digits test split, and a random-weight 3×32×32 diffusers UNet with attention (the
stress case). Every part writes benchmarks/likelihood_images.json (merged by part, rewritten after each row, so an
interrupted run keeps what it measured); `python benchmarks/likelihood.py --part report` renders LIKELIHOOD.md.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part solvers --model digits
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part solvers --model unet
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part variance --model unet --n 1
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part bpd --model digits --n 32
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part check --model digits --n-check 4 \
        --probes 4 16 --seeds 8
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part bpd --model unet --n 8
    # the trained 32×32 model (digits32, unconditional; its test split as 8-bit images, 256 levels):
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part bpd --model digits32 --n 64 \
        --n-check 0
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part check --model digits32 \
        --n-check 4 --steps 1 --probes 4 16 --seeds 32
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part check --model digits32 \
        --n-check 8 --steps 3 --probes 4 16 --seeds 32
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part check --model digits32 \
        --n-check 2 --steps 10 --probes 4 16 --seeds 32
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part dof --model digits32 --n 4 \
        --steps-list 1 3 6 10 20
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part variance --model digits32 --n 1
    # any other diffusers folder with 8-bit images:
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/likelihood_images.py --part bpd --model FOLDER \
        --images 'DIR/*.png' --n 64

Tuned on: the CLI's default solver and steps (rk4, 20 Karras steps) were chosen from the two solver tables (digits
test images 0–2 and one UNet image from IMAGE_SEED); the bpd parts use the same two models (and, for digits,
images 0–2 among the n), so the discretisation error at the default is a training score there. The trained
32×32 model (digits32) is the held-out case.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from probflow import grids, models
from probflow.cli.likelihood import DEFAULT_GRID, DEFAULT_METHOD, DEFAULT_STEPS
from probflow.io.atomic import atomic_write
from probflow.likelihood import DEFAULT_PROBES, bits_per_dim, estimate, likelihood

HERE = Path(__file__).resolve().parent
OUT = HERE / "likelihood_images.json"
UNET_SEED, IMAGE_SEED = 20261206, 31


def build_unet(folder: str | Path, seed: int = UNET_SEED) -> int:
    """A random-weight diffusers UNet2DModel at 3×32×32 with attention at 16×16 and GroupNorm, saved with
    `save_pretrained` beside a linear DDPM scheduler config (T = 1000); returns its parameter count."""
    import diffusers

    torch.manual_seed(seed)
    net = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                                block_out_channels=(64, 128, 128),
                                down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)
    net.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_config(folder)
    return sum(p.numel() for p in net.parameters())


def smooth_images(n: int, seed: int = IMAGE_SEED) -> torch.Tensor:
    """n 8-bit-valued 3×32×32 images in [−1, 1]: bilinear upsampling of 4×4 noise plus fine noise, quantised."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=32, mode="bilinear",
                                             align_corners=False)
    v = (127.5 + 60 * coarse + 8 * torch.randn(n, 3, 32, 32, generator=g)).round().clamp(0, 255)
    return v.double() / 127.5 - 1


def load(spec: str, images: str | None, n: int) -> tuple[object, torch.Tensor, int, dict]:
    """(model, x (n, C, H, W) on its levels, levels, description)."""
    if spec == "digits":
        from probflow.digits import load_split

        m = models.load("digits")
        return m, load_split()["x_test"][:n].double(), m.levels, {"model": "digits (shipped)", "images": "test split"}
    if spec == "digits32":
        from probflow.digits.conditional import NULL_CLASS, load_split32

        # the null class with w = 1 is ε_∅, the unconditional field (CFG weight w = 0)
        m = models.load("digits32", class_label=NULL_CLASS)
        x = load_split32()["x_test"][:n].double()
        # 8-bit PNGs of the model's test images: the upsampled values lie on a 1025-level grid, not on 256 levels
        return m, ((x + 1) * 127.5).round() / 127.5 - 1, 256, {
            "model": "digits32 (shipped, unconditional: null class 10, w = 0)",
            "images": "digits32 test split (8×8 → 32×32 bilinear), quantised to 8 bits (256 levels)"}
    if spec == "unet":
        with tempfile.TemporaryDirectory() as d:
            params = build_unet(d)
            m = models.load(d)  # through probflow's loader, as a user's folder would be
        return m, smooth_images(n), 256, {"model": f"random-weight diffusers UNet2DModel, {params / 1e6:.1f} M "
                                          "parameters, attention at 16×16", "images": "synthetic smooth 8-bit"}
    from probflow.io.images import load_images

    m = models.load(spec)
    paths = sorted(glob.glob(images or ""))[:n]
    if not paths:
        raise SystemExit(f"--images: no files match {images!r}")
    c, h, w = m.sample_shape
    x = load_images(paths, (h, w), c, data_range=getattr(m, "data_range", (-1.0, 1.0)), verbose=False).double()
    return m, x, getattr(m, "levels", 256), {"model": spec, "images": images}


def _key(spec: str) -> str:
    return f"bpd_{spec if spec in ('digits', 'unet', 'digits32') else 'trained'}"


def _grid(m, method: str, steps: int) -> torch.Tensor:
    s = m.schedule
    return grids.named(DEFAULT_GRID, s, steps).flip(0) if DEFAULT_GRID != "karras" else \
        grids.karras(s.sigma_max, s.sigma_min, steps).flip(0)


def _merge(key: str, value) -> None:
    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    res[key] = value
    atomic_write(OUT, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1)), force=True)


def solvers_part(spec: str) -> None:
    """Discretisation error in bits/dim against rk4 on a 40-step Karras grid, per method and steps. Digits: the
    exact divergence on 3 test images; the UNet: Hutchinson with 2 fixed probes per image (the same probes in
    every solve, so the differences are the solver's), 1 image."""
    m, x, levels, info = load(spec, None, 3 if spec == "digits" else 1)
    kw = dict(divergence="exact") if spec == "digits" else dict(divergence="hutchinson", probes_per_sample=2,
                                                                 fresh_probes=False)
    rows = []

    def run(method, steps):
        t = time.perf_counter()
        r = bits_per_dim(m, x, _grid(m, method, steps), method, levels=levels, seed=3, **kw)
        return r, time.perf_counter() - t

    ref, s = run("rk4", 40)
    info.update(reference="rk4, Karras 40 steps", reference_calls=ref.likelihood.nfe, reference_bpd=ref.bpd.tolist(),
                divergence=kw["divergence"], rows=rows)
    for method, steps in (("rk4", 10), ("rk4", 20), ("dpmpp_3m", 20), ("dpmpp_3m", 40), ("unipc_3", 20),
                          ("unipc_3", 40), ("heun2", 20)):
        r, s = run(method, steps)
        rows.append({"method": method, "steps": steps, "calls": r.likelihood.nfe, "seconds": round(s, 1),
                     "max_abs_err": float((r.bpd - ref.bpd).abs().max()), "bpd": r.bpd.tolist()})
        _merge(f"solvers_{spec}", info)
        print(rows[-1], flush=True)


def variance_part(spec: str, n: int) -> None:
    """Fixed vs fresh probes: 8 probes per call on the default grid; the spread of the 8 accumulators is one
    probe stream's standard deviation, so SE(P) = sd/sqrt(P); seconds per call from the pilot as forward +
    P × reverse."""
    m, x, levels, info = load(spec, None, n)
    g = _grid(m, DEFAULT_METHOD, DEFAULT_STEPS)
    d = x[0].numel()
    out = {**info, "grid": f"{DEFAULT_METHOD}, {DEFAULT_GRID} {DEFAULT_STEPS} steps", "images": n, "rows": [],
           "dim": d}
    for fresh in (False, True):
        t = time.perf_counter()
        r = bits_per_dim(m, x, g, DEFAULT_METHOD, levels=levels, seed=5, divergence="hutchinson",
                         probes_per_sample=8, fresh_probes=fresh)
        sd = (r.likelihood.divergence_probes.std(1) / (d * math.log(2)))  # one probe stream, bits/dim, per image
        out["rows"].append({"fresh": fresh, "calls": r.likelihood.nfe, "seconds": round(time.perf_counter() - t, 1),
                            "sd_one_probe_bpd": sd.tolist(), "sd_mean": float(sd.mean())})
        _merge(f"variance_{spec}", out)
        print(out["rows"][-1], flush=True)
    quiet = estimate(m, x[:1], g, DEFAULT_METHOD, divergence="hutchinson", probes_per_sample=1)
    eight = estimate(m, x[:1], g, DEFAULT_METHOD, divergence="hutchinson", probes_per_sample=8)
    bwd = max((eight.seconds_per_evaluation - quiet.seconds_per_evaluation) / 7, 1e-9)
    out["seconds_forward"], out["seconds_reverse"] = quiet.seconds_per_evaluation - bwd, bwd
    _merge(f"variance_{spec}", out)


def bpd_part(spec: str, images: str | None, n: int, n_check: int, batch: int) -> None:
    """Bits/dim of n images with the CLI's defaults (divergence auto), in batches; the pilot's estimate beside the
    measured time; on the first n_check images the other divergence (Hutchinson for an exact default, exact
    where affordable) with z = (Hutchinson − exact)/SE."""
    m, x, levels, info = load(spec, images, n)
    g = _grid(m, DEFAULT_METHOD, DEFAULT_STEPS)
    est = estimate(m, x[:batch], g, DEFAULT_METHOD, batch=batch)
    est.samples = len(x)
    out = {**info, "grid": f"{DEFAULT_METHOD}, {DEFAULT_GRID} {DEFAULT_STEPS} steps", "levels": levels,
           "batch": batch, "estimate": est.describe(), "estimated_seconds": est.seconds,
           "divergence": est.divergence, "probes": est.probes if est.divergence == "hutchinson" else None,
           "se_kind": "pooled" if est.divergence == "hutchinson" else None}
    bpd, se, secs, calls = [], [], 0.0, 0
    for lo in range(0, len(x), batch):
        r = bits_per_dim(m, x[lo:lo + batch], g, DEFAULT_METHOD, levels=levels, seed=0, first_index=lo)
        bpd.append(r.bpd)
        se.append(r.bpd_stderr)
        secs, calls = secs + r.likelihood.seconds, r.likelihood.nfe
        print(f"{lo + len(r.bpd)}/{len(x)} images, {secs:.0f} s", flush=True)
    bpd, se = torch.cat(bpd), torch.cat(se)
    out.update(n=len(x), bpd=bpd.tolist(), bpd_se=se.tolist(), mean=float(bpd.mean()),
               se_over_images=float(bpd.std() / math.sqrt(len(bpd))), estimator_se=float(se.pow(2).sum().sqrt()
                                                                                          / len(bpd)),
               calls_per_image=calls, seconds=round(secs, 1), seconds_per_image=round(secs / len(x), 2))
    old = json.loads(OUT.read_text()).get(_key(spec), {}) if OUT.exists() else {}
    out.update({k: v for k, v in old.items() if k.startswith("check")})  # a check run's rows stay
    _merge(_key(spec), out)
    if n_check and est.divergence == "exact":
        check_part(spec, images, n_check, out)


def check_part(spec: str, images: str | None, n_check: int, out: dict | None = None,
               probes: tuple[int, ...] = (DEFAULT_PROBES,), steps: int = DEFAULT_STEPS, seeds: int = 1) -> None:
    """On the first n_check images: Hutchinson (each count of fresh probes per call in `probes`) against the exact
    divergence, both on the default method's Karras grid of `steps` steps, z = (Hutchinson − exact)/SE per image
    (probe seed 0, the bpd part's); then `seeds` probe seeds (0 … seeds − 1) on the same dequantised images against
    the same exact solve: the z's over images × seeds with the pooled standard error (`Likelihood.stderr`) and, for
    comparison, with the spread of the P accumulators std_j ℓ_j/sqrt(P) (P − 1 degrees of freedom). Added to the
    bpd part's record."""
    m, x, levels, info = load(spec, images, n_check)
    g = _grid(m, DEFAULT_METHOD, steps)
    key = _key(spec)
    xs = x[:n_check]
    ex = bits_per_dim(m, xs, g, DEFAULT_METHOD, levels=levels, seed=0, divergence="exact")
    print(f"exact: {ex.bpd.tolist()} in {ex.likelihood.seconds:.0f} s", flush=True)
    to_bpd = 1 / (xs[0].numel() * math.log(2))  # (B1): nats per image → bits/dim
    rows = {}
    for p in probes:
        zs, old, secs = [], [], 0.0
        for s in range(seeds):
            r = likelihood(m, ex.x_dequantised[0], g, DEFAULT_METHOD, divergence="hutchinson", probes_per_sample=p,
                           seed=s)
            dz = (ex.likelihood.log_prob - r.log_prob) * to_bpd  # Hutchinson − exact, bits/dim
            zs.append(dz / (r.stderr * to_bpd))
            old.append(dz / (r.divergence_probes.std(1) / math.sqrt(p) * to_bpd))
            secs += r.seconds
            if s == 0:
                hu = (-r.log_prob * to_bpd + ex.offset, r.stderr * to_bpd, r.nfe, r.seconds)
        z, zold = torch.stack(zs), torch.stack(old)
        name = "check" if p == DEFAULT_PROBES else f"check_{p}"
        rows[name if steps == DEFAULT_STEPS else f"{name}_steps{steps}"] = {
            "images": n_check, "probes": p, "grid": f"{DEFAULT_METHOD}, karras {steps} steps",
            "exact_calls": ex.likelihood.nfe, "exact": ex.bpd.tolist(), "hutchinson": hu[0].tolist(),
            "se": hu[1].tolist(), "z": z[0].tolist(), "hutchinson_calls": hu[2],
            "hutchinson_seconds": round(hu[3], 1), "exact_seconds": round(ex.likelihood.seconds, 1),
            "se_kind": "pooled", "seeds": seeds, "seeds_seconds": round(secs, 1),
            "z_seeds": _zsummary(z), "z_seeds_accumulator_spread": _zsummary(zold)}
        print(name, steps, json.dumps(rows[list(rows)[-1]]["z_seeds"]), flush=True)
    if out is None:  # read now, not at the start: a bpd run may have written the record meanwhile
        out = json.loads(OUT.read_text()).get(key, dict(info)) if OUT.exists() else dict(info)
    out.update(rows)
    _merge(key, out)
    print(json.dumps(rows, indent=1), flush=True)


def dof_part(spec: str, n: int, steps_list: tuple[int, ...], probes: int = 16) -> None:
    """How the variance of the fresh-probe estimate spreads over the solve's calls: `probes` probes per call on the
    default method's Karras grids of `steps_list` steps, w_c = a_c²·s_c² (a_c the rk4 3/8-rule weights written out,
    s_c² the probes' variance at call c), and the pooled standard error's effective degrees of freedom with
    P = DEFAULT_PROBES, (P − 1)(Σ w_c)²/Σ w_c² (Satterthwaite), beside the accumulators' spread's P − 1."""
    from probflow.field import as_field
    from probflow.integrate import integrate
    from probflow.likelihood import AugmentedField, ProbeStream, dequantise

    assert DEFAULT_METHOD == "rk4", "the weights below are torchdiffeq's rk4 (3/8 rule)"
    m, x, levels, info = load(spec, None, n)
    xq = dequantise(x, 1, levels, seed=0)[0]
    out = {**info, "images": n, "probes": probes, "rows": []}
    rec = []

    class Recorded(AugmentedField):
        def _hutchinson(self, f, xbar, v):
            r = super()._hutchinson(f, xbar, v)
            rec.append(r.detach().clone())
            return r

    for steps in steps_list:
        g = _grid(m, DEFAULT_METHOD, steps).double()
        rec.clear()
        aug = Recorded(as_field(m), tuple(x.shape[1:]), ProbeStream(n, probes, x[0].numel(), seed=0, channels=0))
        integrate(aug, torch.cat([xq.reshape(n, -1), xq.new_zeros(n, probes)], 1), g, DEFAULT_METHOD)
        h = g[1:] - g[:-1]
        a = (h[:, None] * torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64) / 8).reshape(-1)
        w = torch.stack([a[c] ** 2 * d.var(1) for c, d in enumerate(rec)])  # (C, n)
        p = DEFAULT_PROBES
        out["rows"].append({"steps": steps, "calls": len(rec), "max_dof": (p - 1) * len(rec),
                            "dof": ((p - 1) * w.sum(0) ** 2 / w.pow(2).sum(0)).tolist(),
                            "top_share": (w.max(0).values / w.sum(0)).tolist()})
        print(out["rows"][-1], flush=True)
        _merge(f"dof_{spec}", out)


def _zsummary(z: torch.Tensor) -> dict:
    """z's over (seeds, images): count, mean, sd, the largest |z| and the fractions beyond 2 and 3 (4.6 % and
    0.27 % for a standard normal)."""
    f = z.reshape(-1)
    return {"n": f.numel(), "mean": float(f.mean()), "sd": float(f.std()), "max_abs": float(f.abs().max()),
            "frac_gt2": float((f.abs() > 2).double().mean()), "frac_gt3": float((f.abs() > 3).double().mean()),
            "all": [[round(v, 3) for v in row] for row in z.tolist()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("solvers", "variance", "bpd", "check", "dof"), required=True)
    p.add_argument("--model", default="digits", help="digits, digits32 (unconditional), unet (random-weight stress "
                   "case) or a model folder")
    p.add_argument("--images", default=None, help="a glob of 8-bit images (with a model folder)")
    p.add_argument("--n", type=int, default=8, help="images")
    p.add_argument("--n-check", type=int, default=4, help="images checked against the other divergence")
    p.add_argument("--batch", type=int, default=8, help="images per solve")
    p.add_argument("--probes", type=int, nargs="+", default=[DEFAULT_PROBES],
                   help="check: Hutchinson probes per call (several: one row each against one exact solve)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="check: steps of the grid (both divergences)")
    p.add_argument("--steps-list", type=int, nargs="+", default=[1, 3, DEFAULT_STEPS], help="dof: grids")
    p.add_argument("--seeds", type=int, default=1, help="check: probe seeds against the one exact solve")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.part == "solvers":
        solvers_part(a.model)
    elif a.part == "variance":
        variance_part(a.model, a.n)
    elif a.part == "dof":
        dof_part(a.model, a.n, tuple(a.steps_list))
    elif a.part == "check":
        check_part(a.model, a.images, a.n_check, probes=tuple(a.probes), steps=a.steps, seeds=a.seeds)
    else:
        bpd_part(a.model, a.images, a.n, a.n_check, a.batch)


if __name__ == "__main__":
    main()
