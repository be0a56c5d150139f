"""The CLI exposes what the Python API offers: --grid, --eta/--gamma, --device, --scale, --version, the
`ddim` alias, `python -m probflow`; and it is the API (same samples as `probflow.sample`)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import probflow
from probflow import grids, models, sde
from probflow.cli import main
from probflow.io.images import to_uint8


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _px(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def digits():
    return models.load("digits")


def _api_pixels(model, sol_x):
    return to_uint8(sol_x.float().double())


@pytest.mark.parametrize("grid", ["quadratic", "log_snr_tuned", "karras"])
def test_sample_grid_flag_is_the_api_on_that_grid(digits, grid, tmp_path, capsys):
    out = tmp_path / "s.png"
    rc, msg, _ = _run(capsys, "sample", "--n", 2, "--method", "dpmpp_2m", "--grid", grid, "--steps", 4, "--scale", 1,
                      "--out", out, "--quiet")
    assert rc == 0, msg
    g = grids.named(grid, digits.schedule, 4)
    x = probflow.sample(digits, probflow.noise(2, (1, 8, 8), 0), g, "dpmpp_2m").x
    pix = _px(out)  # nrow = 2, pad 2, scale 1: 2 + 8 + 2 + 8 + 2 wide
    assert pix.shape == (12, 22)
    assert np.array_equal(pix[2:10, 2:10], to_uint8(x[0])[..., 0])
    assert np.array_equal(pix[2:10, 12:20], to_uint8(x[1])[..., 0])


def test_ddim_alias_is_euler(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert _run(capsys, "sample", "--n", 2, "--method", "ddim", "--steps", 5, "--out", a, "--quiet")[0] == 0
    assert _run(capsys, "sample", "--n", 2, "--method", "euler", "--steps", 5, "--out", b, "--quiet")[0] == 0
    assert a.read_bytes() == b.read_bytes()


def test_eta_and_gamma_run_the_stochastic_samplers(digits, tmp_path, capsys):
    out = tmp_path / "eta.png"
    rc, msg, _ = _run(capsys, "sample", "--n", 2, "--eta", 1.0, "--steps", 5, "--scale", 1, "--out", out, "--quiet")
    assert rc == 0 and "NFE 5" in msg
    g = grids.named("uniform", digits.schedule, 5)
    x = probflow.sample(digits, probflow.noise(2, (1, 8, 8), 0), g, sde.stochastic_ddim(1.0, seed=1)).x
    assert np.array_equal(_px(out)[2:10, 2:10], to_uint8(x[0])[..., 0])
    eta0 = tmp_path / "eta0.png"
    euler = tmp_path / "euler.png"
    _run(capsys, "sample", "--n", 2, "--eta", 0.0, "--steps", 5, "--out", eta0, "--quiet")
    _run(capsys, "sample", "--n", 2, "--method", "euler", "--steps", 5, "--out", euler, "--quiet")
    assert eta0.read_bytes() == euler.read_bytes()  # η = 0 is DDIM
    assert _run(capsys, "sample", "--n", 2, "--gamma", 0.5, "--steps", 5, "--out", tmp_path / "g.png",
                "--quiet")[0] == 0
    rc, _, err = _run(capsys, "sample", "--n", 2, "--eta", -1, "--steps", 5, "--out", tmp_path / "bad.png")
    assert rc == 2 and "eta" in err


def test_bad_device_grid_and_scale_are_one_line_errors(tmp_path, capsys):
    rc, _, err = _main(capsys, "sample", "--n", 2, "--device", "nosuchdevice", "--out", tmp_path / "a.png")
    assert rc == 2 and "--device" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, "sample", "--n", 2, "--scale", 0, "--out", tmp_path / "a.png")
    assert rc == 2 and "--scale" in err
    rc, _, err = _run(capsys, "sample", "--n", 2, "--method", "explicit_adams", "--grid", "uniform", "--steps", 4,
                      "--out", tmp_path / "a.png")
    assert rc == 2 and "sigma_uniform" in err
    assert main(["sample", "--out", str(tmp_path / "a.png"), "--grid", "nosuch"]) == 2  # argparse's error, returned


def test_device_cpu_is_accepted(tmp_path, capsys):
    assert _run(capsys, "sample", "--n", 1, "--steps", 2, "--device", "cpu", "--out", tmp_path / "a.png",
                "--quiet")[0] == 0


def test_version_and_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "probflow", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"probflow {probflow.__version__}"
    r = subprocess.run([sys.executable, "-m", "probflow"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "COMMAND" in r.stdout


def test_interpolate_calls_the_api_with_the_encode_state(digits, tmp_path, capsys):
    from probflow.io.images import save_images

    x = torch.tensor(np.stack([np.eye(8), np.fliplr(np.eye(8))]), dtype=torch.float64)[:, None] * 2 - 1
    save_images(x, tmp_path, names=["a", "b"])
    strip = tmp_path / "s.png"
    rc, msg, _ = _run(capsys, "interpolate", tmp_path / "a.png", tmp_path / "b.png", "--method", "rk4", "--steps", 3,
                      "--plain", "--frames", 3, "--scale", 1, "--out", strip, "--quiet")
    assert rc == 0, msg
    g = grids.named("uniform", digits.schedule, 3)
    enc = probflow.encode(digits, x, g, "rk4")
    api = probflow.interpolate(digits, enc.x[:1], enc.x[1:], g, "rk4", frames=3).x
    pix = _px(strip)
    for k in range(3):
        assert np.array_equal(pix[2:10, 2 + 10 * k:10 + 10 * k], to_uint8(api[k, 0])[..., 0])


def test_max_steps_bounds_adaptive_solves_in_the_api_and_the_cli(tmp_path, capsys):
    from probflow.integrate import MaxStepsError

    gm = models.default_mixture()
    g = torch.tensor([80.0, 0.0], dtype=torch.float64)
    with pytest.raises(MaxStepsError, match="stopped at σ = "):
        probflow.sample(gm, probflow.noise(4, (2,), 0), g, "dopri5", rtol=1e-8, atol=1e-8, max_steps=3)
    assert probflow.sample(gm, probflow.noise(4, (2,), 0), g, "dopri5", max_steps=10_000).nfe > 0
    rc, _, err = _run(capsys, "sample", "--n", 2, "--method", "dopri5", "--max-steps", 4, "--out", tmp_path / "a.png",
                      "--quiet")
    assert rc == 2 and "max_steps" in err and "stopped at σ" in err and not (tmp_path / "a.png").exists()
    assert _run(capsys, "sample", "--n", 2, "--max-steps", 0, "--out", tmp_path / "a.png")[0] == 2


# ---------------------------------------------------------------- issue 27: bounds, flags, one-line errors


def _main(capsys, *args):
    """main() as the shell runs it (argparse's own errors come back as status 2, like every other)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def two_pngs(tmp_path_factory):
    from probflow.io.images import save_images

    d = tmp_path_factory.mktemp("pngs")
    x = torch.tensor(np.stack([np.eye(8), np.fliplr(np.eye(8))]), dtype=torch.float64)[:, None] * 2 - 1
    return [str(p) for p in save_images(x, d, names=["a", "b"])]


REFUSED = [  # (argv, fragment): each once ran (allocating, hanging or silently wrong) or raised a traceback
    (["sample", "--steps", "1000000000", "--grid", "logsnr"], "--steps: 1000000000 is above the bound of 100000"),
    (["sample", "--steps", "1000000000", "--grid", "karras"], "--steps: 1000000000 is above the bound of 100000"),
    (["sample", "--steps", "1e9", "--grid", "sigma_uniform", "--method", "explicit_adams"], "--steps: 1000000000"),
    (["sample", "--scale", "100000"], "--scale: the PNG would have"),
    (["sample", "--n", "1e14"], "--n: 100000000000000 samples of 1×8×8 need"),
    (["sample", "--n", "1e9", "--scale", "1"], "--n: 1000000000 samples"),
    (["sample", "--n", "1.5"], "--n: expected an integer, got '1.5'"),
    (["sample", "--seed", str(2**70)], "--seed: expected a non-negative integer below 2**63"),
    (["sample", "--max-steps", "1e12", "--method", "dopri5"], "--max-steps: 1000000000000 is above the bound"),
    (["sample", "--threads", "100000"], "--threads: 100000 is above the bound of"),
    (["sample", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device: "),
    (["sample", "--device", "meta"], "--device: 'meta' cannot run a model"),
    (["sample", "--eta", "0.5", "--method", "dopri5"], "--eta: the stochastic sampler replaces the method"),
    (["sample", "--gamma", "0.5", "--method", "rk4"], "--gamma: the stochastic sampler replaces the method"),
    (["sample", "--precision", "model=int8"], "--precision: unknown model dtype"),
    (["demo", "--n", "1e9"], "--n: 1000000000 is above the bound of 100000"),
    (["bench", "--samples", "1e9"], "--samples: 1000000000 is above the bound of 65536"),
    (["bench", "--nfe", "5,1000000000"], "--nfe: 1000000000 is above the bound of 10000"),
    (["bench", "--suites", ",,,"], "--suites: expected at least one comma-separated value"),
    (["bench", "--methods", ","], "--methods: expected at least one comma-separated value"),
    (["bench", "--threads", "100000"], "--threads: 100000 is above the bound of"),
    (["bench", "--ref-tol", "1e-30"], "--ref-tol: 1e-30 is below the floor 1e-10"),
    (["train", "digits", "--steps", "1e12"], "--steps: 1000000000000 is above the bound of 1000000"),
    (["train", "digits", "--eval-samples", "1e9"], "--eval-samples: 1000000000 is above the bound"),
]


@pytest.mark.parametrize("argv,fragment", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_unbounded_and_conflicting_flags_are_one_line_errors(argv, fragment, tmp_path, capsys):
    out = ["--out", tmp_path / ("o" if argv[0] == "train" else "o.png")] if argv[0] != "bench" else [
        "--out", tmp_path / "b"]
    rc, _, err = _main(capsys, *argv, *out, *(["--quiet"] if argv[0] == "sample" else []))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"probflow {argv[0]}: error: ") and fragment in lines[0], err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--draws", "--probes"])
def test_likelihood_draws_and_probes_are_bounded(flag, two_pngs, capsys):
    rc, _, err = _main(capsys, "likelihood", two_pngs[0], flag, "1e9")
    assert rc == 2 and f"probflow likelihood: error: {flag}: 1000000000 is above the bound of 1000" in err
    rc, out, err = _main(capsys, "likelihood", *two_pngs, flag, "2", "--batch", "1", "--steps", "3", "--quiet",
                         *(["--divergence", "hutchinson"] if flag == "--probes" else []))
    assert rc == 0 and "NFE 12 per image" in out, err  # NFE per image's path (rk4: 4 × 3), not summed over the batches


def test_interpolate_refuses_reversible_heun_and_unbounded_frames(two_pngs, tmp_path, capsys):
    rc, _, err = _main(capsys, "interpolate", *two_pngs, "--method", "reversible_heun", "--out", tmp_path / "s.png")
    assert rc == 2 and "--method: reversible_heun's inner frames have no partner state" in err
    rc, _, err = _main(capsys, "interpolate", *two_pngs, "--frames", "1e9", "--out", tmp_path / "s.png")
    assert rc == 2 and "--frames: 1000000000 is above the bound of 1000" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out", ["newdir/", "newdir/.", "."])
def test_out_naming_a_folder_is_refused_for_file_outputs(out, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _main(capsys, "sample", "--n", 2, "--steps", 2, "--quiet", "--out", out)
    assert rc == 2 and "names a folder; expected a file name" in err
    assert not list(tmp_path.iterdir())  # no file named "newdir"


def test_steps_with_an_adaptive_method_is_said_not_silently_dropped(tmp_path, capsys):
    rc, msg, err = _main(capsys, "sample", "--n", 2, "--method", "dopri5", "--rtol", "1e-2", "--atol", "1e-2",
                         "--steps", 10, "--quiet", "--out", tmp_path / "a.png")
    assert rc == 0 and "note: --steps 10 is not used: dopri5 is adaptive" in err, err


def test_no_limits_lifts_a_bound(tmp_path, capsys):
    rc, _, err = _main(capsys, "sample", "--n", 1, "--steps", 2, "--threads", 100, "--quiet", "--out", tmp_path / "a")
    assert rc == 2 and "--threads" in err
    rc, msg, err = _main(capsys, "sample", "--n", 1, "--steps", 2, "--threads", (os.cpu_count() or 1) + 1,
                         "--no-limits", "--quiet", "--out", tmp_path / "a.png")
    assert rc == 0, err


def test_printed_nfe_is_per_sample_with_the_batched_total_beside_it(tmp_path, capsys):
    rc, msg, _ = _main(capsys, "sample", "--n", 8, "--chunk", 4, "--method", "euler", "--steps", 5, "--quiet",
                       "--out", tmp_path / "a.png")
    assert rc == 0 and "NFE 5 per sample (10 batched model calls over 2 chunks)" in msg, msg
    rc, msg, _ = _main(capsys, "sample", "--n", 4, "--method", "euler", "--steps", 5, "--quiet",
                       "--out", tmp_path / "b.png")
    assert rc == 0 and msg.rstrip().endswith("NFE 5"), msg


def test_the_arguments_are_never_written_back(two_pngs, tmp_path, capsys):
    """The request is made once from `args`; no command changes `args` (the method alias, the exact grid,
    a decode's method and tolerances from the file were once written back)."""
    from probflow.cli import build_parser
    from probflow.cli.inversion import run_decode, run_encode
    from probflow.cli.sample import run_sample

    p = build_parser()
    z = tmp_path / "z.safetensors"
    for run, argv in ((run_sample, ["sample", "--n", "2", "--method", "ddim", "--steps", "3", "--out",
                                    str(tmp_path / "s.png")]),
                      (run_encode, ["encode", *two_pngs, "--steps", "3", "--out", str(z)]),
                      (run_decode, ["decode", str(z), "--out", str(tmp_path / "d")])):
        args = p.parse_args([*argv, "--quiet"])
        before = dict(vars(args))
        assert run(args) == 0
        assert vars(args) == before
    capsys.readouterr()


def test_ctrl_c_while_python_is_still_importing_is_one_line_and_exit_130(tmp_path):
    """SIGINT soon after start lands while torch is imported (or, on a fast machine, during the run): either way
    one line on stderr, exit 130, no traceback and no output file."""
    import signal
    import time

    out = tmp_path / "s.png"
    cmd = [sys.executable, "-m", "probflow", "sample", "--n", "256", "--steps", "500", "--out", str(out)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_ctrl_c_turned_into_another_error_by_a_library_is_still_an_interrupt(monkeypatch, capsys, tmp_path):
    """torch's C++ code turns a KeyboardInterrupt raised inside it into a RuntimeError, and a loader may wrap that in a
    ValueError ("not a digits checkpoint"): the command still says "interrupted" and exits 130, not 2."""
    import signal
    import time

    import probflow.cli.sample as S

    def run_sample(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the handler raises KeyboardInterrupt at the next bytecode
            time.sleep(5)
        except KeyboardInterrupt:
            raise ValueError("not a digits checkpoint: could not determine the shape of object type") from None
        return 0

    monkeypatch.setattr(S, "run_sample", run_sample)
    argv = ["sample", "--n", "1", "--quiet", "--out", str(tmp_path / "s.png")]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 130 and err.strip() == "probflow sample: interrupted; nothing half-written was left behind", err
    monkeypatch.setattr(S, "run_sample", lambda args: (_ for _ in ()).throw(ValueError("bad input")))
    assert main(argv) == 2  # without a signal, the same error is bad input
    assert "error: bad input" in capsys.readouterr().err
