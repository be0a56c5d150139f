"""The command line for conditional models (issue 25, item 4): --class, --prompt / --prompt-embeds, --negative,
--guidance on sample/encode/decode/interpolate/likelihood/bench; latent files record the condition and w, and
decode refuses another condition unless --any-condition (then NOT exact); latent diffusion folders go image →
VAE encoder mean × scaling → latent ODE → VAE decoder, and say that the VAE part is not exact.

Every folder here is a tiny random diffusers folder written by the test; the references are the Python API
(`probflow.models.load`, `probflow.sample`, `encode_exact`) and, for the VAE, diffusers' own AutoencoderKL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import probflow
from probflow import grids
from probflow.cli import main
from probflow.models import load

diffusers = pytest.importorskip("diffusers")
DIM = 12  # cross_attention_dim of the text UNet


def _sched(folder: Path) -> None:
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(folder / "scheduler")


def class_folder(folder: Path) -> Path:
    """UNet2DModel with 4 class embeddings (class 3 the null class), self-attention, 1×8×8."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=4, attention_head_dim=4)
    with torch.no_grad():  # a smooth ε (as a trained net's is), so that exact inversion converges in float32
        unet.conv_out.weight.mul_(0.1)
    unet.save_pretrained(folder / "unet")
    _sched(folder)
    (folder / "card.json").write_text(json.dumps({"null_class": 3}))
    return folder


def text_folder(folder: Path, in_channels: int = 1, size: int = 8) -> Path:
    """UNet2DConditionModel with cross-attention (no text encoder in the folder)."""
    torch.manual_seed(2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=DIM, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    with torch.no_grad():  # a smooth ε (as a trained net's is), so that exact inversion converges in float32
        unet.conv_out.weight.mul_(0.1)
    unet.save_pretrained(folder / "unet")
    _sched(folder)
    return folder


def vae_folder(folder: Path):
    """A latent diffusion folder: the text UNet on 4×4×4 latents and an AutoencoderKL for 3×8×8 images."""
    text_folder(folder, in_channels=4, size=4)
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=0.5).eval()
    vae.save_pretrained(folder / "vae")
    return vae


def embeds(seed: int, length: int = 5) -> torch.Tensor:
    return torch.randn(length, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    out = {"class": class_folder(root / "class"), "text": text_folder(root / "text")}
    from safetensors.torch import save_file

    pos, neg = embeds(10), embeds(11)
    save_file({"prompt_embeds": pos, "negative_prompt_embeds": neg}, str(root / "p.safetensors"))
    torch.save({"prompt_embeds": pos, "negative_prompt_embeds": neg}, root / "p.pt")
    out["embeds"], out["embeds_pt"], out["pos"], out["neg"] = root / "p.safetensors", root / "p.pt", pos, neg
    out["root"] = root
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] → 0 … 255: clamp((x + 1)/2) · 255, rounded (what a PNG of x holds)."""
    v = np.clip((x.detach().double().numpy() + 1) / 2, 0, 1) * 255
    return np.round(v).astype(np.int64)


def gray_pngs(folder: Path, n: int, size: int = 8, channels: int = 1) -> list[Path]:
    g = torch.Generator().manual_seed(7)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = (torch.rand(size, size, channels, generator=g) * 255).round().to(torch.uint8).numpy()
        p = folder / f"img{i}.png"
        Image.fromarray(a[..., 0] if channels == 1 else a).save(p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------- sample


def test_sample_with_class_and_guidance_is_the_guided_model_of_the_api(folders, tmp_path, capsys):
    folder = folders["class"]
    rc, out, err = run(capsys, "sample", "--model", folder, "--class", 1, "--guidance", 3, "--n", 4, "--method",
                       "euler", "--steps", 6, "--scale", 1, "--quiet", "--out", tmp_path / "s.png")
    assert rc == 0, err
    assert "class 1 (guided against class 3, w = 3)" in out
    model = load(folder, class_label=1, guidance=3.0)
    sol = probflow.sample(model, probflow.noise(4, (1, 8, 8), 0), grids.named("uniform", model.schedule, 6), "euler")
    img = pixels(tmp_path / "s.png")
    for i in range(4):  # the grid: 2 per row, 2-pixel pad, scale 1
        r, c = divmod(i, 2)
        tile = img[2 + r * 10:10 + r * 10, 2 + c * 10:10 + c * 10]
        assert np.array_equal(tile, to_uint8(sol.x[i, 0].float()))
    # negative controls: another class, another w give other pixels
    for flags in (("--class", 2, "--guidance", 3), ("--class", 1, "--guidance", 1)):
        assert run(capsys, "sample", "--model", folder, *flags, "--n", 4, "--method", "euler", "--steps", 6,
                   "--scale", 1, "--quiet", "--force", "--out", tmp_path / "o.png")[0] == 0
        assert not np.array_equal(pixels(tmp_path / "o.png"), img)


@pytest.mark.parametrize("which", ["embeds", "embeds_pt"])
def test_prompt_embeds_file_safetensors_or_torch_is_the_text_condition(folders, which, tmp_path, capsys):
    rc, out, err = run(capsys, "sample", "--model", folders["text"], "--prompt-embeds", folders[which], "--guidance",
                       2.5, "--n", 2, "--method", "euler", "--steps", 4, "--scale", 1, "--quiet", "--out",
                       tmp_path / "s.png")
    assert rc == 0, err
    assert "encoder_hidden_states sha256" in out and "w = 2.5" in out
    model = load(folders["text"], prompt_embeds=folders["pos"], negative=folders["neg"], guidance=2.5)
    sol = probflow.sample(model, probflow.noise(2, (1, 8, 8), 0), grids.named("uniform", model.schedule, 4), "euler")
    assert np.array_equal(pixels(tmp_path / "s.png")[2:10, 2:10], to_uint8(sol.x[0, 0].float()))


# ---------------------------------------------------------------- encode / decode under guidance


@pytest.fixture(scope="module")
def encoded(folders, tmp_path_factory, request):
    root = tmp_path_factory.mktemp("enc")
    imgs = gray_pngs(root / "in", 2)
    lat = root / "z.safetensors"
    assert main(["encode", *map(str, imgs), "--model", str(folders["class"]), "--class", "1", "--guidance", "3",
                 "--quiet", "--out", str(lat)]) == 0
    return imgs, lat


def test_encode_records_the_condition_and_w_and_decode_inverts_exactly_under_guidance(folders, encoded, tmp_path,
                                                                                        capsys):
    from probflow.inversion import encode_exact
    from probflow.io.latents import load_latents

    imgs, lat = encoded
    lf = load_latents(lat)
    model = load(folders["class"], class_label=1, guidance=3.0)
    assert lf.meta["guidance"] == "3.0" and lf.meta["class_label"] == "1" and lf.meta["negative_class_label"] == "3"
    assert lf.meta["condition_sha256"] == model.condition["condition_sha256"]
    x0 = torch.stack([torch.from_numpy(pixels(p)).float()[None] / 127.5 - 1 for p in imgs])
    ref = encode_exact(model, x0, grids.named("quadratic_open", model.schedule, 20), "euler").x  # the API's latent
    assert lf.latents.dtype == torch.float32 and torch.allclose(lf.latents, ref, rtol=0, atol=1e-5)
    for flags in (("--class", 1, "--guidance", 3), ()):  # given again, or taken from the file
        rc, out, err = run(capsys, "decode", lat, "--model", folders["class"], *flags, "--quiet", "--force",
                           "--out", tmp_path / "d")
        assert rc == 0, err
        assert "exact inverse" in out and "NOT EXACT" not in err
        for p in imgs:
            assert np.array_equal(pixels(tmp_path / "d" / p.name), pixels(p))  # the input PNGs back, bit for bit


@pytest.mark.parametrize("flags,said", [(("--class", 2, "--guidance", 3), "class 1 → 2"),
                                        (("--class", 1, "--guidance", 2), "guidance 3.0 → 2.0"),
                                        (("--class", 1, "--guidance", 3, "--negative", 0), "negative class 3 → 0")])
def test_decode_refuses_another_condition_unless_any_condition_then_not_exact(folders, encoded, flags, said,
                                                                              tmp_path, capsys):
    _, lat = encoded
    rc, _, err = run(capsys, "decode", lat, "--model", folders["class"], *flags, "--quiet", "--out", tmp_path / "d")
    assert rc == 2 and not (tmp_path / "d").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("probflow decode: error: latents: made under another condition")
    assert said in lines[0] and "--any-condition" in lines[0]
    rc, out, err = run(capsys, "decode", lat, "--model", folders["class"], *flags, "--any-condition", "--quiet",
                       "--out", tmp_path / "d")
    assert rc == 0, err
    assert "WARNING: NOT EXACT" in err and "exact inverse" not in out


def test_interpolate_under_guidance_ends_on_the_inputs(folders, tmp_path, capsys):
    a, b = gray_pngs(tmp_path / "in", 2)
    rc, out, err = run(capsys, "interpolate", a, b, "--model", folders["class"], "--class", 2, "--guidance", 2,
                       "--frames", 3, "--scale", 1, "--quiet", "--out", tmp_path / "s.png")
    assert rc == 0, err
    assert "class 2 (guided against class 3, w = 2)" in out
    strip = pixels(tmp_path / "s.png")
    assert np.array_equal(strip[2:10, 2:10], pixels(a)) and np.array_equal(strip[2:10, 22:30], pixels(b))


def test_likelihood_takes_the_condition(folders, tmp_path, capsys):
    (img,) = gray_pngs(tmp_path / "in", 1)
    res = []
    for k in (0, 1):
        rc, out, err = run(capsys, "likelihood", img, "--model", folders["class"], "--class", k, "--steps", 2,
                           "--quiet")
        assert rc == 0, err
        res.append(float(out.splitlines()[0].split("\t")[1]))
    assert res[0] != res[1]  # the condition changes the field, so the density


# ---------------------------------------------------------------- latent diffusion


def test_latent_diffusion_encode_decode_go_through_the_vae_and_say_it_is_not_exact(folders, tmp_path, capsys):
    from probflow.io.latents import load_latents

    folder = tmp_path / "ldm"
    vae = vae_folder(folder)
    imgs = gray_pngs(tmp_path / "in", 2, channels=3)
    flags = ("--model", folder, "--prompt-embeds", folders["embeds"], "--guidance", 3)
    rc, out, err = run(capsys, "encode", *imgs, *flags, "--quiet", "--out", tmp_path / "z.safetensors")
    assert rc == 0, err
    assert "VAE is not exact" in err and "VAE latents" in out
    lf = load_latents(tmp_path / "z.safetensors")
    assert lf.latents.shape == (2, 4, 4, 4) and lf.meta["autoencoder"] == "vae"
    rc, out, err = run(capsys, "decode", tmp_path / "z.safetensors", *flags, "--quiet", "--out", tmp_path / "d")
    assert rc == 0, err
    assert "exact inverse (round-off) of the VAE latents; the VAE decoder is not exact" in out
    assert "VAE is not exact" in err
    # independent reference: diffusers' own AutoencoderKL, encoder mean × 0.5, then its decoder (the ODE part
    # returns the VAE latent to round-off, so the images are the VAE's own reconstruction)
    x = torch.stack([torch.from_numpy(pixels(p)).float().permute(2, 0, 1) / 127.5 - 1 for p in imgs])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * 0.5
        rec = vae.decode(z / 0.5).sample
    for i, p in enumerate(imgs):
        got = pixels(tmp_path / "d" / p.name)
        want = to_uint8(rec[i].permute(1, 2, 0))
        assert np.abs(got - want).max() <= 1
    rc, _, err = run(capsys, "likelihood", imgs[0], *flags, "--quiet")
    assert rc == 2 and "is a latent diffusion model" in err


def test_latent_diffusion_sample_decodes_through_the_vae(folders, tmp_path, capsys):
    folder = tmp_path / "ldm"
    vae = vae_folder(folder)
    rc, out, err = run(capsys, "sample", "--model", folder, "--prompt-embeds", folders["embeds"], "--n", 1,
                       "--method", "euler", "--steps", 3, "--scale", 1, "--quiet", "--out", tmp_path / "s.png")
    assert rc == 0, err
    model = load(folder, prompt_embeds=folders["pos"], negative=folders["neg"])
    z = probflow.sample(model, probflow.noise(1, (4, 4, 4), 0), grids.named("uniform", model.schedule, 3), "euler").x
    with torch.no_grad():
        img = vae.decode(z.float() / 0.5).sample[0]
    got = pixels(tmp_path / "s.png")[2:10, 2:10]
    assert got.shape == (8, 8, 3) and np.abs(got - to_uint8(img.permute(1, 2, 0))).max() <= 1


# ---------------------------------------------------------------- bench --model


def test_bench_model_takes_the_condition(folders, tmp_path, capsys):
    rc, out, err = run(capsys, "bench", "--model", folders["class"], "--class", 2, "--guidance", 2, "--quick",
                       "--methods", "euler", "--nfe", 5, "--grids", "uniform", "--peers", "none", "--samples", 2,
                       "--ref-tol", "1e-4", "--check-tol", "1e-3", "--out", tmp_path / "b", "--no-progress")
    assert rc == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["config"]["condition"] == {"class_label": "2", "guidance": 2.0}
    assert "--class 2 --guidance 2.0" in res["command"]
    rc, _, err = run(capsys, "bench", "--model", folders["class"], "--class", 9, "--quick", "--out", tmp_path / "c")
    assert rc == 2 and "--class: unknown class 9" in err


# ---------------------------------------------------------------- bad conditions: one line, exit 2


@pytest.mark.parametrize("argv,fragment", [
    (("--model", "digits", "--class", 3), "--class: model 'digits' is unconditional"),
    (("--model", "digits", "--guidance", 3), "--guidance: model 'digits' is unconditional"),
    (("--model", "{class}", "--class", 7), "--class: unknown class 7; expected an integer in 0 … 3"),
    (("--model", "{class}",), "--class: this model is class-conditional (4 class embeddings); pass a class"),
    (("--model", "{class}", "--class", 1, "--guidance", "nan"), "--guidance: expected a finite number"),
    (("--model", "{class}", "--class", 1, "--prompt", "a cat"), "--prompt: this model is not text-conditioned"),
    (("--model", "{text}", "--prompt", "a cat"), "--prompt: "),
    (("--model", "{text}", "--prompt", "a", "--prompt-embeds", "{embeds}"), "--prompt: pass --prompt or "
                                                                             "--prompt-embeds, not both"),
    (("--model", "{text}", "--prompt-embeds", "{root}/missing.pt"), "--prompt-embeds: "),
    (("--model", "{text}", "--prompt-embeds", "{bad_embeds}"), "--prompt-embeds: expected a float tensor of shape"),
    (("--model", "{text}",), "--prompt: this model is text-conditioned; pass --prompt or --prompt-embeds"),
])
def test_bad_conditions_are_one_line_errors_naming_the_flag(folders, argv, fragment, tmp_path, capsys):
    torch.save(torch.zeros(5, DIM + 1), folders["root"] / "bad.pt")
    sub = {"{class}": folders["class"], "{text}": folders["text"], "{embeds}": folders["embeds"],
           "{bad_embeds}": folders["root"] / "bad.pt"}
    argv = [str(sub.get(a, a)).replace("{root}", str(folders["root"])) for a in map(str, argv)]
    rc, _, err = run(capsys, "sample", *argv, "--n", 1, "--steps", 2, "--quiet", "--out", tmp_path / "s.png")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("probflow sample: error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "s.png").exists()
