"""`probflow likelihood`: uniformly dequantised bits/dim of 8-bit images under an image model, through
`probflow.likelihood.bits_per_dim` (Eq. 12 with its divergence, σ = 0 → σ_max, MATH.md §8).

Default solver: rk4 on the 25-step Karras grid run upwards (100 NFE); on the digits model it agrees with dopri5 at
rtol = atol = 1e-3 (212 NFE) to 0.002 bits/dim, while the DDIM (uniform-in-t) grid, sparse near σ = 0, is off by
0.1–1 bit/dim at 25–100 steps. The exact divergence costs D VJPs per evaluation; `--divergence hutchinson` costs one
per probe, at the price of a per-image error of order a nat."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from probflow.cli.common import add_solver_arguments, load_image_model, load_inputs, make_grid, start
from probflow.cli.request import bounded, run, solver

_EIGHT_BIT = ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr")


def add_likelihood_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="8-bit PNG/JPEG files of the model's size")
    p.add_argument("--divergence", choices=("exact", "hutchinson"), default="exact",
                   help="exact (D vector–Jacobian products per evaluation; default) or Hutchinson's estimator")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per image (default 1)")
    p.add_argument("--probe-kind", choices=("rademacher", "gaussian"), default="rademacher")
    p.add_argument("--draws", type=int, default=1, help="uniform dequantisation draws per image (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise and probes (per image)")
    p.add_argument("--batch", type=int, default=8, help="images per solve (default 8)")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background)")
    add_solver_arguments(p, "rk4", 25, chunked=False)
    p.set_defaults(grid="karras")  # dense near σ = 0, where the divergence changes fastest
    for action in p._actions:
        if action.dest == "grid":
            action.help = "σ grid for fixed-grid methods, run upwards from 0 (probflow.grids.NAMED); default karras"


def _check_files(paths: list[str], size: tuple[int, int]) -> None:
    """8-bit images of the model's size only: a resized or requantised image is not the image asked about."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"IMAGE: {p}: no such image file")
        try:
            with Image.open(p) as im:
                mode, (iw, ih) = im.mode, im.size
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"IMAGE: {p}: not a readable PNG/JPEG image ({e})") from None
        if mode not in _EIGHT_BIT:
            raise ValueError(f"IMAGE: {p}: mode {mode} is not 8-bit; bits/dim here is defined for 8-bit images")
        if (ih, iw) != (h, w):
            raise ValueError(f"IMAGE: {p}: {iw}×{ih} pixels, expected the model's {w}×{h} (a resized image is not "
                             "the image whose likelihood is asked)")


def run_likelihood(args: argparse.Namespace) -> int:
    """Per-image bits/dim (tab-separated, stdout) and their mean ± standard error over the images."""
    from tqdm import tqdm

    from probflow.likelihood import bits_per_dim

    s, rn = solver(args, "rk4", 25), run(args)  # the request: arguments checked once (probflow.cli.request)
    for k in ("probes", "draws"):  # each multiplies the batch the solve holds
        bounded(f"--{k}", getattr(args, k), rn.limits)
    bounded("--batch", args.batch, False)
    start(rn, spread=False)
    model = load_image_model(rn.model, rn.device, rn.limits)
    _check_files(args.images, tuple(model.sample_shape[1:]))
    x = load_inputs(rn, model, args.images, "IMAGE", args.invert, rn.device)
    method = s.method
    sigmas = make_grid(s, model).flip(0).to(rn.device)  # increasing: 0 … σ_max
    data_range = getattr(model, "data_range", (-1.0, 1.0))
    if rn.precision is not None:  # the one precision path (Precision.field), as the other commands
        model, x = rn.precision.field(model), rn.precision.state_tensor(x)
    bpd, nfe, vjps = [], 0, 0
    with tqdm(total=len(x), desc=f"likelihood ({method.name}, {args.divergence})", unit="img", file=sys.stderr,
              disable=True if args.quiet else None, leave=False) as bar:
        for lo in range(0, len(x), args.batch):
            r = bits_per_dim(model, x[lo:lo + args.batch], sigmas, method, levels=256, data_range=data_range,
                             draws=args.draws, seed=args.seed, first_index=lo, rtol=s.rtol, atol=s.atol,
                             divergence=args.divergence, probes_per_sample=args.probes, probe_kind=args.probe_kind)
            bpd.append(r.bpd.cpu())
            nfe, vjps = max(nfe, r.likelihood.nfe), vjps + r.likelihood.vjps  # NFE per image's path
            bar.update(len(r.bpd))
    bpd = torch.cat(bpd)
    for path, b in zip(args.images, bpd.tolist()):
        print(f"{path}\t{b:.4f}")
    se = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    print(f"mean {float(bpd.mean()):.4f} ± {se:.4f} bits/dim (standard error over {len(bpd)} image(s); "
          f"{args.draws} dequantisation draw(s), {args.divergence} divergence, {method.name}, NFE {nfe}, "
          f"VJPs {vjps})")
    return 0
