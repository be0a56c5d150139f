"""Bad inputs (issue 16): each becomes one line naming the argument, file or field — exit status 2 in the
CLI, ValueError in the API — and interrupted runs leave nothing half-written.

`CASES` is the bad-input table; docs/BAD_INPUTS.md is generated from it (`python tests/test_bad_inputs.py`
rewrites it) and `test_the_documented_table_is_this_table` keeps the two equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUTS.md"


# ---------------------------------------------------------------- fixtures: tiny checkpoints and files

def _tiny_digits(folder: Path, seed: int = 0, nan: bool = False, fill: float | None = None) -> Path:
    from probflow.digits import train as digits_train
    from probflow.models import digits as digits_model
    from probflow.models.unet import UNet

    torch.manual_seed(seed)
    net = UNet(in_channels=1, channels=(8, 16), blocks=1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape) / max(1, p[0].numel()) ** 0.5)
        if nan:
            next(net.parameters()).fill_(float("nan"))
        for p in net.parameters() if fill is not None else ():
            p.fill_(fill)
    digits_train.save(net, {"name": "digits", "fingerprint": digits_model.as_model(net).fingerprint}, folder)
    return folder


def _retag(folder: Path, edit: Callable[[dict, dict], None]) -> Path:
    """Rewrite a digits checkpoint's tensors/metadata with `edit(state_dict, unet_config)`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    w = folder / "digits.safetensors"
    with safe_open(str(w), framework="pt") as f:
        cfg = json.loads(f.metadata()["unet_config"])
    sd = load_file(str(w))
    edit(sd, cfg)
    save_file(sd, str(w), metadata={"unet_config": json.dumps(cfg)})
    return folder


def _copy_digits(env, name: str) -> Path:
    import shutil

    dst = env["root"] / name
    if not dst.exists():
        shutil.copytree(env["model"], dst)
    return dst


def _diffusers(env, name: str, unet_cfg: dict | None = None, sched_cfg: dict | None = None) -> Path:
    """A tiny diffusers UNet2DModel folder; `unet_cfg`/`sched_cfg` overwrite keys of its configs."""
    diffusers = pytest.importorskip("diffusers")
    folder = env["root"] / name
    if folder.exists():
        return folder
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler().save_config(folder)
    for fname, new in (("config.json", unet_cfg), ("scheduler_config.json", sched_cfg)):
        if new:
            cfg = json.loads((folder / fname).read_text())
            cfg.update(new)
            (folder / fname).write_text(json.dumps(cfg))
    return folder


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that declares w×h pixels in its header but holds no pixel data (a few dozen bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from probflow.io.images import save_images

    root = tmp_path_factory.mktemp("bad")
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    x = torch.stack([2 * torch.exp(-((yy - c) ** 2 + (xx - 7 + c) ** 2) / 4) - 1 for c in (2.0, 4.0, 5.0)])
    imgs = save_images(x.unsqueeze(1).double(), root / "in", names=["a", "b", "c"])
    e = {"root": root, "model": str(_tiny_digits(root / "m")), "imgs": [str(p) for p in imgs]}
    e["latents"] = str(root / "z.safetensors")
    from probflow.cli import main

    assert main(["encode", *e["imgs"], "--model", e["model"], "--method", "euler", "--steps", "2", "--plain",
                 "--out", e["latents"], "--quiet"]) == 0  # an ordinary encode: this random net is no digit model
    return e


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what the user gave, as the doc shows it
    make: Callable  # (env, tmp) -> argv list (CLI) or a zero-argument callable (API)
    expect: str  # a fragment of the one-line message
    status: int | str = 2  # CLI exit status, or "ValueError" / "TypeError" for an API call


def _sample(env, *extra):
    return ["sample", "--model", env["model"], "--n", "2", "--steps", "2", "--quiet", *map(str, extra)]


def _encode(env, image, *extra):
    return ["encode", str(image), "--model", env["model"], "--method", "euler", "--steps", "2", "--quiet",
            *map(str, extra)]


def _card(env, tmp, text):
    folder = _copy_digits(env, f"card-{abs(hash(text))}")
    (folder / "digits.json").write_text(text)
    return _sample({**env, "model": folder}, "--out", tmp / "s.png")


def _unet_cfg(env, tmp, name, edit):
    folder = _copy_digits(env, name)
    _retag(folder, edit)
    return _sample({**env, "model": folder}, "--out", tmp / "s.png")


def _diff(env, tmp, name, **cfgs):
    return _sample({**env, "model": _diffusers(env, name, **cfgs)}, "--out", tmp / "s.png")


def _gif(tmp):
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return tmp / "anim.gif"


def _deep(tmp):
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp / "deep.png")
    return tmp / "deep.png"


def _dangling(tmp):
    (tmp / "link.png").symlink_to(tmp / "missing-target.png")
    return tmp / "link.png"


def _folder_with(tmp, name, files):
    d = tmp / name
    d.mkdir()
    for f in files:
        (d / f).write_bytes(b"old")
    return d


def _huge_grid():
    import probflow
    from probflow.models import default_mixture

    return lambda: probflow.sample(default_mixture(), probflow.noise(2, (2,), 0),
                                   torch.tensor([1e300, 0.0], dtype=torch.float64), "euler")


def _api_small_limit(env):
    from probflow.models.adapters import from_diffusers

    folder = _diffusers(env, "diff-ok")
    return lambda: from_diffusers(folder, max_parameters=10_000)


def _api_betas():
    from probflow.schedules import from_betas

    return lambda: from_betas([0.1, float("nan"), 0.2], "betas")


def _api(fn_text):
    """A zero-argument call of the Python API, written as the doc shows it (evaluated in a namespace with
    probflow, torch, grids, schedules, the default mixture `gm` and a 2-D batch `x`)."""
    def call():
        import probflow
        from probflow import grids, schedules
        from probflow.models import default_mixture

        ns = {"probflow": probflow, "torch": torch, "grids": grids, "schedules": schedules, "gm": default_mixture(),
              "x": torch.zeros(3, 2, dtype=torch.float64), "g": torch.tensor([80.0, 1.0, 0.0], dtype=torch.float64),
              "nan": float("nan"), "inf": float("inf")}
        return eval(fn_text, ns)  # noqa: S307 - the test's own fixed strings
    return call


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_card(env, tmp):
    folder = _copy_digits(env, "card-deep")
    (folder / "digits.json").write_text('{"a": ' + _nested(100_000) + "}")
    return _sample({**env, "model": folder}, "--out", tmp / "s.png")


def _deepen(env):
    """Turn the folder made by `_diff(..., unet_cfg={"x": "DEEP"})` into one whose config nests 100 000 deep."""
    cfg = env["root"] / "deep" / "config.json"
    cfg.write_text(cfg.read_text().replace('"DEEP"', _nested(100_000)))
    return _sample({**env, "model": env["root"] / "deep"}, "--out", env["root"] / "deep-s.png")


def _truncated_png(tmp):
    """A PNG declaring 1×16,777,216 pixels (at the pixel limit) whose pixel data stops after 100 rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") + (1 << 24).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    p = tmp / "trunc.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\x80" * 100)) +
                  chunk(b"IEND", b""))
    return p


def _tampered_latents(env, tmp, edit, rehash=False):
    """A copy of the fixture's latent file with its metadata edited (content hash recomputed if `rehash`)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from probflow.io.latents import content_sha256

    with safe_open(env["latents"], framework="pt") as f:
        meta = json.loads(f.metadata()["probflow"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    if rehash:
        meta["content_sha256"] = content_sha256(tensors, meta)
    out = tmp / "z2.safetensors"
    save_file(tensors, str(out), metadata={"probflow": json.dumps(meta)})
    return ["decode", out, "--model", env["model"], "--quiet", "--out", tmp / "dec"]


# (id, call, message fragment, exception) of the Python API, evaluated by `_api`
API_ROWS = [
    ('api-wrong-shape', 'probflow.sample(gm, probflow.noise(2, (3,)), g)',
     'noise: expected samples of 2 entries', 'ValueError'),
    ('api-karras-rho-0', 'grids.karras(80.0, 0.002, 10, rho=0)',
     'rho: expected a number in (0, 1000], got 0', 'ValueError'),
    ('api-grid-1e9-steps', "grids.named('karras', schedules.linear(), 10**9)",
     'steps: 1000000000 is above the limit of 1000000 (max_steps=', 'ValueError'),
    ('api-steps-bool', "grids.named('uniform', schedules.linear(), True)",
     'steps: expected a positive integer, got bool', 'TypeError'),
    ('api-schedule-T-huge', 'schedules.linear(10**9)',
     'T: expected an integer number of timesteps in [2, 1e+07]', 'ValueError'),
    ('api-noise-negative-dim', 'probflow.noise(4, (-1,))',
     'shape[0]: expected an integer in [1, ∞), got -1', 'ValueError'),
    ('api-noise-zero-dim', 'probflow.noise(4, (0,))',
     'shape[0]: expected an integer in [1, ∞), got 0', 'ValueError'),
    ('api-noise-seed-huge', 'probflow.noise(4, (2,), seed=2**70)',
     'seed: expected an integer in [0, 9223372036854775807]', 'ValueError'),
    ('api-noise-int-dtype', 'probflow.noise(4, (2,), dtype=torch.int64)',
     'dtype: expected a floating-point dtype', 'TypeError'),
    ('api-noise-too-many', 'probflow.noise(10**9, (3, 32, 32))',
     'is above the limit of 268435456 (max_elements=)', 'ValueError'),
    ('api-field-dtype-name', "probflow.DDIMField(gm, model_dtype='float33')",
     'model_dtype: expected a floating-point dtype', 'TypeError'),
    ('api-model-nan', "probflow.sample(lambda x, s: x * nan, x, g, 'dopri5')",
     'model: returned NaN or Inf for ε at σ = 80', 'ValueError'),
    ('api-model-none', 'probflow.sample(lambda x, s: None, x, g)',
     'model: returned NoneType for ε', 'TypeError'),
    ('api-model-int', 'probflow.sample(lambda x, s: x.long(), x, g)',
     'model: returned ε of dtype torch.int64', 'TypeError'),
    ('api-rtol-inf', "probflow.sample(gm, x, g, 'dopri5', rtol=inf)",
     'rtol, atol: expected finite positive tolerances, got inf', 'ValueError'),
    ('api-rtol-below-floor', "probflow.sample(gm, x, g, 'dopri5', rtol=1e-30, atol=1e-30)",
     'rtol, atol: rtol = 1e-30; expected a finite tolerance in [1e-14, 1]', 'ValueError'),
]

CASES = [
    # outputs
    Case("out-is-folder-force", "`sample --out DIR --force`, DIR an existing folder",
         lambda e, t: _sample(e, "--out", _folder_with(t, "o", []), "--force"), "is a folder; expected a file name"),
    Case("out-unwritable", "`sample --out /sys/x.png` (a folder nobody can write in)",
         lambda e, t: _sample(e, "--out", "/sys/probflow-x.png"), "cannot write in folder /sys"),
    Case("out-dangling-symlink", "`sample --out LINK`, LINK a symbolic link to a missing file, no --force",
         lambda e, t: _sample(e, "--out", _dangling(t)), "is a symbolic link (to a missing file)"),
    Case("decode-into-nonempty", "`decode Z --out DIR`, DIR an existing folder with other files, no --force",
         lambda e, t: ["decode", e["latents"], "--model", e["model"], "--quiet", "--out",
                       _folder_with(t, "d", ["old.png"])], "exists and is not empty"),
    Case("decode-force-foreign", "`decode Z --out DIR --force`, DIR holding files probflow did not write",
         lambda e, t: ["decode", e["latents"], "--model", e["model"], "--quiet", "--force", "--out",
                       _folder_with(t, "d", ["0000.png", "notes.txt"])], "which probflow did not write"),
    Case("train-out-is-file", "`train digits --out FILE`, FILE an existing file",
         lambda e, t: ["train", "digits", "--steps", "1", "--eval-samples", "0", "--out",
                       _folder_with(t, "f", ["x"]) / "x"], "exists and is not a folder"),
    # images
    Case("image-is-folder", "`encode DIR`, DIR a folder", lambda e, t: _encode(e, t, "--out", t / "z.st"),
         "is a directory, not an image file"),
    Case("image-bomb", "`encode BOMB.png`, a PNG declaring 20000×20000 pixels",
         lambda e, t: _encode(e, _png_header_only(t / "bomb.png", 20000, 20000), "--out", t / "z.st"),
         "decompression bomb"),
    Case("image-too-many-pixels", "`encode BIG.png`, a PNG declaring 13000×13000 pixels",
         lambda e, t: _encode(e, _png_header_only(t / "big.png", 13000, 13000), "--out", t / "z.st"),
         "169000000 pixels is above the limit of 16777216"),
    Case("image-16-bit", "`encode DEEP.png`, a 16-bit grayscale PNG (converted, exit 0)",
         lambda e, t: _encode(e, _deep(t), "--out", t / "z.st"), "16-bit image reduced to 8 bits", 0),
    Case("image-animated", "`encode ANIM.gif`, an animated GIF of 3 frames (first frame used, exit 0)",
         lambda e, t: _encode(e, _gif(t), "--out", t / "z.st"), "animated image with 3 frames; using the first", 0),
    # arguments
    Case("demo-seed-negative", "`demo --seed -1`", lambda e, t: ["demo", "--seed", "-1", "--out", t / "d.png"],
         "--seed: expected a non-negative integer"),
    Case("rtol-below-floor", "`sample --method dopri5 --rtol 1e-14`",
         lambda e, t: _sample(e, "--method", "dopri5", "--rtol", "1e-14", "--out", t / "s.png"),
         "--rtol: 1e-14 is below the floor 1e-10"),
    Case("train-threads-0", "`train digits --threads 0`",
         lambda e, t: ["train", "digits", "--threads", "0", "--out", t], "--threads: expected a positive integer"),
    Case("adams-on-log-grid", "`sample --method explicit_adams --grid quadratic`",
         lambda e, t: _sample(e, "--method", "explicit_adams", "--grid", "quadratic", "--out", t / "s.png"),
         "--grid: explicit_adams assumes equal steps in σ; use --grid sigma_uniform"),
    # digits checkpoints
    Case("digits-card-not-object", "digits checkpoint whose card `digits.json` is `[1, 2]`",
         lambda e, t: _card(e, t, "[1, 2]"), "does not hold a JSON object (got list)"),
    Case("digits-card-bad-json", "digits checkpoint whose card is not JSON (`{oops`)",
         lambda e, t: _card(e, t, "{oops"), "is not valid JSON: Expecting property name"),
    Case("digits-unknown-config-key", "digits checkpoint whose `unet_config` has an unknown key `foo`",
         lambda e, t: _unet_cfg(e, t, "u-foo", lambda sd, c: c.update(foo=1)), "has unknown keys ['foo']"),
    Case("digits-bad-config-value", "digits checkpoint whose `unet_config` has `channels: \"x\"`",
         lambda e, t: _unet_cfg(e, t, "u-x", lambda sd, c: c.update(channels="x")), "cannot build the network"),
    Case("digits-too-large", "digits checkpoint whose `unet_config` has `channels: [4096, 8192]`",
         lambda e, t: _unet_cfg(e, t, "u-big", lambda sd, c: c.update(channels=[4096, 8192])),
         "above the limit of 1e+09"),
    Case("digits-shape-mismatch", "digits checkpoint whose weights do not fit `unet_config` (`channels: [8, 32]`)",
         lambda e, t: _unet_cfg(e, t, "u-shape", lambda sd, c: c.update(channels=[8, 32])), "shape mismatch(es)"),
    Case("digits-missing-key", "digits checkpoint with one weight tensor removed",
         lambda e, t: _unet_cfg(e, t, "u-miss", lambda sd, c: sd.pop("inp.weight")),
         "1 missing key(s), e.g. inp.weight"),
    Case("digits-nan-weights", "digits checkpoint with NaN weights, `--method dopri5`",
         lambda e, t: _sample({**e, "model": _tiny_digits(e["root"] / "nan", nan=True)}, "--method", "dopri5",
                              "--out", t / "s.png"), "holds NaN or Inf values"),
    Case("digits-eps-overflows", "digits checkpoint, finite weights (all 3e38) overflowing float32, `--method dopri5`",
         lambda e, t: _sample({**e, "model": _tiny_digits(e["root"] / "overflow", fill=3e38)}, "--method", "dopri5",
                              "--out", t / "s.png"), "--model: the network returned NaN or Inf for ε at σ = 157.4"),
    # diffusers folders
    Case("diffusers-T-negative", "diffusers folder, `num_train_timesteps: -5`",
         lambda e, t: _diff(e, t, "T-neg", sched_cfg={"num_train_timesteps": -5}),
         "num_train_timesteps: expected an integer >= 2, got -5"),
    Case("diffusers-T-string", "diffusers folder, `num_train_timesteps: \"abc\"`",
         lambda e, t: _diff(e, t, "T-str", sched_cfg={"num_train_timesteps": "abc"}),
         "num_train_timesteps: expected a finite number, got 'abc'"),
    Case("diffusers-T-huge", "diffusers folder, `num_train_timesteps: 3e8`",
         lambda e, t: _diff(e, t, "T-big", sched_cfg={"num_train_timesteps": 3e8}),
         "num_train_timesteps 300000000 is above the limit of 100000"),
    Case("diffusers-betas-strings", "diffusers folder, `trained_betas: [\"a\", \"b\"]`",
         lambda e, t: _diff(e, t, "betas", sched_cfg={"trained_betas": ["a", "b"]}),
         "trained_betas: expected a list of numbers"),
    Case("diffusers-too-large", "diffusers folder, `block_out_channels: [2048, 4096]`",
         lambda e, t: _diff(e, t, "big", unet_cfg={"block_out_channels": [2048, 4096]}),
         "parameters (9.86 GiB in float32), above the limit of 1e+09"),
    Case("diffusers-missing-key", "diffusers folder whose config asks for `layers_per_block: 2` (weights for 1)",
         lambda e, t: _diff(e, t, "lpb", unet_cfg={"layers_per_block": 2}), "missing key(s), e.g."),
    # Python API
    Case("api-grid-overflow", "`probflow.sample(model, x, torch.tensor([1e300, 0.0], dtype=torch.float64))`",
         lambda e, t: _huge_grid(), "sigmas: σ = 1e+300 is above 1e+100", "ValueError"),
    Case("api-max-parameters", "`from_diffusers(folder, max_parameters=10_000)` on a 0.1 M-parameter UNet",
         lambda e, t: _api_small_limit(e), "above the limit of 1e+04", "ValueError"),
    Case("api-betas-nan", "`schedules.from_betas([0.1, nan, 0.2], \"betas\")`",
         lambda e, t: _api_betas(), "betas: every β_t must be a finite number in (0, 1)", "ValueError"),
    # reliability round three (issue 27): JSON, configs, images, latent files
    Case("digits-card-deep-json", "digits checkpoint whose card nests a list 100 000 deep",
         lambda e, t: _deep_card(e, t), "JSON nested 100001 deep, above the limit of 32"),
    Case("digits-config-million-blocks", "digits checkpoint whose `unet_config` has `blocks: 1000000`",
         lambda e, t: _unet_cfg(e, t, "u-blocks", lambda sd, c: c.update(blocks=10**6)),
         "blocks: expected an integer in [1, 64], got 1000000"),
    Case("digits-config-too-deep", "digits checkpoint whose `unet_config` has 5 resolutions (8×8 images)",
         lambda e, t: _unet_cfg(e, t, "u-levels", lambda sd, c: c.update(channels=[8] * 5)),
         "5 resolutions do not fit 8×8 images"),
    Case("diffusers-sample-size-huge", "diffusers folder, `sample_size: 1000000`",
         lambda e, t: _diff(e, t, "ss-big", unet_cfg={"sample_size": 10**6}),
         "sample_size: 1000000×1000000 = 1000000000000 pixels is above the limit of 16777216"),
    Case("diffusers-sample-size-odd", "diffusers folder, `sample_size: 9` with 2 resolutions",
         lambda e, t: _diff(e, t, "ss-odd", unet_cfg={"sample_size": 9}),
         "sample_size: 9×9 does not fit the network's 2 resolutions"),
    Case("diffusers-million-blocks", "diffusers folder, `layers_per_block: 1000000`",
         lambda e, t: _diff(e, t, "lpb-big", unet_cfg={"layers_per_block": 10**6}),
         "layers_per_block: expected an integer in [1, 64], got 1000000"),
    Case("diffusers-many-resolutions", "diffusers folder, `block_out_channels` with 100 000 entries",
         lambda e, t: _diff(e, t, "boc-long", unet_cfg={"block_out_channels": [8] * 100_000}),
         "block_out_channels: expected 1 to 16 integers in [1, 65536], got 100000 entries"),
    Case("diffusers-config-deep-json", "diffusers folder whose `config.json` nests a list 100 000 deep",
         lambda e, t: _diff(e, t, "deep", unet_cfg={"x": "DEEP"}) and _deepen(e), "JSON nested 100001 deep"),
    Case("image-truncated", "`encode TRUNC.png`, a PNG declaring 1×16 777 216 pixels whose data stops after 100 rows",
         lambda e, t: _encode(e, _truncated_png(t), "--out", t / "z.st"),
         "bytes its header declares (truncated or damaged file)"),
    Case("image-2p31", "`encode HUGE.png --no-limits`, a PNG declaring 2³¹−1 × 2³¹−1 pixels",
         lambda e, t: _encode(e, _png_header_only(t / "huge.png", 2**31 - 1, 2**31 - 1), "--no-limits", "--out",
                              t / "z.st"), "decompression bomb"),
    Case("latents-field-changed", "`decode Z`, Z's `data_range` edited to `[0, 1]` (hash not updated)",
         lambda e, t: _tampered_latents(e, t, lambda m, ts: m.update(data_range="[0, 1]")),
         "does not match the metadata field 'content_sha256'"),
    Case("latents-relabelled-exact", "`decode Z`, a plain latent Z relabelled `exact_for: euler`",
         lambda e, t: _tampered_latents(e, t, lambda m, ts: m.update(exact_for="euler")),
         "does not match the metadata field 'content_sha256'"),
    Case("latents-deep-json", "`decode Z`, Z's `sources` field nests a list 100 000 deep (hash recomputed)",
         lambda e, t: _tampered_latents(e, t, lambda m, ts: m.update(sources=_nested(100_000)), rehash=True),
         "JSON nested 100000 deep, above the limit of 32"),
    *[Case(i, f"`{call}`", lambda e, t, c=call: _api(c), frag, exc) for i, call, frag, exc in API_ROWS],
    # ---- CLI bounds and flags (issue 27, command line; cli helper) ----
    Case("cli-steps-logsnr-1e9", "`sample --grid logsnr --steps 1000000000`",
         lambda e, t: [*_sample(e, "--out", t / "s.png"), "--grid", "logsnr", "--steps", "1000000000"],
         "--steps: 1000000000 is above the bound of 100000 (pass --no-limits to lift it)"),
    Case("cli-scale-1e5", "`sample --scale 100000`", lambda e, t: _sample(e, "--scale", "100000", "--out", t / "s.png"),
         "--scale: the PNG would have"),
    Case("cli-n-1e14", "`sample --n 1e14`", lambda e, t: [*_sample(e, "--out", t / "s.png"), "--n", "1e14"],
         "--n: 100000000000000 samples of 1×8×8 need"),
    Case("cli-demo-n-1e9", "`demo --n 1e9`", lambda e, t: ["demo", "--n", "1e9", "--out", t / "s.png"],
         "--n: 1000000000 is above the bound of 100000"),
    Case("cli-bench-samples-1e9", "`bench --samples 1e9`", lambda e, t: ["bench", "--samples", "1e9", "--out", t / "b"],
         "--samples: 1000000000 is above the bound of 65536"),
    Case("cli-bench-nfe-1e9", "`bench --nfe 1e9`", lambda e, t: ["bench", "--nfe", "1000000000", "--out", t / "b"],
         "--nfe: 1000000000 is above the bound of 10000"),
    Case("cli-bench-suites-empty", "`bench --suites ,,,`", lambda e, t: ["bench", "--suites", ",,,", "--out", t / "b"],
         "--suites: expected at least one comma-separated value"),
    Case("cli-likelihood-draws-1e9", "`likelihood IMAGE --draws 1e9`",
         lambda e, t: ["likelihood", e["imgs"][0], "--model", e["model"], "--draws", "1e9"],
         "--draws: 1000000000 is above the bound of 1000"),
    Case("cli-likelihood-probes-1e9", "`likelihood IMAGE --probes 1e9`",
         lambda e, t: ["likelihood", e["imgs"][0], "--model", e["model"], "--probes", "1e9"],
         "--probes: 1000000000 is above the bound of 1000"),
    Case("cli-threads-1e5", "`sample --threads 100000`",
         lambda e, t: _sample(e, "--threads", "100000", "--out", t / "s.png"),
         "--threads: 100000 is above the bound of"),
    Case("cli-device-meta", "`sample --device meta`", lambda e, t: _sample(e, "--device", "meta", "--out", t / "s.png"),
         "--device: 'meta' cannot run a model"),
    Case("cli-device-no-cuda", "`sample --device cuda:99` (no such CUDA device)",
         lambda e, t: _sample(e, "--device", "cuda:99", "--out", t / "s.png"), "--device: 'cuda:99' but this"),
    Case("cli-eta-with-dopri5", "`sample --eta 0.5 --method dopri5`",
         lambda e, t: _sample(e, "--eta", "0.5", "--method", "dopri5", "--out", t / "s.png"),
         "--eta: the stochastic sampler replaces the method; it cannot run with --method dopri5"),
    Case("cli-out-trailing-slash", "`sample --out newdir/`", lambda e, t: _sample(e, "--out", f"{t}/newdir/"),
         "names a folder; expected a file name"),
    Case("cli-interpolate-reversible", "`interpolate A B --method reversible_heun`",
         lambda e, t: ["interpolate", *e["imgs"][:2], "--model", e["model"], "--method", "reversible_heun", "--out",
                       t / "s.png"], "--method: reversible_heun's inner frames have no partner state"),
    Case("cli-seed-2-70", "`sample --seed 2**70`", lambda e, t: _sample(e, "--seed", str(2**70), "--out", t / "s.png"),
         "--seed: expected a non-negative integer below 2**63"),
    # ---- end of CLI bounds and flags ----
    # ---- conditions of conditional models (issue 25, item 4; tests/test_cli_condition.py has the rest) ----
    Case("cli-class-unconditional", "`sample --model DIGITS_FOLDER --class 3` (an unconditional model)",
         lambda e, t: _sample(e, "--class", "3", "--out", t / "s.png"),
         "is unconditional; it takes no condition or guidance"),
    Case("cli-class-out-of-range", "`sample --model digits32 --class 11` (classes 0 … 10, 10 the null class)",
         lambda e, t: ["sample", "--model", "digits32", "--class", "11", "--n", "1", "--steps", "1", "--quiet",
                       "--out", t / "s.png"], "--class: unknown class 11; expected an integer in 0 … 10"),
    Case("cli-guidance-nan", "`sample --model digits32 --class 3 --guidance nan`",
         lambda e, t: ["sample", "--model", "digits32", "--class", "3", "--guidance", "nan", "--quiet", "--out",
                       t / "s.png"], "--guidance: expected a finite number (the CFG weight w), got nan"),
    Case("cli-prompt-class-model", "`sample --model digits32 --class 3 --prompt \"a cat\"` (no cross-attention)",
         lambda e, t: ["sample", "--model", "digits32", "--class", "3", "--prompt", "a cat", "--quiet", "--out",
                       t / "s.png"], "--prompt: this model is not text-conditioned (no cross-attention)"),
    Case("cli-prompt-and-embeds", "`sample --prompt TEXT --prompt-embeds FILE`",
         lambda e, t: _sample(e, "--prompt", "a cat", "--prompt-embeds", t / "e.safetensors", "--out", t / "s.png"),
         "--prompt: pass --prompt or --prompt-embeds, not both"),
    Case("cli-class-no-class", "`sample --model digits32` (class-conditional, no --class)",
         lambda e, t: ["sample", "--model", "digits32", "--quiet", "--out", t / "s.png"],
         "--class: this model is class-conditional (11 class embeddings); pass a class"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_naming_it(case, env, tmp_path, capsys):
    from probflow.cli import main

    made = case.make(env, tmp_path)
    if case.status in ("ValueError", "TypeError"):
        with pytest.raises({"ValueError": ValueError, "TypeError": TypeError}[case.status]) as info:
            made()
        assert case.expect in str(info.value) and "\n" not in str(info.value)
        return
    capsys.readouterr()
    try:
        rc = main([str(a) for a in made])
    except SystemExit as e:  # argparse's own refusals (a flag's type: --device, --method, --precision)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == case.status, err
    assert case.expect in err, err
    if case.status == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines[-1].startswith(f"probflow {made[0]}: error: ") and case.expect in lines[-1], err
        assert "Traceback" not in err
    assert not (tmp_path / "s.png").exists() or case.status == 0


def render_table() -> str:
    rows = ["| # | input | message (fragment) | exit |", "|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        status = f"`{c.status}` (API)" if c.status in ("ValueError", "TypeError") else str(c.status)
        rows.append(f"| {i} | {c.input} | `{c.expect}` | {status} |")
    return "\n".join(rows) + "\n"


BEGIN, END = "<!-- table: generated by tests/test_bad_inputs.py -->\n", "<!-- end of table -->\n"


def test_the_documented_table_is_this_table():
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{DOC} lacks the table markers"
    assert text.split(BEGIN, 1)[1].split(END, 1)[0] == render_table(), \
        f"{DOC} is out of date: run `python tests/test_bad_inputs.py`"


# ---------------------------------------------------------------- atomic folders, in process

def test_an_interrupted_folder_write_leaves_nothing(tmp_path):
    from probflow.io.atomic import atomic_folder

    def write(tmp):
        (tmp / "0000.png").write_bytes(b"new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(tmp_path / "out", write)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_a_folder_as_a_whole_and_survives_an_interrupt_between_renames(tmp_path, monkeypatch):
    from probflow.files import atomic
    from probflow.files.images import save_images

    old = _folder_with(tmp_path, "out", ["0000.png", "0001.png", "0002.png"])
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(FileExistsError, match="not empty"):
        save_images(x, old)
    real = os.replace

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", interrupted)  # the old folder is already renamed aside here
    with pytest.raises(KeyboardInterrupt):
        save_images(x, old, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # put back, temp folder gone
    assert sorted(p.name for p in old.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    monkeypatch.setattr(atomic.os, "replace", real)
    save_images(x, old, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in old.iterdir()) == ["0000.png"]  # no old files mixed in


def test_a_nan_eps_at_run_time_names_the_model_and_sigma():
    from probflow.cli.common import check_finite, guarded

    def model(x, sigma):
        return x * float("nan") if float(sigma) < 1 else x

    with pytest.raises(ValueError, match=r"--model: the network returned NaN or Inf for ε at σ = 0\.5"):
        check_finite(model(torch.ones(1, 2), torch.tensor(0.5)), torch.tensor(0.5))

    def underflow(*a, **k):
        raise AssertionError("underflow in dt nan")

    with pytest.raises(ValueError, match="--method dopri5: the solver failed .underflow in dt"):
        guarded(underflow, "dopri5")()


# ---------------------------------------------------------------- real signals on a real process

SCRIPT = textwrap.dedent("""
    import pathlib, signal, sys, time
    from PIL import Image
    import probflow.cli.common as common
    from probflow.cli import main

    # Ctrl-C as a terminal delivers it: a child of a background job inherits SIGINT ignored (POSIX shells ignore
    # it for `&` jobs), and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mark = pathlib.Path(sys.argv[1])
    save, call = Image.Image.save, common._Progress.__call__
    saved = []

    def slow_save(self, fp, *a, **k):  # PNG writes made slow, so that a signal lands between them
        save(self, fp, *a, **k)
        saved.append(fp)
        if sys.argv[2] == "write" and len(saved) == 2:  # after the first file is complete, in the second
            mark.write_text("writing")
            time.sleep(60)  # wait here for the signal, however late a busy machine delivers it
        time.sleep(0.3)

    def slow_call(self, x, sigma):  # model calls made slow, so that a signal lands in the solve
        if sys.argv[2] == "solve" and not mark.exists():
            mark.write_text("solving")
            time.sleep(60)  # wait in the solve for the signal, however late a busy machine delivers it
        time.sleep(0.05)
        return call(self, x, sigma)

    Image.Image.save, common._Progress.__call__ = slow_save, slow_call
    sys.exit(main(sys.argv[3:]))
""")


def _interrupt(tmp_path, when, argv, sig):
    mark = tmp_path / "mark"
    envv = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(mark), when, *map(str, argv)], env=envv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 120, "the child never reached the point to interrupt"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    mark.unlink()
    return proc.returncode, err


def test_ctrl_c_while_decode_writes_prints_one_line_exits_130_and_leaves_the_old_set(env, tmp_path):
    out = _folder_with(tmp_path, "dec", ["0000.png", "0001.png", "0002.png", "0003.png"])
    argv = ["decode", env["latents"], "--model", env["model"], "--quiet", "--out", out, "--force"]
    rc, err = _interrupt(tmp_path, "write", argv, signal.SIGINT)
    assert rc == 130, err
    assert err.strip().splitlines() == ["probflow decode: interrupted; nothing half-written was left behind"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec"]  # no temporary folder left
    assert sorted(p.read_bytes() for p in out.iterdir()) == [b"old"] * 4  # the old set, untouched, unmixed


def test_sigkill_while_decode_writes_leaves_no_partial_set(env, tmp_path):
    out = tmp_path / "dec"
    argv = ["decode", env["latents"], "--model", env["model"], "--quiet", "--out", out]
    rc, _ = _interrupt(tmp_path, "write", argv, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert "dec" not in left and all(n.startswith(".dec.") and n.endswith(".tmp") for n in left), left


def test_sigterm_during_a_solve_prints_one_line_and_writes_nothing(env, tmp_path):
    argv = ["sample", "--model", env["model"], "--n", "2", "--steps", "200", "--quiet", "--out", tmp_path / "s.png"]
    rc, err = _interrupt(tmp_path, "solve", argv, signal.SIGTERM)
    assert rc == 143 and err.strip().splitlines() == [
        "probflow sample: terminated; nothing half-written was left behind"], err
    assert list(tmp_path.iterdir()) == []


if __name__ == "__main__":  # rewrite the table in docs/BAD_INPUTS.md
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(head + BEGIN + render_table() + END + rest.split(END, 1)[1], encoding="utf-8")
    print(f"wrote {DOC}")
