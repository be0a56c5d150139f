"""The discrete-time adapter (docs/MATH.md §5) and diffusers checkpoints loaded from a local folder.

Claims: every prediction type is converted to ε exactly; t(σ) is exact at the table and the rounded-t
option stays within its documented error; a tiny random diffusers UNet2DModel saved with save_pretrained
samples identically through probflow's Euler and diffusers' own DDIMScheduler loop; beta_schedule names map
onto diffusers' tables; no network is touched; bad checkpoints give a ValueError naming what is wrong.
"""

import json
import math
import re
import socket

import pytest
import torch

import probflow
from probflow import grids, schedules
from probflow.models import GaussianMixture
from probflow.models.adapters import DiscreteTimeModel, from_diffusers, schedule_from_config

SCH = schedules.linear()
MIX = GaussianMixture.random(4, 3, seed=2, std_range=(0.1, 0.6))


def prediction_net(kind: str, log: list | None = None):
    """A net(x, t) whose output is the exact `kind` prediction of the mixture at σ(t), written from the
    forward definitions x = a·x_0 + b·ε, v = a·ε − b·x_0 (a = sqrt(ᾱ), b = sqrt(1 − ᾱ), ᾱ = 1/(1 + σ²))."""

    def net(x, t):
        if log is not None:
            log.append(t.clone())
        s = SCH.sigma(t[0].double())
        eps = MIX(x, s)
        ab = 1.0 / (1.0 + s * s)
        a, b = ab.sqrt(), (1 - ab).sqrt()
        x0 = (x - b * eps) / a
        return {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[kind]

    return net


# σ on and between table entries, from σ_0 to σ_max
SIGMAS = [SCH.sigmas[0].item(), 0.05, 0.3, 1.0, SCH.sigmas[400].item(), 3.7, 40.0, SCH.sigma_max]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_is_converted_to_the_exact_eps(kind):
    model = DiscreteTimeModel(prediction_net(kind), SCH, kind)
    x = torch.randn(6, 4, dtype=torch.float64)
    for s in SIGMAS:
        s = torch.tensor(s, dtype=torch.float64)
        ref = MIX(x, s)
        assert (model(x, s) - ref).abs().max().item() <= 1e-9 * (1 + ref.abs().max().item())


def test_prediction_types_differ_so_a_wrong_conversion_is_detected():
    """Negative control: reading a v- or x̂_0-network's output as ε is far off."""
    x = torch.randn(6, 4, dtype=torch.float64)
    s = torch.tensor(1.0, dtype=torch.float64)
    ref = MIX(x, s)
    for kind in ("v_prediction", "sample"):
        wrong = DiscreteTimeModel(prediction_net(kind), SCH, "epsilon")
        assert (wrong(x, s) - ref).abs().max().item() > 0.1


def test_float_t_is_exact_at_the_table_and_fractional_between():
    log: list = []
    model = DiscreteTimeModel(prediction_net("epsilon", log), SCH)
    x = torch.randn(3, 4, dtype=torch.float64)
    for k in (0, 1, 37, 500, 999):
        model(x, SCH.sigmas[k])
        assert log[-1].dtype == torch.float64 and log[-1].shape == (3,)
        assert log[-1].tolist() == [float(k)] * 3
    model(x, torch.tensor(0.0, dtype=torch.float64))  # below σ_0 clamps to t = 0
    assert log[-1].tolist() == [0.0] * 3
    model(x, SCH.sigma(torch.tensor(250.25)))
    assert abs(log[-1][0].item() - 250.25) <= 1e-9


def test_rounded_t_passes_integers_and_equals_float_t_at_the_rounded_sigma():
    log: list = []
    rounded = DiscreteTimeModel(prediction_net("epsilon", log), SCH, round_t=True)
    exact = DiscreteTimeModel(prediction_net("epsilon"), SCH)
    x = torch.randn(3, 4, dtype=torch.float64)
    for tf in (0.4, 12.6, 250.25, 998.5001):
        s = SCH.sigma(torch.tensor(tf))
        e = rounded(x, s)
        assert log[-1].dtype == torch.int64 and log[-1].tolist() == [round(tf)] * 3
        assert torch.equal(e, exact(x, SCH.sigmas[round(tf)]))
        assert (e - exact(x, s)).abs().max().item() > 0  # it is an approximation between table entries
    for k in (0, 500, 999):  # exact on the table (DDIM grids)
        assert torch.equal(rounded(x, SCH.sigmas[k]), exact(x, SCH.sigmas[k]))


def test_rounded_t_error_in_log_sigma_is_the_documented_half_table_step():
    """The docstring's numbers on the linear T = 1000 table: |log σ_round(t) − log σ| ≤ ½|Δlog σ|,
    at most 0.20 between σ_0 and σ_1 and 0.0051 near σ_max."""
    rounded = DiscreteTimeModel(prediction_net("epsilon"), SCH, round_t=True)
    t = torch.linspace(0, 999, 99901, dtype=torch.float64)
    s = SCH.sigma(t)
    err = (torch.log(SCH.sigmas[rounded.timestep(s).long()]) - torch.log(s)).abs()
    half = 0.5 * (SCH.sigmas[1:].log() - SCH.sigmas[:-1].log())
    assert (err[:-1] <= half[t[:-1].floor().long()] + 1e-12).all()
    # the largest half step is the first one, from the closed form of the linear table (β_t = 1e-4 … 0.02)
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    s0, s1 = math.sqrt(b0 / (1 - b0)), math.sqrt((1 - (1 - b0) * (1 - b1)) / ((1 - b0) * (1 - b1)))
    assert math.isclose(err.max().item(), 0.5 * math.log(s1 / s0), rel_tol=0.02)
    assert err.max().item() <= 0.20  # the docstring's figure
    assert err[t >= 900].max().item() <= 0.0051
    assert math.isclose(err[t >= 900].max().item(), half[-1].item(), rel_tol=0.02)


def test_rounded_t_spoils_second_order_convergence():
    """Heun on float t converges at order 2; with rounded t the error stalls at the rounding's level.
    Exact reference: a net that is the ε of N(μ, s²I), whose flow is
    x̄(σ) = μ + (x̄(σ₀) − μ)·sqrt((s² + σ²)/(s² + σ₀²))."""
    mu, s2 = 0.7, 0.09

    def gaussian_net(x, t):
        s = SCH.sigma(t[0].double())
        return (x * (1 + s * s).sqrt() - mu) * s / (s2 + s * s)

    x_T = probflow.noise(4, (2,), seed=1)
    s0, s1 = SCH.sigma_max, 0.5
    xbar1 = mu + (x_T * math.sqrt(1 + s0 * s0) - mu) * math.sqrt((s2 + s1 * s1) / (s2 + s0 * s0))
    ref = xbar1 / math.sqrt(1 + s1 * s1)

    def err(round_t, n):
        grid = grids.log_uniform(s0, s1, n, final_zero=False)
        return (probflow.sample(DiscreteTimeModel(gaussian_net, SCH, round_t=round_t), x_T, grid, "heun2").x
                - ref).abs().max().item()

    e1, e2 = err(False, 128), err(False, 256)
    r1, r2 = err(True, 128), err(True, 256)
    assert 1.8 < math.log2(e1 / e2) < 2.2
    assert math.log2(r1 / r2) < 1.0 and r2 > 3 * e2


def test_adapter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteTimeModel(prediction_net("epsilon"), SCH, "x0")
    with pytest.raises(TypeError, match="schedule"):
        DiscreteTimeModel(prediction_net("epsilon"), "linear")
    with pytest.raises(TypeError, match="net"):
        DiscreteTimeModel(None, SCH)
    model = DiscreteTimeModel(prediction_net("epsilon"), SCH)
    with pytest.raises(ValueError, match="sigma"):
        model(torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------- diffusers checkpoints

diffusers = pytest.importorskip("diffusers")


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def save_checkpoint(folder, unet, **scheduler_kwargs):
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(**scheduler_kwargs).save_pretrained(folder / "scheduler")
    return folder


def diffusers_ddim(unet, folder, x_T, steps):
    """diffusers' own DDIM loop on the checkpoint's scheduler config (trailing spacing, last step to ᾱ = 1)."""
    config = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config
    sched = diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True,
                                                clip_sample=False)
    sched.set_timesteps(steps)
    x = x_T.float()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x, sched.timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_checkpoint_euler_equals_diffusers_ddim_loop(tmp_path, unet, prediction_type):
    folder = save_checkpoint(tmp_path, unet, prediction_type=prediction_type)
    model = from_diffusers(folder)
    assert model.prediction_type == prediction_type and model.sample_shape == (2, 8, 8)
    x_T = probflow.noise(4, (2, 8, 8), seed=7)
    steps = 10
    ref, timesteps = diffusers_ddim(unet, folder, x_T, steps)
    assert timesteps.tolist() == grids.ddim_timesteps(model.schedule, steps).tolist()
    sol = probflow.sample(model, x_T, grids.ddim(model.schedule, steps), "euler")
    assert sol.nfe == steps
    assert (sol.x.float() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # negative control: the wrong prediction type is detected by the same bound
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    wrong = probflow.sample(from_diffusers(folder, prediction_type=other), x_T, grids.ddim(model.schedule, steps))
    assert (wrong.x.float() - ref).abs().max().item() > 1e-2


def test_diffusers_unet_sees_the_table_timesteps_and_the_loaded_weights(tmp_path, unet):
    folder = save_checkpoint(tmp_path, unet)
    model = from_diffusers(folder)
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        for k in (0, 499, 999):
            ref = unet(x, torch.tensor(k)).sample
            assert torch.equal(model(x, model.schedule.sigmas[k]), ref)
        assert (unet(x, torch.tensor(999)).sample - unet(x, torch.tensor(500)).sample).abs().max() > 1e-3


@pytest.mark.parametrize("kind,kwargs", [
    ("linear", {}),
    ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", {}),
    ("linear", {"num_train_timesteps": 500, "beta_start": 2e-4, "beta_end": 0.04}),
])
def test_beta_schedule_names_map_onto_diffusers_tables(kind, kwargs):
    sched = diffusers.DDPMScheduler(beta_schedule=kind, **kwargs)
    ours = schedule_from_config(dict(sched.config))
    theirs = sched.alphas_cumprod.double()
    assert ours.T == theirs.numel()
    assert ((ours.alpha_bar - theirs).abs() / theirs).max().item() <= 5e-5  # diffusers accumulates in float32


def test_trained_betas_map_onto_the_table():
    betas = torch.linspace(1e-4, 0.03, 100, dtype=torch.float64)
    sched = schedule_from_config({"trained_betas": betas.tolist(), "num_train_timesteps": 100})
    assert torch.allclose(sched.alpha_bar, torch.cumprod(1 - betas, 0), rtol=1e-14, atol=0)


def test_loading_touches_no_network(tmp_path, unet, monkeypatch):
    folder = save_checkpoint(tmp_path, unet)

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = from_diffusers(folder)
    assert model(torch.zeros(1, 2, 8, 8), torch.tensor(1.0)).shape == (1, 2, 8, 8)


def test_unet_folder_with_scheduler_config_beside_it_loads(tmp_path, unet):
    unet.save_pretrained(tmp_path)
    diffusers.DDPMScheduler(beta_schedule="scaled_linear").save_config(tmp_path)
    model = from_diffusers(tmp_path)
    assert model.schedule.name == "scaled_linear"
    by_path = probflow.models.load(str(tmp_path))  # models.load accepts a local diffusers folder
    assert by_path.fingerprint == model.fingerprint and by_path.schedule.name == "scaled_linear"


def test_bad_checkpoints_raise_value_errors_naming_the_problem(tmp_path, unet):
    with pytest.raises(ValueError, match="folder"):
        from_diffusers(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="config.json"):
        from_diffusers(tmp_path)
    folder = save_checkpoint(tmp_path / "ok", unet)

    bad = save_checkpoint(tmp_path / "nosched", unet)
    (bad / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ValueError, match="scheduler config"):
        from_diffusers(bad)

    for key, value, match in [("beta_schedule", "sigmoid", "beta_schedule"),
                              ("prediction_type", "x0", "prediction_type")]:
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        cfg[key] = value
        bad = save_checkpoint(tmp_path / key, unet)
        (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            from_diffusers(bad)

    bad = save_checkpoint(tmp_path / "corrupt", unet)
    w = bad / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="weights"):
        from_diffusers(bad)
    w.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="weights"):
        from_diffusers(bad)

    bad = save_checkpoint(tmp_path / "mismatch", unet)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [8, 32]
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights"):
        from_diffusers(bad)


class _Payload:
    """Unpickling this would create a file: the loader must refuse it (weights_only=True)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_bin_weights_are_not_unpickled(tmp_path, unet):
    folder = save_checkpoint(tmp_path, unet)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "executed"
    torch.save({"payload": _Payload(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        from_diffusers(folder)
    assert not marker.exists()


def test_bin_state_dict_loads_with_weights_only(tmp_path, unet):
    folder = save_checkpoint(tmp_path, unet)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    model = from_diffusers(folder)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, model.schedule.sigmas[999]), unet(x, torch.tensor(999)).sample)


def test_parameter_count_before_building_is_the_built_networks_count(unet):
    from probflow.models.adapters import count_parameters

    n = count_parameters(lambda: diffusers.UNet2DModel.from_config(unet.config), "config", None)
    assert n == sum(p.numel() for p in unet.parameters()) > 0
    with pytest.raises(ValueError, match=re.escape(f"config: the network would have {n:.3g} parameters")):
        count_parameters(lambda: diffusers.UNet2DModel.from_config(unet.config), "config", n - 1)


# ---------------------------------------------------------------- bounded configs and JSON (issue 27)

def test_json_is_bounded_in_size_and_depth_before_parsing():
    from probflow.models.adapters import json_depth, loads_json

    assert json_depth('{"a": [1, {"b": "[[[["}]}') == 3  # brackets inside strings do not count
    assert loads_json('{"a": [[1]]}', "cfg") == {"a": [[1]]}
    with pytest.raises(ValueError, match="cfg: JSON nested 100000 deep, above the limit of 32"):
        loads_json("[" * 100_000 + "]" * 100_000, "cfg")
    with pytest.raises(ValueError, match="above the limit of 10"):
        loads_json('{"a": "' + "x" * 20 + '"}', "cfg", max_bytes=10)
    with pytest.raises(ValueError, match="cfg is not valid JSON"):
        loads_json("{oops", "cfg")


@pytest.mark.parametrize("cfg,frag", [
    ({"sample_size": 10**6, "block_out_channels": [8, 16]}, "sample_size: 1000000×1000000"),
    ({"sample_size": 9, "block_out_channels": [8, 16]}, "does not fit the network's 2 resolutions"),
    ({"sample_size": 8, "block_out_channels": [8] * 10**5}, "block_out_channels: expected 1 to 16"),
    ({"layers_per_block": 10**6}, "layers_per_block: expected an integer in \\[1, 64\\]"),
    ({"in_channels": 1, "out_channels": 3}, "out_channels: expected 1"),
    ({"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"]}, "down_block_types: expected 2"),
    ({"sample_size": [8, 8, 8]}, "sample_size: expected a positive integer or"),
])
def test_a_diffusers_config_is_bounded_before_it_is_built(cfg, frag):
    from probflow.models.adapters import check_diffusers_config

    with pytest.raises(ValueError, match=frag):
        check_diffusers_config(cfg, "config")


def test_a_diffusers_config_within_bounds_gives_the_sample_shape():
    from probflow.models.adapters import check_diffusers_config

    cfg = {"sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [64, 128, 256]}
    assert check_diffusers_config(cfg, "config") == (3, 32, 32)
    assert check_diffusers_config({**cfg, "sample_size": 10**5}, "config", max_pixels=None) == (3, 10**5, 10**5)
