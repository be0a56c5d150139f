"""`probflow encode` / `decode` under classifier-free guidance on the shipped digits32 model, as a user runs them
on held-out test images saved as PNG files: the decoded PNG has the input's pixels, and the exactness the two
commands claim (round-off, or the images' 8-bit levels where the guided last step folds) is the one the latent
file records."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from probflow.cli import main
from probflow.digits.data32 import load_split32
from probflow.distributed import concat_solutions
from probflow.integrate import Solution
from probflow.io.images import to_uint8
from probflow.io.latents import load_latents


@pytest.mark.parametrize("index", [1, 2])  # held-out test images (labels 6 and 3)
def test_guided_exact_latent_decodes_to_the_same_png(tmp_path, capsys, index):
    split = load_split32()
    label = int(split["y_test"][index])
    png = tmp_path / f"test{index}.png"
    Image.fromarray(to_uint8(split["x_test"][index])[..., 0], "L").save(png)
    lat, out = tmp_path / "z.safetensors", tmp_path / "dec"
    assert main(["encode", str(png), "--model", "digits32", "--class", str(label), "--guidance", "3", "--quiet",
                 "--out", str(lat)]) == 0
    said = capsys.readouterr().out
    bound = float(re.search(r"round trip \|Δx\| ≤ ([0-9.e+-]+)", said).group(1))
    assert "exact for the euler decoder" in said and bound < 1 / 255  # under half a level of [−1, 1]
    levels = "8-bit levels" in said
    assert load_latents(lat).meta.get("exact_to", "round-off") == ("8-bit levels" if levels else "round-off")
    named = ["--model", "digits32"] if index == 1 else []  # without --model: the built-in model the file records
    assert main(["decode", str(lat), *named, "--quiet", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"exact inverse ({'8-bit levels' if levels else 'round-off'})" in said
    back = np.asarray(Image.open(out / png.name))
    assert np.array_equal(back, np.asarray(Image.open(png)))


def _sol(kind):
    return Solution(torch.zeros(1, 2), 3, torch.tensor([1.0, 2.0]), None, None, "euler",
                    {"exact": kind, "roundtrip_max_abs": 1e-3})


def test_chunks_merge_the_exactness_to_the_weakest():
    assert concat_solutions([_sol("round-off"), _sol("round-off")]).info["exact"] == "round-off"
    assert concat_solutions([_sol("round-off"), _sol("quantum")]).info["exact"] == "quantum"
