"""`probflow encode/decode/interpolate --model FOLDER` with the exact latent (the default) on a diffusers UNet2DModel
folder with self-attention and GroupNorm, written here with save_pretrained (issue 24): the solve uses forward
calls only, and a network with no exact latent at the default grid ends in one line naming σ and the residual."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

SIZE = 16


def _folder(root, name: str, out_scale: float, size: int = SIZE):
    """A random UNet2DModel (attention in the second block) with its output layer scaled by out_scale."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    folder = root / name
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler().save_config(folder)
    return folder


def _pngs(root, size: int = SIZE):
    from PIL import Image

    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    paths = []
    for k in range(2):
        img = np.stack([127 + 100 * np.cos(2 * np.pi * ((k + 1) * xx + c * yy)) for c in range(3)], -1)
        p = root / f"img{k}.png"
        Image.fromarray(img.astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def test_encode_decode_interpolate_on_a_unet_folder_are_exact(tmp_path, capsys):
    """A random UNet whose output layer is scaled by 1e-3 (its ε stays small, so each Euler step is a contraction
    backwards and an exact latent exists): the default encode writes exact latents, decode gives the PNGs back
    byte for byte, interpolate's end frames are the inputs."""
    from probflow.cli import main

    folder = _folder(tmp_path, "unet", 1e-3)
    a, b = _pngs(tmp_path)
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(a), str(b), "--model", str(folder), "--out", str(z), "--quiet"]) == 0
    assert "exact for the euler decoder" in capsys.readouterr().out
    assert main(["decode", str(z), "--model", str(folder), "--out", str(tmp_path / "dec"), "--quiet"]) == 0
    assert "exact inverse" in capsys.readouterr().out
    for p in (a, b):
        assert (tmp_path / "dec" / p.name).read_bytes() == p.read_bytes()
    strip = tmp_path / "strip.png"
    assert main(["interpolate", str(a), str(b), "--model", str(folder), "--frames", "3", "--scale", "1",
                 "--out", str(strip), "--quiet"]) == 0
    assert "exact latents" in capsys.readouterr().out and strip.exists()


def test_a_network_without_an_exact_latent_ends_in_one_line(tmp_path, capsys):
    """The same random UNet at its own output scale: its GroupNorm makes ε scale-invariant in x, so the encode
    trajectory stays far below the noise scale and the backward Euler steps at large σ do not contract; encode
    exits with status 2 and one line naming σ and the residual, writing nothing."""
    from probflow.cli import main

    folder = _folder(tmp_path, "unet_raw", 1.0, size=8)
    a, b = _pngs(tmp_path, size=8)
    z = tmp_path / "z.safetensors"
    rc = main(["encode", str(a), str(b), "--model", str(folder), "--out", str(z), "--steps", "3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "σ = " in err and "residual" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not z.exists()
