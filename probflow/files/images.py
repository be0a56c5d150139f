"""Image files in and out of the model's variable x (data range [−1, 1]).

Pixels v ∈ {0 … 255} map to x = lo + (hi − lo)·v/255 with (lo, hi) the model's data range (default
(−1, 1)), and back by rounding. PNG/JPEG, grayscale or RGB, are read with Pillow (which ships with
matplotlib); an image of the wrong mode or size is converted or resized with a printed message.
Every file written here is written atomically (a temporary file in the same folder, then `os.replace`; a
folder of PNGs as one set, through a temporary sibling folder) and an existing output is never overwritten
unless `force`. An input image's header is checked (pixel count, frames, bit depth) before it is decoded.
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

from probflow.files.atomic import atomic_write

__all__ = ["MAX_PIXELS", "load_images", "save_grid", "save_images", "to_uint8", "from_uint8"]

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


MAX_PIXELS = 4096 * 4096  # default bound on an input image's pixels, read from its header before decoding


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_data_short(p: Path) -> str | None:
    """For a PNG: why its compressed pixel data (IDAT) does not hold every row its header declares, else None.
    Pillow fills the missing rows of a truncated PNG with zeros without a word; this decompresses the stream
    in chunks (never more than 1 MiB at a time) and counts the bytes against the header's rows."""
    import struct
    import zlib

    with open(p, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        need, got, z = None, 0, zlib.decompressobj()
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            n, kind = struct.unpack(">I4s", head)
            data = f.read(n)
            f.read(4)  # CRC: Pillow checks it
            if kind == b"IHDR" and len(data) == 13:
                w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data)
                bits = _PNG_CHANNELS.get(color, 1) * depth
                passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
                need = 0
                for x0, y0, dx, dy in passes:
                    pw, ph = -(-(w - x0) // dx) if w > x0 else 0, -(-(h - y0) // dy) if h > y0 else 0
                    need += ph * (1 + -(-pw * bits // 8)) if pw and ph else 0
            elif kind == b"IDAT":
                buf = data
                while buf and got < (need or 0):
                    got += len(z.decompress(buf, 1 << 20))
                    buf = z.unconsumed_tail
            elif kind == b"IEND":
                break
        if need is not None and got < need:
            return f"its pixel data holds {got} of the {need} bytes its header declares (truncated or damaged file)"
    return None


def _open_image(p: Path, name: str, max_pixels: int | None, verbose: bool):
    """Open one image file, checking its header (size, frames, bit depth) before decoding its pixels."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if p.is_dir():
        raise ValueError(f"{name}: {p} is a directory, not an image file")
    if not p.is_file():
        raise FileNotFoundError(f"{name}: {p}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels below decides
            with Image.open(p) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ValueError(f"{name}: {p}: {w}×{h} = {w * h} pixels is above the limit of {max_pixels} "
                                     "(max_pixels=; --no-limits in the CLI)")
                short = _png_data_short(p) if im.format == "PNG" else None
                if short:
                    raise ValueError(f"{name}: {p}: not a readable PNG/JPEG image ({short})")
                frames = getattr(im, "n_frames", 1)
                deep = im.mode.startswith("I;16") or any(";16" in str(getattr(t, "args", "")) for t in im.tile)
                im.load()
                img = im.copy()
    except Image.DecompressionBombError as e:  # beyond twice PIL's own bound even without max_pixels
        raise ValueError(f"{name}: {p}: refused as a decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if str(e).startswith(f"{name}: "):
            raise
        raise ValueError(f"{name}: {p}: not a readable PNG/JPEG image ({e})") from None
    if verbose and frames > 1:
        _say(f"{p}: animated image with {frames} frames; using the first frame")
    if verbose and deep:
        _say(f"{p}: 16-bit image reduced to 8 bits per channel")
    return img


def _to_mode(img, mode: str, p: Path, channels: int, verbose: bool):
    """Convert to "L" or "RGB": 16-bit grayscale keeps round(v/257); alpha is composited onto black."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: round(v/257)
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode == mode:
        return img
    if img.mode in ("RGBA", "LA") or (img.mode in ("P", "PA") and "transparency" in img.info):
        img = img.convert("RGBA")  # alpha composited onto black, then converted
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    if img.mode != mode:
        if verbose:
            _say(f"{p}: converted {img.mode} → {'grayscale (L)' if mode == 'L' else 'RGB'} for a "
                 f"{channels}-channel model")
        img = img.convert(mode)
    return img


def _to_size(img, h: int, w: int, p: Path, verbose: bool):
    """Centre-crop to the aspect ratio w/h, then resize (Lanczos) to w×h."""
    from PIL import Image

    if img.size == (w, h):
        return img
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
    return img.resize((w, h), Image.Resampling.LANCZOS)


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
    max_pixels: int | None = MAX_PIXELS,
) -> Tensor:
    """Read PNG/JPEG files into a batch x of shape (B, channels, H, W) in the model's data range.

    A file in another mode (RGB for a grayscale model, grayscale for RGB, RGBA, palette, 16-bit) is
    converted; one of another size is centre-cropped to the model's aspect ratio and resized (Lanczos);
    an animated image contributes its first frame; each with a message on stderr. `invert` maps
    v → 255 − v first (black-on-white drawings for a model trained on white-on-black digits). A file whose
    header declares more than `max_pixels` pixels (None: no bound) is refused before it is decoded.
    Unreadable, missing or non-image files and folders raise ValueError / FileNotFoundError naming the
    argument `name` and the path.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise ValueError(f"{name}: expected at least one image file")
    h, w = _size(size)
    mode = "L" if channels == 1 else "RGB"
    out = []
    for p in map(Path, paths):
        img = _open_image(p, name, max_pixels, verbose)
        img = _to_size(_to_mode(img, mode, p, channels, verbose), h, w, p, verbose)
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
    name: str = "--out",
) -> list[Path]:
    """Write each image of x (B, C, H, W) as its own PNG at native size (pixels exact) as the folder
    `folder`, named `names[i]` (default 0000.png, 0001.png, …).

    The set is written atomically (`probflow.files.atomic.atomic_folder`): into a temporary sibling folder
    that is renamed into place at the end, so an interrupted run leaves no partial set. `folder` must not
    exist or be empty unless `force`; with `force` an existing folder of PNGs is replaced as a whole (old
    and new files never mix). Everything is checked before anything is written."""
    from PIL import Image

    from probflow.files.atomic import atomic_folder

    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected a tensor of shape (B, 1 or 3, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if names is None:
        names = [f"{i:04d}.png" for i in range(x.shape[0])]
    names = [n if n.lower().endswith(".png") else f"{n}.png" for n in names]
    if len(names) != x.shape[0] or len(set(names)) != len(names):
        raise ValueError(f"names: expected {x.shape[0]} distinct file names, got {list(names)}")
    bad = [n for n in names if Path(n).name != n or n.startswith(".")]
    if bad:
        raise ValueError(f"names: expected plain file names (no folders, not hidden), got {bad[:3]}")
    a = to_uint8(x, data_range)

    def write(tmp: Path) -> None:
        for n, ai in zip(names, a):
            img = Image.fromarray(ai[:, :, 0] if ai.shape[2] == 1 else ai, "L" if ai.shape[2] == 1 else "RGB")
            img.save(tmp / n, format="PNG")

    folder = atomic_folder(folder, write, force, name=name)
    return [folder / n for n in names]
