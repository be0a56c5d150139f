"""`probflow likelihood`: uniformly dequantised bits/dim of 8-bit images under an image model, through
`probflow.likelihood.bits_per_dim` (Eq. 12 with its divergence, σ = 0 → σ_max, docs/MATH.md §8).

Before any work it prints what it chose (divergence, levels, solver) and the request's estimated model calls,
VJPs and wall time from a pilot on the first batch, and refuses a request estimated over `--budget-minutes`;
during the solve a progress bar with ETA counts model calls. The defaults (divergence "auto": exact up to
`probflow.likelihood.EXACT_MAX_DIM` dimensions, Hutchinson with fresh probes above; the solver and grid below)
were chosen by measured error on image models: benchmarks/LIKELIHOOD.md."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from probflow.cli.common import add_solver_arguments, load_inputs, make_grid, open_model, say
from probflow.cli.request import bounded, run, solver

_EIGHT_BIT = ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
DEFAULT_METHOD, DEFAULT_STEPS, DEFAULT_GRID = "rk4", 20, "karras"
DEFAULT_BUDGET_MINUTES = 30.0
MAX_BATCH = 4096


def add_likelihood_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="8-bit PNG/JPEG files of the model's size")
    p.add_argument("--divergence", choices=("auto", "exact", "hutchinson"), default="auto",
                   help="auto (default: exact up to probflow.likelihood.EXACT_MAX_DIM dimensions, Hutchinson above), "
                        "exact (D vector–Jacobian products per model call) or Hutchinson's estimator")
    p.add_argument("--probes", type=int, default=None, help="Hutchinson probes per model call, sharing its forward "
                   "pass (default probflow.likelihood.DEFAULT_PROBES; at least 2 for a per-image standard error)")
    p.add_argument("--probe-kind", choices=("rademacher", "gaussian"), default="rademacher")
    p.add_argument("--fixed-probes", action="store_true",
                   help="keep each image's probes fixed along the solve (default: fresh probes at every call)")
    p.add_argument("--draws", type=int, default=1, help="uniform dequantisation draws per image (default 1)")
    p.add_argument("--levels", type=int, default=None,
                   help="grey levels of the data (default: the model's own, e.g. 17 for digits; else 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise and probes (per image)")
    p.add_argument("--batch", type=int, default=8, help="images per solve (default 8)")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background)")
    p.add_argument("--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES,
                   help=f"refuse a request estimated (from a pilot) to take longer than this; adaptive methods stop "
                        f"when they pass it (default {DEFAULT_BUDGET_MINUTES:g}; --no-limits lifts it)")
    add_solver_arguments(p, DEFAULT_METHOD, DEFAULT_STEPS, chunked=False)
    p.set_defaults(grid=DEFAULT_GRID)  # dense near σ = 0, where the divergence changes fastest
    for action in p._actions:
        if action.dest == "grid":
            action.help = f"σ grid for fixed-grid methods, run upwards from 0 (probflow.grids.NAMED); default " \
                          f"{DEFAULT_GRID}"


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
        except Image.DecompressionBombError as e:  # the header declares more pixels than any image we take
            raise ValueError(f"IMAGE: {p}: {e} (a decompression bomb?)") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"IMAGE: {p}: not a readable PNG/JPEG image ({e})") from None
        if mode not in _EIGHT_BIT:
            raise ValueError(f"IMAGE: {p}: mode {mode} is not 8-bit; bits/dim here is defined for 8-bit images")
        if (ih, iw) != (h, w):
            raise ValueError(f"IMAGE: {p}: {iw}×{ih} pixels, expected the model's {w}×{h} (a resized image is not "
                             "the image whose likelihood is asked)")


def model_levels(model) -> int | None:
    """The grey levels of the model's data: its `levels` attribute (digits: 17), else the card's data.levels."""
    lv = getattr(model, "levels", None)
    if lv is None:
        data = (getattr(model, "card", None) or {}).get("data")
        lv = data.get("levels") if isinstance(data, dict) else None
    return lv if isinstance(lv, int) and not isinstance(lv, bool) and lv >= 2 else None


def snap_to_levels(x: torch.Tensor, levels: int, data_range: tuple[float, float], paths: list[str]) -> torch.Tensor:
    """8-bit pixels x = v/255 of the range → the nearest of `levels` levels lo + k·Δ; refuses a pixel further than
    the 8-bit rounding of a level (then the image is not `levels`-level data)."""
    lo, hi = data_range
    k = (x.double() - lo) / (hi - lo) * (levels - 1)
    kr = k.round().clamp(0, levels - 1)
    off = (k - kr).abs().reshape(len(x), -1).amax(1)
    tol = 0.5 * (levels - 1) / 255 + 1e-6
    for i in (off > tol).nonzero().flatten().tolist():
        raise ValueError(f"IMAGE: {paths[i]}: its pixels are not {levels}-level data (a value is {float(off[i]):.2f} "
                         f"levels off the nearest); pass --levels 256 to treat it as 8-bit data")
    return (lo + kr * ((hi - lo) / (levels - 1))).to(x.dtype)


def _check_args(args: argparse.Namespace) -> None:
    limits = not args.no_limits
    for k in ("probes", "draws"):  # each multiplies the rows a solve holds
        bounded(f"--{k}", getattr(args, k), limits)
    bounded("--batch", args.batch, False)  # at least 1
    if args.batch > MAX_BATCH and limits:
        raise ValueError(f"--batch: {args.batch} is above the bound of {MAX_BATCH} (pass --no-limits to lift it)")
    if args.levels is not None and not 2 <= args.levels <= 256:
        raise ValueError(f"--levels: expected an integer from 2 to 256 (8-bit images hold at most 256), "
                         f"got {args.levels}")
    b = args.budget_minutes
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"--budget-minutes: expected a positive number of minutes, got {b!r}")


def run_likelihood(args: argparse.Namespace) -> int:
    """Per-image bits/dim and standard error (tab-separated, stdout) and their mean ± standard error."""
    from tqdm import tqdm

    from probflow.likelihood import BudgetError, bits_per_dim, choose_divergence, estimate
    from probflow.likelihood.core import EXACT_MAX_DIM, probe_count

    s, rn = solver(args, DEFAULT_METHOD, DEFAULT_STEPS), run(args)  # the request: checked once (cli.request)
    _check_args(args)
    model = open_model(rn, spread=False).model
    if getattr(model, "autoencoder", None) is not None:
        raise ValueError(f"--model: {rn.model} is a latent diffusion model (vae/): the ODE gives the density of its "
                         "VAE latents, not of images (the VAE has no exact density); bits/dim of images is not "
                         "defined here")
    _check_files(args.images, tuple(model.sample_shape[1:]))
    x = load_inputs(rn, model, args.images, "IMAGE", args.invert, rn.device)
    data_range = getattr(model, "data_range", (-1.0, 1.0))
    own = model_levels(model)
    levels = args.levels or own or 256
    say(f"levels: {levels} ({'--levels' if args.levels else 'the model' if own else '8-bit default'})")
    x = snap_to_levels(x, levels, data_range, args.images)
    if rn.precision is not None:  # the one precision path (Precision.field), as the other commands
        model, x = rn.precision.field(model), rn.precision.state_tensor(x)
    method = s.method
    sigmas = make_grid(s, model).flip(0).to(rn.device)  # increasing: 0 … σ_max
    d = int(x[0].numel())
    kind = choose_divergence(args.divergence, d)
    probes = probe_count(args.probes, kind)
    why = f"D = {d} {'≤' if d <= EXACT_MAX_DIM else '>'} {EXACT_MAX_DIM}" if args.divergence == "auto" else "asked"
    say(f"divergence: {kind} ({why})" + (f"; {probes} probe(s) per call, {'fixed' if args.fixed_probes else 'fresh'}"
                                          if kind == "hutchinson" else ""))
    first = bits_dequantised(x[:args.batch], levels, data_range, args)
    cost = estimate(model, first, sigmas, method, divergence=kind, probes_per_sample=probes, batch=len(first))
    cost.samples = len(x) * args.draws
    say(f"estimate: {cost.describe()}")
    budget = None if not rn.limits else 60 * args.budget_minutes
    if budget is not None and cost.seconds is not None and cost.seconds > budget:
        raise ValueError(f"--budget-minutes: the request is estimated at {cost.seconds / 60:.1f} min, over the budget "
                         f"of {args.budget_minutes:g}; raise --budget-minutes, or lower --steps, --probes, --draws or "
                         "the number of images")
    total = None if cost.evaluations is None else cost.evaluations * math.ceil(len(x) / args.batch)
    bpd, se, nfe, calls, secs = [], [], [], 0, 0.0
    with tqdm(total=total, desc=f"likelihood ({method.name}, {kind})", unit="call", file=sys.stderr,
              disable=rn.quiet, leave=False, mininterval=1.0) as bar:
        for lo in range(0, len(x), args.batch):
            try:
                r = bits_per_dim(model, x[lo:lo + args.batch], sigmas, method, levels=levels, data_range=data_range,
                                 draws=args.draws, seed=args.seed, first_index=lo, rtol=s.rtol, atol=s.atol,
                                 divergence=kind, probes_per_sample=probes, probe_kind=args.probe_kind,
                                 fresh_probes=not args.fixed_probes, progress=lambda *_: bar.update(1),
                                 budget_seconds=None if budget is None or total is not None else max(budget - secs, 1))
            except BudgetError as e:
                raise ValueError(f"--budget-minutes: {str(e).split(': ', 1)[1]}") from None
            bpd.append(r.bpd.cpu())
            se.append(r.bpd_stderr.cpu())
            nfe.append(r.likelihood.nfe)
            calls, secs = calls + r.likelihood.nfe, secs + r.likelihood.seconds
    _report(args, torch.cat(bpd), torch.cat(se), nfe, calls, secs, kind, method.name, probes)
    return 0


def bits_dequantised(x: torch.Tensor, levels: int, data_range, args: argparse.Namespace) -> torch.Tensor:
    """The first batch as its solve sees it: every image's dequantisation draws, image-major."""
    from probflow.likelihood import dequantise

    xq = dequantise(x, args.draws, levels, data_range, args.seed)  # (R, B, *S): a solve has B·R rows
    return xq.transpose(0, 1).reshape(-1, *x.shape[1:])


def _report(args, bpd, se, nfe, calls, secs, kind, method, probes) -> None:
    for path, b, s in zip(args.images, bpd.tolist(), se.tolist()):
        print(f"{path}\t{b:.4f}\t± " + ("n/a (one probe has no spread; use --probes 2 or more)" if math.isnan(s)
                                          else f"{s:.4f}"))
    n = len(bpd)
    spread = float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    est = float(se.pow(2).sum().sqrt() / n)
    per_image = "NFE " + (f"{nfe[0]}" if len(set(nfe)) == 1 else f"{min(nfe)}–{max(nfe)}") + " per image"
    batched = f" ({calls} batched model calls in all)" if calls != nfe[0] else ""
    est_note = "0: exact divergence" if kind == "exact" else f"{est:.4f} from {probes} Hutchinson probe(s) per call"
    print(f"mean {float(bpd.mean()):.4f} ± {spread:.4f} bits/dim (standard error over {n} image(s); the estimator's "
          f"own standard error of this mean {est_note}; {args.draws} dequantisation draw(s), {kind} divergence, "
          f"{method}, {per_image}{batched}, {secs / n:.2f} s per image)")
