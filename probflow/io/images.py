"""Image files in and out of the model's variable x (data range [−1, 1]).

Pixels v ∈ {0 … 255} map to x = lo + (hi − lo)·v/255 with (lo, hi) the model's data range (default
(−1, 1)), and back by rounding. PNG/JPEG, grayscale or RGB, are read with Pillow (which ships with
matplotlib); an image of the wrong mode or size is converted or resized with a printed message.
Every file written here is written atomically (a temporary file in the same folder, then `os.replace`)
and an existing file is never overwritten unless `force`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from probflow.io.atomic import atomic_write

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
