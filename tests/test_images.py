"""Image IO and the image commands end to end (`probflow sample/encode/decode/interpolate`) on a tiny
UNet checkpoint: exact round trips, the CLI = the Python API, exact interpolation ends, no overwrite,
refusal of another model, and bad input → exit 2 with a message naming the argument."""

import numpy as np
import pytest
import torch
from PIL import Image

import probflow
from probflow import grids
from probflow.cli import main
from probflow.digits import train as digits_train
from probflow.io.images import from_uint8, load_images, save_grid, save_images, to_uint8
from probflow.io.latents import load_latents, save_latents
from probflow.models import digits as digits_model
from probflow.models.unet import UNet


def _randomise(net):
    """Random weights everywhere (UNet zero-initialises its output layers, so a fresh one predicts ε = 0)."""
    with torch.no_grad():  # from torch's global generator, seeded by the caller
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape) / max(1, p[0].numel()) ** 0.5)
    return net


def _checkpoint(folder, seed):
    torch.manual_seed(seed)
    net = _randomise(UNet(in_channels=1, channels=(8, 16), blocks=1))
    digits_train.save(net, {"name": "digits", "fingerprint": digits_model.as_model(net).fingerprint}, folder)
    return str(folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    g = torch.Generator().manual_seed(0)  # three 8×8 blob images in [−1, 1] (no scikit-learn import needed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    c = torch.rand(3, 2, generator=g) * 4 + 2
    x = (2 * torch.exp(-((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2) / 4) - 1).unsqueeze(1).double()
    paths = save_images(x, root / "in", names=["zero", "one", "two"])
    return {"root": root, "model": _checkpoint(root / "m0", 0), "other": _checkpoint(root / "m1", 1),
            "imgs": [str(p) for p in paths]}


def _px(path):
    return np.asarray(Image.open(path)).astype(int)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_uint8_levels_round_trip_exactly():
    a = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = from_uint8(a)
    assert x.shape == (1, 1, 16, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x), a)


def test_encode_decode_reproduces_the_images_exactly_with_the_reversible_default(env, tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    rc, out, _ = _run(capsys, "encode", *env["imgs"][:2], "--model", env["model"], "--method", "reversible_heun",
                      "--steps", 8, "--out", lat)
    assert rc == 0 and "with its reversible state" in out
    rc, out, _ = _run(capsys, "decode", lat, "--model", env["model"], "--out", tmp_path / "dec")
    assert rc == 0 and "exact inverse" in out
    for src, name in zip(env["imgs"], ["zero.png", "one.png"]):
        assert np.array_equal(_px(src), _px(tmp_path / "dec" / name))


def test_cli_latents_are_the_python_api_latents(env, tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    assert _run(capsys, "encode", env["imgs"][0], "--model", env["model"], "--method", "rk4", "--steps", 5,
                "--plain", "--out", lat)[0] == 0
    model = digits_model.load_model(env["model"])
    x0 = load_images(env["imgs"][:1], 8, 1)
    api = probflow.encode(probflow.DDIMField(model, torch.float32), x0, grids.ddim(model.schedule, 5), "rk4")
    lf = load_latents(lat)
    assert torch.equal(lf.latents, api.x) and int(lf.meta["nfe"]) == api.nfe == 20
    assert lf.meta["method"] == "rk4" and lf.meta["model_fingerprint"] == model.fingerprint and not lf.state


def test_rk4_round_trip_is_within_two_pixel_levels(env, tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    _run(capsys, "encode", env["imgs"][2], "--model", env["model"], "--method", "rk4", "--steps", 10, "--out", lat)
    assert _run(capsys, "decode", lat, "--model", env["model"], "--out", tmp_path / "d")[0] == 0
    err = np.abs(_px(env["imgs"][2]) - _px(tmp_path / "d" / "two.png")).max()
    assert err <= 2  # within the solver's error (pixel levels)


def test_interpolate_ends_are_the_inputs(env, tmp_path, capsys):
    strip = tmp_path / "s.png"
    rc, out, _ = _run(capsys, "interpolate", env["imgs"][0], env["imgs"][1], "--frames", 4, "--steps", 6,
                      "--model", env["model"], "--out", strip)
    assert rc == 0 and "slerp" in out
    s = _px(strip)
    scale, pad = 4, 2  # 8×8 images enlarged to 32 px, 2 px apart
    assert s.shape == (pad + 32 + pad, pad + 4 * (32 + pad))
    frames = [s[pad:pad + 32, pad + k * 34:pad + k * 34 + 32][::scale, ::scale] for k in range(4)]
    assert np.array_equal(frames[0], _px(env["imgs"][0])) and np.array_equal(frames[3], _px(env["imgs"][1]))
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[2], frames[3])


def test_sample_writes_a_grid_and_never_overwrites(env, tmp_path, capsys):
    out = tmp_path / "s.png"
    rc, msg, _ = _run(capsys, "sample", "--model", env["model"], "--n", 4, "--steps", 3, "--out", out)
    assert rc == 0 and "NFE 12" in msg and _px(out).shape == (70, 70)
    before = out.read_bytes()
    rc, _, err = _run(capsys, "sample", "--model", env["model"], "--n", 4, "--steps", 3, "--seed", 1, "--out", out)
    assert rc == 2 and "--out" in err and "exists" in err and out.read_bytes() == before
    assert _run(capsys, "sample", "--model", env["model"], "--n", 4, "--steps", 3, "--seed", 1, "--out", out,
                "--force")[0] == 0 and out.read_bytes() != before


def test_encode_and_decode_refuse_to_overwrite(env, tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    lat.write_bytes(b"keep")
    rc, _, err = _run(capsys, "encode", env["imgs"][0], "--model", env["model"], "--steps", 2, "--out", lat)
    assert rc == 2 and "--out" in err and lat.read_bytes() == b"keep"
    assert _run(capsys, "encode", env["imgs"][0], "--model", env["model"], "--steps", 2, "--out", lat,
                "--force")[0] == 0
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "zero.png").write_bytes(b"keep")
    rc, _, err = _run(capsys, "decode", lat, "--model", env["model"], "--out", tmp_path / "d")
    assert rc == 2 and "--out" in err and (tmp_path / "d" / "zero.png").read_bytes() == b"keep"


def test_decode_refuses_latents_of_another_model_unless_forced(env, tmp_path, capsys):
    lat = tmp_path / "z.safetensors"
    _run(capsys, "encode", env["imgs"][0], "--model", env["model"], "--steps", 2, "--out", lat)
    rc, _, err = _run(capsys, "decode", lat, "--model", env["other"], "--out", tmp_path / "d")
    assert rc == 2 and "latents: made with model" in err and "--force" in err and not (tmp_path / "d").exists()
    rc, _, err = _run(capsys, "decode", lat, "--model", env["other"], "--out", tmp_path / "d", "--force")
    assert rc == 0 and "warning" in err


def test_bad_inputs_exit_2_naming_the_argument(env, tmp_path, capsys):
    m = ["--model", env["model"]]
    cases = []
    cases.append((["encode", tmp_path / "missing.png", *m, "--out", tmp_path / "a.st"], "IMAGE: .*no such image"))
    txt = tmp_path / "text.png"
    txt.write_text("not an image")
    cases.append((["encode", txt, *m, "--out", tmp_path / "a.st"], "IMAGE: .*not a readable PNG/JPEG"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    cases.append((["decode", bad, *m, "--out", tmp_path / "d"], "latents: .*not a readable safetensors"))
    cases.append((["decode", tmp_path / "none.safetensors", *m, "--out", tmp_path / "d"], "latents: .*no such"))
    cases.append((["encode", env["imgs"][0], *m, "--method", "nope", "--out", tmp_path / "a.st"], "--method: "))
    cases.append((["encode", env["imgs"][0], *m, "--steps", 0, "--out", tmp_path / "a.st"], "--steps: "))
    cases.append((["encode", env["imgs"][0], *m, "--method", "dopri5", "--rtol", -1, "--out", tmp_path / "a.st"],
                  "--rtol: "))
    cases.append((["encode", env["imgs"][0], "--model", tmp_path / "nowhere", "--out", tmp_path / "a.st"],
                  "--model: "))
    cases.append((["encode", env["imgs"][0], *m, "--out", tmp_path / "no" / "dir" / "a.st"], "--out: "))
    cases.append((["interpolate", env["imgs"][0], env["imgs"][1], *m, "--frames", 1, "--out", tmp_path / "s.png"],
                  "--frames: "))
    cases.append((["sample", *m, "--n", 0, "--out", tmp_path / "s.png"], "--n: "))
    for argv, pattern in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert __import__("re").search(f"error: {pattern}", err), (argv, err)
    assert not (tmp_path / "a.st").exists()


def test_latents_of_the_wrong_shape_or_without_their_state_are_refused(env, tmp_path, capsys):
    model = digits_model.load_model(env["model"])
    g = grids.ddim(model.schedule, 2)
    small = save_latents(tmp_path / "s.safetensors", torch.zeros(1, 1, 4, 4), g, model, method="euler", nfe=2)
    rc, _, err = _run(capsys, "decode", small, "--model", env["model"], "--out", tmp_path / "d")
    assert rc == 2 and "latents: shape (1, 4, 4) does not fit" in err
    nostate = save_latents(tmp_path / "n.safetensors", torch.zeros(1, 1, 8, 8), g, model, method="reversible_heun",
                           nfe=3)
    rc, _, err = _run(capsys, "decode", nostate, "--model", env["model"], "--out", tmp_path / "d")
    assert rc == 2 and "holds no partner state" in err
    # with another method it is an ordinary solve from the latents
    assert _run(capsys, "decode", nostate, "--model", env["model"], "--method", "euler", "--out",
                tmp_path / "d")[0] == 0


def test_images_of_other_modes_and_sizes_are_converted_with_a_message(tmp_path, capsys):
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, 4:28] = (255, 255, 255)
    Image.fromarray(rgb, "RGB").save(tmp_path / "wide.jpg", quality=95)
    x = load_images([tmp_path / "wide.jpg"], 8, 1)
    err = capsys.readouterr().err
    assert "converted RGB → grayscale" in err and "resized 32×24 → 8×8 (centre-cropped to 24×24)" in err
    assert x.shape == (1, 1, 8, 8) and x.max() > 0.9  # the white centre survives the crop
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(g16).save(tmp_path / "deep.png")
    x16 = load_images([tmp_path / "deep.png"], 8, 1, verbose=False)
    assert torch.allclose((x16 + 1) / 2 * 255, torch.from_numpy(np.round(g16 / 257.0)).double().view(1, 1, 8, 8))
    ink = np.full((8, 8), 255, np.uint8)
    ink[2:6, 3:5] = 0  # a dark stroke on white paper
    Image.fromarray(ink, "L").save(tmp_path / "paper.png")
    x = load_images([tmp_path / "paper.png"], 8, 1, invert=True)
    assert x[0, 0, 3, 3] == 1 and x[0, 0, 0, 0] == -1


def test_save_grid_is_atomic_and_refuses_overwrite(tmp_path):
    x = torch.linspace(-1, 1, 2 * 64, dtype=torch.float64).view(2, 1, 8, 8)
    p = save_grid(x, tmp_path / "g.png", scale=1, pad=0)
    assert np.array_equal(_px(p), np.concatenate([to_uint8(x)[0, :, :, 0], to_uint8(x)[1, :, :, 0]], axis=1))
    with pytest.raises(FileExistsError, match="--out"):
        save_grid(x, p)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["g.png"]


def test_invert_round_trip_gives_back_the_dark_on_light_original(env, tmp_path, capsys):
    ink = np.full((16, 16, 3), 250, np.uint8)
    ink[3:13, 6:10] = (10, 20, 30)  # a dark stroke on light RGB paper, twice the model's size
    Image.fromarray(ink, "RGB").save(tmp_path / "mine.png")
    lat = tmp_path / "mine.safetensors"
    rc, _, err = _run(capsys, "encode", tmp_path / "mine.png", "--invert", "--model", env["model"], "--steps", 6,
                      "--out", lat)
    assert rc == 0 and "converted RGB" in err and "resized 16×16 → 8×8" in err
    assert load_latents(lat).meta["invert"] == "true"
    assert _run(capsys, "decode", lat, "--model", env["model"], "--out", tmp_path / "d")[0] == 0
    expect = load_images([tmp_path / "mine.png"], 8, 1, verbose=False)  # the converted input, not inverted
    assert np.array_equal(_px(tmp_path / "d" / "mine.png"), to_uint8(expect)[0, :, :, 0])
    assert _px(tmp_path / "d" / "mine.png")[0, 0] > 200  # light paper stays light


def _png_header(path, w, h):
    """A PNG declaring w×h 8-bit grayscale pixels in its header, with no pixel data."""
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_images_are_bounded_by_their_header_before_decoding_and_the_bound_can_be_lifted(env, tmp_path, capsys):
    big = _png_header(tmp_path / "big.png", 5000, 5000)
    with pytest.raises(ValueError, match=r"images: .*big.png: 5000×5000 = 25000000 pixels is above the limit"):
        load_images([big], 8, 1)
    with pytest.raises(ValueError, match=r"not a readable PNG/JPEG image"):  # no bound: decoded, and it is empty
        load_images([big], 8, 1, max_pixels=None)
    with pytest.raises(ValueError, match=r"images: .* is a directory, not an image file"):
        load_images([tmp_path], 8, 1)
    rc, _, err = _run(capsys, "encode", big, "--model", env["model"], "--steps", 2, "--out", tmp_path / "z.st",
                      "--no-limits")
    assert rc == 2 and "not a readable PNG/JPEG image" in err and "above the limit" not in err


def test_save_images_replaces_a_folder_of_pngs_as_a_whole_only_with_force(tmp_path):
    x = torch.zeros(2, 1, 8, 8)
    first = save_images(x, tmp_path / "out", names=["a", "b"])
    with pytest.raises(FileExistsError, match="--out: folder .* exists and is not empty"):
        save_images(x[:1], tmp_path / "out", names=["c"])
    save_images(x[:1], tmp_path / "out", force=True, names=["c"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.png"] and not first[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left
    with pytest.raises(ValueError, match="names: expected plain file names"):
        save_images(x[:1], tmp_path / "other", names=["../escape"])


def _png_bytes(w, h, rows: bytes, color=0):
    import zlib

    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, color, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h,color", [(1, 1 << 24, 0), (64, 64, 2), (8, 8, 0)])
def test_a_png_with_fewer_rows_than_its_header_is_refused(tmp_path, w, h, color):
    p = tmp_path / "t.png"
    p.write_bytes(_png_bytes(w, h, b"\0\x80" * 3, color))  # Pillow zero-fills the missing rows without a word
    with pytest.raises(ValueError, match="bytes its header declares \\(truncated or damaged file\\)"):
        load_images([p], 8, verbose=False)


@pytest.mark.parametrize("mode,interlace", [("L", 0), ("L", 1), ("RGB", 1), ("RGBA", 0), ("P", 0), ("1", 0)])
def test_complete_pngs_of_every_layout_still_load(tmp_path, mode, interlace):
    a = np.random.default_rng(1).integers(0, 256, (13, 7, 3), dtype=np.uint8)
    img = Image.fromarray(a, "RGB").convert(mode)
    img.save(tmp_path / "c.png", interlace=interlace)
    assert load_images([tmp_path / "c.png"], 8, verbose=False).shape == (1, 1, 8, 8)
    exact = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(exact).save(tmp_path / "e.png", interlace=interlace)
    got = load_images([tmp_path / "e.png"], 8, verbose=False, data_range=(0.0, 255.0))
    assert torch.equal(got.reshape(8, 8).round().to(torch.uint8), torch.from_numpy(exact))
