"""Latent files: provenance round trip, exact decode from a file, refusal of another model/schedule,
no overwrite without force, corrupt and foreign files."""

import json

import pytest
import torch
from safetensors.torch import save_file

import probflow
from probflow import grids, schedules
from probflow.io.latents import FORMAT, check_compatible, load_latents, model_identity, save_latents
from probflow.models import GaussianMixture
from probflow.models.digits import as_model
from probflow.models.unet import UNet
from probflow.reversible import HeunState, from_fixed, to_fixed

GM = GaussianMixture.random(4, 3, seed=2)


def _randomise(net):
    """Random weights everywhere (UNet zero-initialises its output layers, so a fresh one predicts ε = 0)."""
    with torch.no_grad():  # from torch's global generator, seeded by the caller
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape) / max(1, p[0].numel()) ** 0.5)
    return net


def _net(seed):
    torch.manual_seed(seed)
    return as_model(_randomise(UNet(in_channels=1, channels=(8, 16), blocks=1)))


def test_file_keeps_provenance_and_decodes_exactly(tmp_path):
    model = _net(0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    g = grids.ddim(model.schedule, 6)
    enc = probflow.encode(model, x, g, "reversible_heun")
    p = save_latents(tmp_path / "z.safetensors", enc.x, g, model, method="reversible_heun", nfe=enc.nfe,
                     state=enc.state.tensors(), sources=["a.png", "b.png"])
    lf = load_latents(p)
    m = lf.meta
    assert m["format"] == FORMAT and m["probflow_version"] == probflow.__version__
    assert m["model"] == "digits" and m["model_fingerprint"] == model.fingerprint
    assert m["schedule"] == model.schedule.name and float(m["sigma_max"]) == model.schedule.sigma_max
    assert m["method"] == "reversible_heun" and int(m["nfe"]) == enc.nfe == 7 and int(m["steps"]) == 6
    assert lf.sources == ["a.png", "b.png"] and json.loads(m["shape"]) == [2, 1, 8, 8]
    assert torch.equal(lf.latents, enc.x) and torch.equal(lf.sigmas, g)
    dec = probflow.decode(model, lf.latents, lf.sigmas, "reversible_heun", state=HeunState.from_tensors(lf.state))
    assert torch.equal(dec.x, from_fixed(to_fixed(x), torch.float64))
    assert check_compatible(lf, model) == []


def test_another_model_or_schedule_is_refused_unless_forced(tmp_path):
    a, b = _net(0), _net(1)
    g = grids.ddim(a.schedule, 2)
    p = save_latents(tmp_path / "z.safetensors", torch.zeros(1, 1, 8, 8), g, a, method="euler", nfe=2)
    lf = load_latents(p)
    with pytest.raises(ValueError, match="latents: made with model 'digits' .*--force"):
        check_compatible(lf, b)
    assert len(check_compatible(lf, b, force=True)) == 1
    cos = as_model(UNet(in_channels=1, channels=(8, 16), blocks=1))
    cos.fingerprint = a.fingerprint  # same weights, other table
    cos.schedule = schedules.cosine()
    with pytest.raises(ValueError, match="schedule 'linear'"):
        check_compatible(lf, cos)
    # same name, T and σ_max, another ᾱ table: the message shows the tables' hashes, which differ
    lf.meta["schedule_sha256"] = "0" * 64
    with pytest.raises(ValueError, match=r"ᾱ table sha256 000000000000… vs [0-9a-f]{12}…"):
        check_compatible(lf, a)


def test_analytic_models_are_fingerprinted_by_their_parameters():
    assert model_identity(GM)["model_fingerprint"] == model_identity(GaussianMixture.random(4, 3, seed=2))[
        "model_fingerprint"]
    assert model_identity(GM)["model_fingerprint"] != model_identity(GaussianMixture.random(4, 3, seed=3))[
        "model_fingerprint"]


def test_never_overwrites_without_force(tmp_path):
    g = torch.tensor([2.0, 0.0], dtype=torch.float64)
    p = save_latents(tmp_path / "z.safetensors", torch.ones(1, 4), g, GM, method="dopri5", nfe=10)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="--out: .*exists"):
        save_latents(p, torch.zeros(1, 4), g, GM, method="dopri5", nfe=10)
    assert p.read_bytes() == before
    save_latents(p, torch.zeros(1, 4), g, GM, method="dopri5", nfe=10, force=True)
    assert torch.equal(load_latents(p).latents, torch.zeros(1, 4))
    assert [q.name for q in tmp_path.iterdir()] == ["z.safetensors"]  # no temporary file left behind


def test_corrupt_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="latents: .*no such latent file"):
        load_latents(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="latents: .*not a readable safetensors file"):
        load_latents(bad)
    g = torch.tensor([2.0, 0.0], dtype=torch.float64)
    good = save_latents(tmp_path / "z.safetensors", torch.ones(2, 4), g, GM, method="euler", nfe=1)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(ValueError, match="latents: .*not a readable safetensors file"):
        load_latents(trunc)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a probflow latent file"):
        load_latents(foreign)
    lied = tmp_path / "lied.safetensors"
    save_file({"latents": torch.ones(2, 4), "sigmas": g}, str(lied), metadata={"format": FORMAT, "shape": "[3, 4]"})
    with pytest.raises(ValueError, match="disagree"):
        load_latents(lied)
    garbled = tmp_path / "garbled.safetensors"
    save_file({"latents": torch.ones(2, 4), "sigmas": g}, str(garbled), metadata={"format": FORMAT, "shape": "x"})
    with pytest.raises(ValueError, match="metadata 'shape' is 'x', expected a JSON list"):
        load_latents(garbled)
    up = tmp_path / "up.safetensors"
    save_file({"latents": torch.ones(2, 4), "sigmas": g.flip(0)}, str(up), metadata={"format": FORMAT,
                                                                                     "shape": "[2, 4]"})
    with pytest.raises(ValueError, match="decreasing"):
        load_latents(up)
