"""Latent files: provenance round trip, exact decode from a file, refusal of another model/schedule,
no overwrite without force, corrupt and foreign files."""

import json

import pytest
import torch
from safetensors.torch import save_file

import probflow
from probflow import grids, schedules
from probflow.io.latents import (
    FORMAT,
    check_compatible,
    decode_exactness,
    load_latents,
    model_identity,
    save_latents,
)
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


def _tampered(tmp_path, good, meta_changes=None, tensor_changes=None, rehash=True):
    """A copy of the file `good` with metadata fields replaced and tensors changed (content hash recomputed
    unless `rehash` is False, so each field's own check is what refuses it)."""
    from safetensors import safe_open

    from probflow.io.latents import content_sha256

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["probflow"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, fn in (tensor_changes or {}).items():
        tensors[k] = fn(tensors[k])
    for k, v in (meta_changes or {}).items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    if rehash and "content_sha256" in meta:
        meta["content_sha256"] = content_sha256(tensors, meta)
    out = tmp_path / "t.safetensors"
    save_file(tensors, str(out), metadata={"probflow": json.dumps(meta)})
    return out


def _interior_sigma(t):
    t = t.clone()
    t[2] *= 1.01
    return t


def _last_sigma(t):
    t = t.clone()
    t[-1] = 1e-3
    return t


def _up(t):
    return t.flip(0)


# (metadata changes, tensor changes, rehash, expected message fragment): every field checked on load
TAMPER = [
    ({"data_range": "[0, 0]"}, None, True, "'data_range'"),
    ({"data_range": "[1, -1]"}, None, True, "'data_range'"),
    ({"data_range": "[0, "}, None, True, "'data_range' is '\\[0, ', not valid JSON"),
    ({"invert": '"true"'}, None, True, "'invert' is '\"true\"', expected true or false"),
    ({"method": None}, None, True, "lacks the field"),
    ({"method": "nope"}, None, True, "'method' is 'nope', not a registered solver"),
    ({"rtol": "-1"}, None, True, "'rtol'"),
    ({"nfe": "ten"}, None, True, "'nfe' is 'ten', expected an integer"),
    ({"steps": "7"}, None, True, "'steps'"),
    ({"shape": "x"}, None, True, "'shape' is 'x', not valid JSON"),
    ({"shape": "[3, 4]"}, None, True, "'shape'"),
    ({"dtype": "float32"}, None, True, "'dtype'"),
    ({"sources": "[1]"}, None, True, "'sources'"),
    ({"env_threads": "0"}, None, True, "'env_threads'"),
    ({"model_fingerprint": "abc"}, None, True, "'model_fingerprint'"),
    (None, {"sigmas": _up}, True, "strictly decreasing"),
    (None, {"sigmas": _interior_sigma}, False, "content_sha256"),
    (None, {"state.xhat": lambda t: t * 2}, False, "content_sha256"),
]


@pytest.mark.parametrize("meta,tensors,rehash,fragment", TAMPER)
def test_tampered_files_are_refused_naming_the_field(tmp_path, meta, tensors, rehash, fragment):
    model = _net(0)
    g = grids.ddim(model.schedule, 6)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    enc = probflow.encode(model, x, g, "reversible_heun")
    good = save_latents(tmp_path / "z.safetensors", enc.x, g, model, method="reversible_heun", nfe=enc.nfe,
                        state=enc.state.tensors(), grid="uniform", extra={"invert": "false"})
    load_latents(good)
    with pytest.raises(ValueError, match=fragment):
        load_latents(_tampered(tmp_path, good, meta, tensors, rehash))


@pytest.mark.parametrize("change", [_interior_sigma, _last_sigma])
def test_grid_must_be_the_one_its_name_recomputes(tmp_path, change):
    model = _net(0)
    g = grids.ddim(model.schedule, 6)
    good = save_latents(tmp_path / "z.safetensors", torch.zeros(1, 1, 8, 8), g, model, method="euler", nfe=6,
                        grid="uniform")
    check_compatible(load_latents(good), model)
    lf = load_latents(_tampered(tmp_path, good, tensor_changes={"sigmas": change}))
    with pytest.raises(ValueError, match="stored grid 'sigmas' is not the uniform grid of 6 steps"):
        check_compatible(lf, model)


def test_files_are_byte_reproducible(tmp_path):
    g = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    blobs = set()
    for i in range(4):
        p = save_latents(tmp_path / f"z{i}.safetensors", torch.ones(2, 4), g, GM, method="euler", nfe=2,
                         sources=["a.png", "b.png"], extra={"invert": "false", "zeta": "1", "alpha": "2"})
        blobs.add(p.read_bytes())
    assert len(blobs) == 1


def test_environment_is_recorded_and_differences_are_listed(tmp_path):
    from probflow.io.latents import environment, environment_differences

    g = torch.tensor([2.0, 0.0], dtype=torch.float64)
    p = save_latents(tmp_path / "z.safetensors", torch.ones(1, 4), g, GM, method="euler", nfe=1)
    lf = load_latents(p)
    for k, v in environment().items():
        assert lf.meta[k] == v
    assert environment_differences(lf) == []
    n = torch.get_num_threads()
    torch.set_num_threads(n + 1)
    try:
        assert environment_differences(lf) == [f"threads {n} → {n + 1}"]
    finally:
        torch.set_num_threads(n)
    assert "device cpu → meta" in environment_differences(lf, "meta")


def test_state_refuses_another_grid():
    model = GaussianMixture.random(4, 3, seed=2)
    x = torch.rand(2, 4, dtype=torch.float64)
    g = grids.ddim(schedules.linear(), 6)
    enc = probflow.encode(model, x, g, "reversible_heun")
    g2 = g.clone()
    g2[3] *= 1.01
    with pytest.raises(ValueError, match="state: the state was made on a grid"):
        probflow.decode(model, enc.x, g2, "reversible_heun", state=enc.state)
    with pytest.raises(ValueError, match="state: the state was made on a grid"):
        probflow.decode(model, enc.x, grids.ddim(schedules.linear(), 5), "reversible_heun", state=enc.state)
    st = HeunState.from_tensors(enc.state.tensors())  # the path survives a file
    back = probflow.decode(model, enc.x, g, "reversible_heun", state=st)
    assert torch.equal(back.x, to_fixed(x).double() * 2.0**-42) or float((back.x - x).abs().max()) < 1e-12


# ---------------------------------------------------------------- what "exact" promises (issue 27)

def _exact_file(tmp_path, model, method="euler"):
    g = grids.named("quadratic_open", model.schedule, 4)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    return save_latents(tmp_path / "z.safetensors", x, g, model, method=method, nfe=4, grid="quadratic_open",
                        exact_for=method, extra={"invert": "false"})


def test_a_verified_exact_latent_is_exact_only_for_its_own_method_and_grid(tmp_path):
    model = _net(0)
    lf = load_latents(_exact_file(tmp_path, model))
    assert lf.verified and lf.notes == [] and lf.meta["exact_for"] == "euler"
    claim, notes = decode_exactness(lf, "euler", lf.sigmas, model=model)
    assert claim == ", exact inverse (round-off)" and notes == []
    claim, notes = decode_exactness(lf, "heun2", lf.sigmas, model=model)
    assert claim == "" and len(notes) == 1 and notes[0].startswith("WARNING: NOT EXACT: decoding with method heun2")
    claim, notes = decode_exactness(lf, "euler", grids.named("uniform", model.schedule, 4), model=model)
    assert claim == "" and "another grid" in notes[0]
    with pytest.raises(ValueError, match="method: WARNING: NOT EXACT: decoding with method dpmpp_2m"):
        decode_exactness(lf, "dpmpp_2m", lf.sigmas, model=model, strict=True)


def test_a_plain_latent_decoded_with_another_method_gets_a_note(tmp_path):
    model = _net(0)
    g = grids.ddim(model.schedule, 3)
    lf = load_latents(save_latents(tmp_path / "z.safetensors", torch.zeros(1, 1, 8, 8), g, model, method="euler",
                                   nfe=3, grid="uniform"))
    assert decode_exactness(lf, "euler", g, model=model) == ("", [])
    claim, notes = decode_exactness(lf, "heun2", g, model=model)
    assert claim == "" and notes[0].startswith("note: decoding with method heun2 (the latents were made with euler)")


@pytest.mark.parametrize("field,value", [("data_range", "[0, 1]"), ("invert", "true"), ("exact_for", ""),
                                         ("method", "heun2"), ("grid", "uniform"), ("env_threads", "7"),
                                         ("sources", '["x.png", "y.png"]'), ("probflow_version", "0.0.1")])
def test_every_metadata_field_is_covered_by_the_hash(tmp_path, field, value):
    model = _net(0)
    good = _exact_file(tmp_path, model)
    with pytest.raises(ValueError, match="does not match the metadata field 'content_sha256'"):
        load_latents(_tampered(tmp_path, good, {field: value}, rehash=False))


def test_a_plain_latent_relabelled_exact_is_refused(tmp_path):
    model = _net(0)
    g = grids.named("quadratic_open", model.schedule, 4)
    good = save_latents(tmp_path / "z.safetensors", torch.zeros(1, 1, 8, 8), g, model, method="euler", nfe=4,
                        grid="quadratic_open")
    with pytest.raises(ValueError, match="content_sha256"):
        load_latents(_tampered(tmp_path, good, {"exact_for": "euler"}, rehash=False))
    # a relabel that names another method than the file's own is refused even with a recomputed hash
    with pytest.raises(ValueError, match="'exact_for' is 'heun2', but an exact latent is made for"):
        load_latents(_tampered(tmp_path, good, {"exact_for": "heun2"}, rehash=True))
    with pytest.raises(ValueError, match="'exact_for' is 'dopri5'"):
        load_latents(_tampered(tmp_path, good, {"exact_for": "dopri5", "method": "dopri5"}, rehash=True))


def test_a_latent_without_its_hash_is_never_called_exact(tmp_path):
    model = _net(0)
    good = _exact_file(tmp_path, model)
    lf = load_latents(_tampered(tmp_path, good, {"content_sha256": None}, {"latents": lambda t: t + 0.5}))
    assert not lf.verified and lf.meta["exact_for"] == "" and "no content hash" in lf.notes[0]
    claim, notes = decode_exactness(lf, "euler", lf.sigmas, model=model)
    assert claim == "" and "no content hash" in notes[0]


def test_a_reversible_latent_without_its_hash_loses_its_state(tmp_path):
    model = _net(0)
    g = grids.ddim(model.schedule, 4)
    enc = probflow.encode(model, torch.zeros(1, 1, 8, 8, dtype=torch.float64), g, "reversible_heun")
    good = save_latents(tmp_path / "z.safetensors", enc.x, g, model, method="reversible_heun", nfe=enc.nfe,
                        state=enc.state.tensors(), grid="uniform")
    lf = load_latents(good)
    assert lf.state and decode_exactness(lf, "reversible_heun", lf.sigmas, state_used=True, model=model)[0] == \
        ", exact inverse (reversible pair, same environment)"
    lf = load_latents(_tampered(tmp_path, good, {"content_sha256": None}))
    assert not lf.verified and lf.state == {}
    assert decode_exactness(lf, "reversible_heun", lf.sigmas, model=model)[0] == ""


def test_an_old_format_file_loads_but_is_not_exact(tmp_path):
    from safetensors import safe_open

    from probflow.io.latents import OLD_FORMAT, _tensor_sha256

    model = _net(0)
    good = _exact_file(tmp_path, model)
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = _tampered(tmp_path, good, {"format": OLD_FORMAT, "content_sha256": _tensor_sha256(tensors).hexdigest()},
                    rehash=False)
    lf = load_latents(old)
    assert not lf.verified and lf.meta["exact_for"] == "" and OLD_FORMAT in lf.notes[0]
    assert decode_exactness(lf, "euler", lf.sigmas, model=model)[0] == ""


def test_condition_and_guidance_are_recorded_and_checked(tmp_path):
    model = _net(0)
    g = grids.named("quadratic_open", model.schedule, 4)
    h = "ab" * 32
    p = save_latents(tmp_path / "z.safetensors", torch.zeros(1, 1, 8, 8), g, model, method="euler", nfe=4,
                     grid="quadratic_open", exact_for="euler", condition_sha256=h, guidance=3.5)
    lf = load_latents(p)
    assert lf.meta["condition_sha256"] == h and float(lf.meta["guidance"]) == 3.5
    assert decode_exactness(lf, "euler", g, model=model, condition_sha256=h, guidance=3.5)[0].startswith(", exact")
    claim, notes = decode_exactness(lf, "euler", g, model=model, condition_sha256="cd" * 32)
    assert claim == "" and "another condition" in notes[0]
    claim, notes = decode_exactness(lf, "euler", g, model=model, condition_sha256=h, guidance=1.0)
    assert claim == "" and "guidance 1" in notes[0]
    with pytest.raises(ValueError, match="'condition_sha256'"):
        load_latents(_tampered(tmp_path, p, {"condition_sha256": "xyz"}))
    with pytest.raises(ValueError, match="guidance"):
        save_latents(tmp_path / "w.safetensors", torch.zeros(1, 1, 8, 8), g, model, method="euler", nfe=4,
                     guidance=float("nan"))


def test_oversized_headers_and_files_are_refused_before_reading(tmp_path):
    big = tmp_path / "big.safetensors"
    big.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length 1099511627776"):
        load_latents(big)
    g = torch.tensor([2.0, 0.0], dtype=torch.float64)
    good = save_latents(tmp_path / "z.safetensors", torch.ones(2, 4), g, GM, method="euler", nfe=1)
    with pytest.raises(ValueError, match="above the limit of 100 for a latent file"):
        load_latents(good, max_bytes=100)
