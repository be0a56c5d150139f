"""Image-scale rows of the inversion table (`python benchmarks/inversion.py --suite image …`, the options in
benchmarks/inversion.py's docstring): exact latents on diffusers UNet2DModels with self-attention at 3×32×32 and
3×64×64 (random weights built here) and on the trained class-conditional digits32, each cell in fresh processes."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import probflow
from probflow import grids
from probflow.field import DDIMField

# `--suite image`: diffusers UNet2DModels with self-attention at 3×32×32 and 3×64×64, random weights built here.
# "prior+unet": ε = ε of N(0, 0.25·I) (exact) + 0.1 × the random UNet's output (t = 250·ln σ + 500): an ε that grows
# with x at high σ as a trained one does, with attention, GroupNorm and SDPA in its residual. "unet": the random
# UNet alone (its GroupNorm makes ε scale-invariant in x, so the encode trajectory never reaches the noise scale;
# the rows record what encode_exact says there). "digits32": the shipped trained model (`_digits32_case`). Each row
# runs in a fresh process (peak RSS by ru_maxrss), first the decoder alone (sampling the same batch), then
# encode_exact + verification.

IMAGE_NETS = {32: (64, 128, 256), 64: (64, 128, 256, 256)}  # block_out_channels; layers_per_block 2


def _unet(size: int, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    ch = IMAGE_NETS[size]
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(ch) - 1)
    up = ("AttnUpBlock2D",) * (len(ch) - 1) + ("UpBlock2D",)
    return diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=2,
                                 block_out_channels=ch, down_block_types=down, up_block_types=up).eval()


class _ImageEps(torch.nn.Module):
    """The network in the row's dtype (float64 rows run it in float64: a float32 network cannot give a float64
    round trip, and encode_exact says so)."""

    def __init__(self, unet, kind: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.unet, self.kind = unet.to(dtype), kind
        self.model_dtype = dtype

    def forward(self, x, sigma):
        with torch.no_grad():
            t = (250 * torch.log(sigma.double().clamp_min(1e-3)) + 500).float().reshape(1).expand(x.shape[0])
            e = self.unet(x.to(self.model_dtype), t).sample.to(x.dtype)
        if self.kind == "unet":
            return e
        xbar = x * torch.sqrt(1 + sigma**2)
        return xbar * sigma / (0.25 + sigma**2) + 0.1 * e


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n smooth RGB test images in [−0.9, 0.9]: sums of 4 random low-frequency cosines per channel."""
    import math

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.zeros(n, 3, size, size, dtype=torch.float64)
    for i in range(n):
        for c in range(3):
            for _ in range(4):
                fx, fy, ph = (torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([3., 3., 6.28])).tolist()
                out[i, c] += torch.cos(2 * math.pi * (fx * xx + fy * yy) + ph) / 4
    return 0.9 * out.clamp(-1, 1)


def _image_row(q, size, kind, method, steps, dtype, n, what, net_seed=0, image_seed=0):
    """In a fresh process: decode (what = "decode") or encode_exact (what = "encode") n images one at a time
    (prior+unet / unet: the network of `net_seed`, the images of `image_seed`)."""
    import resource

    from probflow.inversion import InversionError, encode_exact

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    if kind == "digits32":
        models, x0, quantum = _digits32_case(n, dt)
    else:
        net = _ImageEps(_unet(size, net_seed), kind, dt)
        models, x0, quantum = [net] * n, _smooth_images(n, size, image_seed).to(dt), None
    g = grids.named("quadratic_open", probflow.schedules.linear(), steps)
    out = {"per_image": []}
    for i, model in enumerate(models):
        f = DDIMField(model, dt)
        t0 = time.time()
        if what == "decode":
            probflow.decode(f, x0[i:i + 1], g, method)
            out["per_image"].append({"nfe": f.nfe, "seconds": time.time() - t0})
            continue
        try:
            enc = encode_exact(f, x0[i:i + 1], g, method, quantum=quantum)
        except (InversionError, ValueError) as e:
            out["per_image"].append({"failed": str(e)[:240], "nfe": f.nfe, "seconds": time.time() - t0})
            continue
        sec = time.time() - t0
        back = probflow.decode(DDIMField(model, dt), enc.x, g, method).x
        out["per_image"].append({"nfe": enc.nfe, "nfe_solve": enc.info["nfe_solve"], "seconds": sec,
                                 "mse": float(((back.double() - x0[i:i + 1].double()) ** 2).mean()),
                                 "png_identical": _png_identical(back, x0[i:i + 1]), "exact": enc.info["exact"]})
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put(out)


def _digits32_case(n: int, dt: torch.dtype):
    """The trained class-conditional digits32 (1×32×32, attention, GroupNorm) at w = 1, one model per image with
    the image's own label; its first n held-out test images as 8-bit PNG pixels; quantum 2/255 (the CLI's)."""
    from probflow.digits.data32 import load_split32
    from probflow.io.images import from_uint8, to_uint8
    from probflow.models import load

    split = load_split32()
    x0 = from_uint8(to_uint8(split["x_test"][:n]), dtype=torch.float64).to(dt)
    models = [load("digits32", class_label=int(y), guidance=1.0) for y in split["y_test"][:n]]
    return models, x0, 2 / 255


def _png_identical(x: torch.Tensor, ref: torch.Tensor) -> bool:
    from probflow.io.images import to_uint8

    return bool((to_uint8(x.double()) == to_uint8(ref.double())).all())


def _in_process(*args) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_image_row, args=(q, *args))
    p.start()
    res = q.get()
    p.join()
    return res


def image_suite(argv: list[str]) -> int:
    """`--suite image`: the image-scale rows (markdown on stdout and, with --out FILE, JSON)."""
    ap = argparse.ArgumentParser(description="image-scale exact inversion rows")
    ap.add_argument("--suite")
    ap.add_argument("--sizes", default="32")
    ap.add_argument("--kinds", default="prior+unet,unet")
    ap.add_argument("--methods", default="euler,dpmpp_2m")
    ap.add_argument("--steps", default="20")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--net-seed", type=int, default=0, help="random UNet's seed (0: the report's; 1: tuning)")
    ap.add_argument("--image-seed", type=int, default=0, help="smooth images' seed (0: the report's; 101: tuning)")
    a = ap.parse_args(argv)
    rows = []
    print(TABLE_HEAD, flush=True)
    for size in (int(v) for v in a.sizes.split(",")):
        for kind in a.kinds.split(","):
            for method in a.methods.split(","):
                for steps in (int(v) for v in a.steps.split(",")):
                    for dtype in a.dtypes.split(","):
                        seeds = (a.net_seed, a.image_seed)
                        dec = _in_process(size, kind, method, steps, dtype, 1, "decode", *seeds)
                        enc = _in_process(size, kind, method, steps, dtype, a.n, "encode", *seeds)
                        rows.append(_image_md(size, kind, method, steps, dtype, dec, enc))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def _image_md(size, kind, method, steps, dtype, dec, enc) -> dict:
    row = {"size": size, "net": kind, "method": method, "steps": steps, "dtype": dtype, "decode": dec, "encode": enc}
    print(image_line(row), flush=True)
    return row


TABLE_HEAD = ("| net | size | decoder | steps | dtype | round-trip MSE (worst) | encode ÷ decode calls (median, "
              "worst) | peak RSS encode ÷ sample | encode s ÷ decode s (image 0) | note |\n" + "|---" * 10 + "|")


def ratios(row: dict) -> list[float]:
    """Encode ÷ decode model calls per image that has a latent (verification and any polish included)."""
    d = row["decode"]["per_image"][0]["nfe"]
    return [r["nfe"] / d for r in row["encode"]["per_image"] if "failed" not in r]


def image_line(row: dict) -> str:
    """One markdown row of the image table."""
    dec, enc, kind = row["decode"], row["encode"], row["net"]
    d = dec["per_image"][0]
    ok = [r for r in enc["per_image"] if "failed" not in r]
    fail = [r for r in enc["per_image"] if "failed" in r]
    rs = ratios(row)
    mse = f"{max(r['mse'] for r in ok):.1e}" if ok else "—"
    rat = f"{statistics.median(rs):.1f}, {max(rs):.1f}" if ok else "—"
    tr = f"{enc['per_image'][0]['seconds'] / d['seconds']:.1f}" if "failed" not in enc["per_image"][0] else "—"
    note = f"{len(fail)}/{len(enc['per_image'])} failed: {fail[0]['failed'][:150]}" if fail else ""
    if kind == "digits32":  # 8-bit images: PNG identity and how many latents are exact to round-off
        note = (f"PNG identical {sum(r['png_identical'] for r in ok)}/{len(ok)}, round-off "
                f"{sum(r['exact'] == 'round-off' for r in ok)}/{len(ok)}" + ("; " + note if note else ""))
    shape = "1×32×32" if kind == "digits32" else f"3×{row['size']}×{row['size']}"
    return (f"| {kind} | {shape} | {row['method']} | {row['steps']} | {row['dtype']} | {mse} | {rat} | "
            f"{enc['rss_mb'] / dec['rss_mb']:.2f} ({enc['rss_mb']:.0f} / {dec['rss_mb']:.0f} MB) | {tr} | {note} |")
