"""Images in and out of the model's variable x (data range [−1, 1]), and the image commands of the CLI.

Pixels v ∈ {0 … 255} map to x = lo + (hi − lo)·v/255 with (lo, hi) the model's data range (default
(−1, 1)), and back by rounding. PNG/JPEG, grayscale or RGB, are read with Pillow (which ships with
matplotlib); an image of the wrong mode or size is converted or resized with a printed message.
Every file written here is written atomically (a temporary file in the same folder, then `os.replace`)
and an existing file is never overwritten unless `force`.

CLI commands (each `add_<name>_arguments` / `run_<name>` here): `sample`, `encode`, `decode`,
`interpolate`. They share the Python API's code path: `probflow.sample/encode/decode/interpolate`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from probflow.atomic import atomic_write, check_writable

__all__ = ["load_images", "save_grid", "save_images", "to_uint8", "from_uint8"]

DataRange = tuple[float, float]


def _say(msg: str) -> None:
    print(f"probflow: {msg}", file=sys.stderr)


def to_uint8(x: Tensor, data_range: DataRange = (-1.0, 1.0)) -> np.ndarray:
    """x (…, C, H, W) in the model's range → uint8 (…, H, W, C), clamped and rounded to nearest."""
    lo, hi = data_range
    v = ((x.detach().double().cpu() - lo) / (hi - lo)).clamp(0, 1) * 255.0
    return torch.round(v).to(torch.uint8).movedim(-3, -1).numpy()


def from_uint8(a: np.ndarray, data_range: DataRange = (-1.0, 1.0), dtype: torch.dtype = torch.float64) -> Tensor:
    """uint8 (…, H, W, C) → x (…, C, H, W) = lo + (hi − lo)·v/255."""
    lo, hi = data_range
    v = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64).movedim(-1, -3)
    return (lo + (hi - lo) * v / 255.0).to(dtype)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size: expected a positive int or (height, width), got {size!r}")
    return hw


def load_images(
    paths: Sequence[str | os.PathLike],
    size: int | Sequence[int],
    channels: int = 1,
    *,
    data_range: DataRange = (-1.0, 1.0),
    invert: bool = False,
    dtype: torch.dtype = torch.float64,
    verbose: bool = True,
    name: str = "images",
) -> Tensor:
    """Read PNG/JPEG files into a batch x of shape (B, channels, H, W) in the model's data range.

    A file in another mode (RGB for a grayscale model, grayscale for RGB, RGBA, palette, 16-bit) is
    converted; one of another size is centre-cropped to the model's aspect ratio and resized (Lanczos);
    each with a message on stderr. `invert` maps v → 255 − v first (black-on-white drawings for a model
    trained on white-on-black digits). Unreadable, missing or non-image files raise ValueError /
    FileNotFoundError naming the argument `name` and the path.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise ValueError(f"{name}: expected at least one image file")
    h, w = _size(size)
    mode = "L" if channels == 1 else "RGB"
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"{name}: {p}: no such image file")
        try:
            with Image.open(p) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{name}: {p}: not a readable PNG/JPEG image ({e})") from None
        if img.mode != mode:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "P", "PA") and "transparency" in img.info or img.mode in ("RGBA", "LA"):
                img = img.convert("RGBA")  # alpha composited onto black, then converted
                bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(bg, img)
            if img.mode != mode:
                if verbose:
                    _say(f"{p}: converted {img.mode} → {'grayscale (L)' if mode == 'L' else 'RGB'} for a "
                         f"{channels}-channel model")
                img = img.convert(mode)
        if img.size != (w, h):
            W0, H0 = img.size  # noqa: N806
            target = w / h
            if abs(W0 / H0 - target) > 1e-9:  # centre-crop to the model's aspect ratio
                if W0 / H0 > target:
                    cw = round(H0 * target)
                    box = ((W0 - cw) // 2, 0, (W0 - cw) // 2 + cw, H0)
                else:
                    ch = round(W0 / target)
                    box = (0, (H0 - ch) // 2, W0, (H0 - ch) // 2 + ch)
                img = img.crop(box)
            if verbose:
                crop = f" (centre-cropped to {img.size[0]}×{img.size[1]})" if img.size != (W0, H0) else ""
                _say(f"{p}: resized {W0}×{H0} → {w}×{h}{crop} to the model's input size")
            img = img.resize((w, h), Image.Resampling.LANCZOS)
        a = np.asarray(img, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        if invert:
            a = 255 - a
        out.append(a)
    return from_uint8(np.stack(out), data_range, dtype)


def _grid_array(x: Tensor, nrow: int | None, scale: int, pad: int, data_range: DataRange) -> np.ndarray:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"x: expected a tensor of shape (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected 1 or 3 channels, got {x.shape[1]}")
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or Inf")
    B, C, H, W = x.shape  # noqa: N806
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow: expected a positive integer, got {nrow!r}")
    ncol_rows = math.ceil(B / nrow)
    a = to_uint8(x, data_range)  # (B, H, W, C)
    if scale > 1:
        a = a.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = H * scale, W * scale
    grid = np.full((ncol_rows * (h + pad) + pad, min(B, nrow) * (w + pad) + pad, C), 128, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = a[i]
    return grid


def save_grid(
    x: Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    force: bool = False,
    *,
    scale: int | None = None,
    pad: int = 2,
    data_range: DataRange = (-1.0, 1.0),
) -> Path:
    """Write a batch x (B, C, H, W) in the model's data range as one PNG grid, `nrow` images per row
    (default ⌈√B⌉), separated by `pad` grey pixels. `scale` enlarges each image by pixel repetition
    (default: the smallest factor making it at least 32 px, so 8×8 digits are visible; scale=1 keeps
    pixels exact). Atomic; refuses to overwrite an existing file unless `force`."""
    from PIL import Image

    if scale is None:
        scale = max(1, math.ceil(32 / min(x.shape[-2:]))) if isinstance(x, Tensor) and x.ndim == 4 else 1
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: expected a positive integer, got {scale!r}")
    grid = _grid_array(x, nrow, scale, pad, data_range)
    img = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid, "L" if grid.shape[2] == 1 else "RGB")
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), force, name="--out")


def save_images(
    x: Tensor,
    folder: str | os.PathLike,
    force: bool = False,
    *,
    names: Sequence[str] | None = None,
    data_range: DataRange = (-1.0, 1.0),
) -> list[Path]:
    """Write each image of x (B, C, H, W) as its own PNG at native size (pixels exact) in `folder`
    (created if missing), named `names[i]` (default 0000.png, 0001.png, …). Refuses, before writing
    anything, if any target exists and not `force`."""
    from PIL import Image

    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected a tensor of shape (B, 1 or 3, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if names is None:
        names = [f"{i:04d}.png" for i in range(x.shape[0])]
    names = [n if n.lower().endswith(".png") else f"{n}.png" for n in names]
    if len(names) != x.shape[0] or len(set(names)) != len(names):
        raise ValueError(f"names: expected {x.shape[0]} distinct file names, got {list(names)}")
    targets = [folder / n for n in names]
    clash = [str(t) for t in targets if t.exists()]
    if clash and not force:
        raise FileExistsError(f"--out: {', '.join(clash[:3])}{' …' if len(clash) > 3 else ''} exist(s); pass "
                              f"--force (force=True) to overwrite")
    folder.mkdir(parents=True, exist_ok=True)
    a = to_uint8(x, data_range)
    for t, ai in zip(targets, a):
        img = Image.fromarray(ai[:, :, 0] if ai.shape[2] == 1 else ai, "L" if ai.shape[2] == 1 else "RGB")
        atomic_write(t, lambda tmp, img=img: img.save(tmp, format="PNG"), force, name="--out")
    return targets


# ---------------------------------------------------------------- the image commands of the CLI


def load_image_model(spec: str = "digits"):
    """An image ε-model by name or folder: "digits" (the shipped model), a folder holding
    digits.safetensors + digits.json (`probflow train digits --out`), or a local diffusers folder
    (UNet2DModel + scheduler config). Must have a sample shape (C, H, W)."""
    from probflow import digits

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "digits.safetensors").is_file():
            model = digits.load_model(path)
        else:
            from probflow.adapters import from_diffusers

            model = from_diffusers(path)
    elif spec == "digits":
        from probflow import models

        model = models.load("digits")
    else:
        raise ValueError(f"--model: {spec!r} is neither 'digits' nor an existing folder (a digits checkpoint "
                         "folder or a local diffusers folder)")
    shape = getattr(model, "sample_shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"--model: {spec!r} is not an image model (no (C, H, W) sample shape)")
    return model


class _Progress:
    """The ε-model with a tqdm bar that advances at each evaluation (one NFE)."""

    def __init__(self, model, bar) -> None:
        self.model, self.bar = model, bar

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.model(x, sigma)
        self.bar.update(1)
        return out


def _solve(args: argparse.Namespace, model, what: str, x: Tensor, sigmas: Tensor, state=None):
    """Run probflow.sample/encode/decode (`what`) with a progress bar; the one code path of the API."""
    import probflow
    from probflow.field import DDIMField
    from probflow.solvers import get_method

    m = get_method(args.method)
    total = None if m.adaptive else (len(sigmas) - 1) * m.stages + (1 if m.reversible and state is None else 0)
    from tqdm import tqdm

    with tqdm(total=total, desc=f"{what} ({args.method})", unit="NFE", file=sys.stderr,
              disable=True if getattr(args, "quiet", False) else None, leave=False) as bar:
        field = DDIMField(_Progress(model, bar), model_dtype=getattr(model, "model_dtype", None))
        fn = {"sample": probflow.sample, "encode": probflow.encode, "decode": probflow.decode}[what]
        return fn(field, x, sigmas, m.name, rtol=args.rtol, atol=args.atol, state=state)


def _grid(model, method: str, steps: int) -> Tensor:
    """The sampling grid: DDIM's trailing σ grid with `steps` steps for fixed-grid methods, [σ_max, 0] for
    adaptive ones (they choose their own steps)."""
    from probflow import grids
    from probflow.solvers import get_method

    if get_method(method).adaptive:
        return torch.tensor([model.schedule.sigma_max, 0.0], dtype=torch.float64)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {steps!r}")
    return grids.ddim(model.schedule, steps)


def _add_solver_arguments(p: argparse.ArgumentParser, method: str | None, steps: int | None) -> None:
    p.add_argument("--model", default="digits",
                   help="'digits' (default), a digits checkpoint folder, or a local diffusers folder")
    p.add_argument("--method", default=method, help=f"solver name (probflow.solvers.METHODS); default {method}")
    p.add_argument("--steps", type=int, default=steps, help=f"steps of the DDIM σ grid (fixed-grid methods); "
                   f"default {steps}")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance (adaptive methods); default 1e-6")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (adaptive methods); default 1e-6")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_solver_args(args: argparse.Namespace) -> None:
    from probflow.solvers import get_method

    try:
        get_method(args.method)
    except ValueError as e:
        raise ValueError(f"--method: {e}") from None
    for k in ("rtol", "atol"):
        v = getattr(args, k)
        if not (isinstance(v, float) and math.isfinite(v) and v > 0):
            raise ValueError(f"--{k}: expected a positive number, got {v!r}")


def _load_inputs(args: argparse.Namespace, model, paths: Sequence[str], name: str) -> Tensor:
    c, h, w = model.sample_shape
    return load_images(paths, (h, w), c, data_range=getattr(model, "data_range", (-1.0, 1.0)),
                       invert=args.invert, name=name)


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="PNG file for the grid of samples")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (per-sample streams; default 0)")
    _add_solver_arguments(p, "rk4", 25)


def run_sample(args: argparse.Namespace) -> int:
    """`probflow sample`: n samples x_0 from seeded noise x_T down Eq. 12, written as one PNG grid."""
    import probflow

    _check_solver_args(args)
    if args.n < 1:
        raise ValueError(f"--n: expected a positive number of samples, got {args.n}")
    check_writable(args.out, args.force, "--out")
    model = load_image_model(args.model)
    sig = _grid(model, args.method, args.steps)
    z = probflow.noise(args.n, tuple(model.sample_shape), args.seed)
    sol = _solve(args, model, "sample", z, sig)
    save_grid(sol.x, args.out, force=args.force, data_range=getattr(model, "data_range", (-1.0, 1.0)))
    print(f"wrote {args.out}: {args.n} samples, {args.method}, NFE {sol.nfe}")
    return 0


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files (grayscale or RGB)")
    p.add_argument("--out", required=True, help="latent file to write (.safetensors)")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background); "
                   "decode inverts back")
    _add_solver_arguments(p, "reversible_heun", 50)


def run_encode(args: argparse.Namespace) -> int:
    """`probflow encode`: images x_0 → latents x_T up the flipped grid of Eq. 12, with provenance."""
    from probflow.latents import save_latents

    _check_solver_args(args)
    check_writable(args.out, args.force, "--out")
    model = load_image_model(args.model)
    x0 = _load_inputs(args, model, args.images, "IMAGE")
    sig = _grid(model, args.method, args.steps)
    sol = _solve(args, model, "encode", x0, sig)
    state = sol.state.tensors() if hasattr(sol.state, "tensors") else None
    save_latents(args.out, sol.x, sig, model, method=args.method, nfe=sol.nfe, rtol=args.rtol, atol=args.atol,
                 state=state, sources=[Path(p).name for p in args.images],
                 data_range=getattr(model, "data_range", (-1.0, 1.0)), force=args.force,
                 extra={"invert": json.dumps(bool(args.invert))})
    print(f"wrote {args.out}: {len(args.images)} latent(s) of shape {tuple(sol.x.shape[1:])}, {args.method}, "
          f"NFE {sol.nfe}{', with its reversible state' if state else ''}")
    return 0


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("latents", help="latent file written by `probflow encode`")
    p.add_argument("--out", required=True, help="folder for the decoded PNGs (one per latent)")
    _add_solver_arguments(p, None, None)
    p.set_defaults(rtol=None, atol=None)
    for a in p._actions:
        if a.dest in ("method", "steps", "rtol", "atol"):
            a.help = f"{a.help.split(';')[0]}; default: as the latents were encoded"


def run_decode(args: argparse.Namespace) -> int:
    """`probflow decode`: latents x_T → images x_0 down Eq. 12; exact inverse of encode for a reversible
    method on its own grid and state."""
    from probflow.latents import check_compatible, load_latents
    from probflow.reversible import HeunState
    from probflow.solvers import get_method

    lf = load_latents(args.latents, "latents")
    meta = lf.meta
    same_method = args.method in (None, meta["method"])
    args.method = args.method or meta["method"]
    for k in ("rtol", "atol"):
        if getattr(args, k) is None:
            v = meta.get(k, "None")
            setattr(args, k, float(v) if v not in ("None", "") else 1e-6)
    _check_solver_args(args)
    model = load_image_model(args.model)
    problems = check_compatible(lf, model, args.force, "latents")
    for msg in problems:
        _say(f"warning: decoding latents made with {msg} (--force)")
    if tuple(lf.latents.shape[1:]) != tuple(model.sample_shape):
        raise ValueError(f"latents: shape {tuple(lf.latents.shape[1:])} does not fit the model's input "
                         f"{tuple(model.sample_shape)}")
    if args.steps is not None or get_method(args.method).adaptive:
        sig = _grid(model, args.method, args.steps)
    elif not same_method and get_method(meta["method"]).adaptive:
        raise ValueError(f"--steps: the latents were encoded with the adaptive {meta['method']}; give the number of "
                         f"steps for {args.method}")
    else:
        sig = lf.sigmas
    state = None
    if get_method(args.method).reversible and same_method and args.steps is None:
        if not lf.state:
            raise ValueError(f"latents: {args.latents} was made with the reversible {meta['method']} but holds no "
                             "partner state; it cannot be inverted exactly (pass another --method to solve "
                             "the ODE from the latents)")
        state = HeunState.from_tensors(lf.state)
    elif get_method(args.method).reversible:
        _say(f"note: {args.method} without the encode's own state and grid is an ordinary solve, not an exact inverse")
    sources = lf.sources
    names = [Path(s).stem + ".png" for s in sources] if len(sources) == len(lf.latents) else None
    if names is not None and len(set(names)) != len(names):
        names = None
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out: {folder} exists and is not a folder")
    targets = [folder / n for n in (names or [f"{i:04d}.png" for i in range(len(lf.latents))])]
    clash = [str(t) for t in targets if t.exists()]
    if clash and not args.force:
        raise FileExistsError(f"--out: {', '.join(clash[:3])} exist(s); pass --force to overwrite")
    sol = _solve(args, model, "decode", lf.latents, sig, state)
    lo, hi = json.loads(meta.get("data_range", "[-1, 1]"))
    x = (lo + hi) - sol.x if json.loads(meta.get("invert", "false")) else sol.x  # back to the inputs' polarity
    paths = save_images(x, folder, args.force, names=names, data_range=(lo, hi))
    print(f"wrote {len(paths)} image(s) to {folder}/ ({args.method}, NFE {sol.nfe}"
          f"{', exact inverse' if state is not None else ''})")
    return 0


def add_interpolate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="first image (PNG/JPEG)")
    p.add_argument("b", metavar="B", help="second image (PNG/JPEG)")
    p.add_argument("--frames", type=int, default=8, help="frames from A to B, ends included (default 8)")
    p.add_argument("--kind", choices=["slerp", "lerp"], default="slerp", help="latent mixing (default slerp)")
    p.add_argument("--out", required=True, help="PNG strip to write")
    p.add_argument("--invert", action="store_true", help="use 255 − pixel (dark digits on a light background)")
    _add_solver_arguments(p, "reversible_heun", 50)


def run_interpolate(args: argparse.Namespace) -> int:
    """`probflow interpolate`: encode A and B, mix their latents (slerp by default) at `frames` weights,
    decode every frame, write the strip. With a reversible method the end frames are decoded with the
    encode's state (they reproduce A and B exactly); the inner frames are ordinary solves from the mixed
    latents."""
    from probflow.flows import lerp, slerp
    from probflow.solvers import get_method

    _check_solver_args(args)
    if args.frames < 2:
        raise ValueError(f"--frames: expected an integer >= 2, got {args.frames}")
    check_writable(args.out, args.force, "--out")
    model = load_image_model(args.model)
    x0 = torch.cat([_load_inputs(args, model, [args.a], "A"), _load_inputs(args, model, [args.b], "B")])
    sig = _grid(model, args.method, args.steps)
    enc = _solve(args, model, "encode", x0, sig)
    w = torch.linspace(0, 1, args.frames, dtype=torch.float64)
    flat = enc.x.reshape(2, 1, -1)  # mix over all pixels of one latent (B = 1, D)
    z = (slerp if args.kind == "slerp" else lerp)(flat[0], flat[1], w).reshape(args.frames, *x0.shape[1:])
    frames = torch.empty_like(z)
    nfe = enc.nfe
    if get_method(args.method).reversible:
        ends = _solve(args, model, "decode", enc.x, sig, enc.state)
        frames[0], frames[-1] = ends.x[0], ends.x[1]
        nfe += ends.nfe
        if args.frames > 2:
            inner = _solve(args, model, "decode", z[1:-1], sig)
            frames[1:-1] = inner.x
            nfe += inner.nfe
    else:
        sol = _solve(args, model, "decode", z, sig)
        frames, nfe = sol.x, nfe + sol.nfe
    lo, hi = getattr(model, "data_range", (-1.0, 1.0))
    frames = (lo + hi) - frames if args.invert else frames  # back to the inputs' polarity
    save_grid(frames, args.out, nrow=args.frames, force=args.force, data_range=(lo, hi))
    print(f"wrote {args.out}: {args.frames} frames ({args.kind}), {args.method}, NFE {nfe}")
    return 0
