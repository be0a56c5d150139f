"""`probflow bench` (probflow.bench): the quick run writes consistent JSON, markdown and plots, its numbers are
reproduced by independent code (a hand-written DDIM of Eq. 11, scipy's DOP853 called directly, a closed-form
Gaussian flow), and `--model` benchmarks any model: a diffusers folder, or a Python entry point."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from probflow import bench, grids
from probflow.bench import fair, report
from probflow.cli import main
from probflow.flows import noise
from probflow.models import GaussianMixture
from probflow.schedules import linear
from probflow.solvers import METHODS

PNG = b"\x89PNG\r\n\x1a\n"


def _tiny_digits(folder):
    """A small random digits checkpoint: UNet(8, 16) with a non-zero output layer, so ε is a non-trivial smooth
    function of (x, t)."""
    from probflow.digits.train import save
    from probflow.models.digits import as_model
    from probflow.models.unet import UNet

    torch.manual_seed(0)
    net = UNet(1, (8, 16), 1)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    save(net, {"name": "tiny random test model", "fingerprint": as_model(net).fingerprint}, folder)
    return folder


def _ddim_by_hand(eps, z: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM (Eq. 11, in x and ᾱ) on the trailing grid of the linear table, written out with no probflow solver."""
    sch = linear()
    ab = sch.alpha_bar
    ts = grids.ddim_timesteps(sch, steps).tolist()
    x = z.clone()
    for i, t in enumerate(ts):
        a_t = float(ab[t])
        a_s = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        e = eps(x, math.sqrt((1 - a_t) / a_t))
        x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * e
    return x


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench")
    model = _tiny_digits(tmp_path_factory.mktemp("digits"))
    rc = main(["bench", "--quick", "--out", str(out), "--digits-model", str(model), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_quick_run_writes_json_markdown_and_plots(quick):
    out, res = quick
    assert set(res["workloads"]) == {"mixture D=2", "mixture D=64", "digits"}
    assert not res["skipped"]
    for name in res["plots"]:
        assert (out / name).read_bytes()[:8] == PNG, name
    assert {"headline.png", "error_vs_nfe_mixture_D64.png", "error_vs_wall_mixture_D64.png",
            "error_vs_nfe_digits.png"} <= set(res["plots"])
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert res["command"] in md and "--quick" in res["command"]
    assert "![headline.png](headline.png)" in md
    for key in ("torch", "diffusers", "torchdiffeq", "scipy"):
        assert res["versions"][key]


def test_quick_output_says_it_is_a_smoke_run_and_carries_no_verdicts(quick):
    out, res = quick
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert res["quick"] is True and "Smoke run (`--quick`)" in md
    text = (md + (out / "results.json").read_text(encoding="utf-8")).lower()
    for word in ("target met", "not met", "issue", "| yes |", "| no |"):
        assert word not in text, word


def test_every_row_has_counted_nfe_and_finite_errors(quick):
    _, res = quick
    for wname, w in res["workloads"].items():
        fair_peers = {"fair_peer"} if wname == "digits" and fair.fair_peers() else set()  # --peers fair: models
        assert {r["family"] for r in w["rows"]} == {"probflow", "adaptive", "peer"} | fair_peers, wname
        for r in w["rows"]:
            assert r["error"] is None, r
            assert math.isfinite(r["rmse"]) and 0 <= r["median"] <= r["max"], r
            assert r["wall_s"] > 0
            m = METHODS.get(r["method"])
            if r["family"] == "adaptive":
                assert r["nfe"] > 0 and r["tol"] is not None
            elif r["family"] == "probflow":
                # stages × steps + the declared extra calls, counted by the field
                assert r["nfe"] == r["steps"] * m.stages + m.extra_calls, r
            elif r["method"] == "ddim":
                assert r["nfe"] == r["steps"], r
            elif r["family"] == "fair_peer":  # k-diffusion's Heun/DPM++(2S): 2n − 1 calls, the others n
                assert r["nfe"] in (r["steps"], 2 * r["steps"] - 1) and r["nfe"] <= r["nfe_target"], r


def test_reported_errors_match_an_independent_ddim_and_scipy_reference(quick):
    # Re-derive one reported number with no probflow solver code: DDIM (Eq. 11) against scipy's DOP853 on Eq. 12.
    _, res = quick
    w = res["workloads"]["mixture D=2"]
    n = w["extra"]["n_samples"]
    model = GaussianMixture.random(2, 8, 0, std_range=(0.05, 0.5))
    z = noise(n, (2,), 1)
    smax = linear().sigma_max

    def f(s, y):  # Eq. 12 for all samples at once
        st = torch.tensor(s, dtype=torch.float64)
        return model(torch.from_numpy(y).view(n, 2) / math.sqrt(1 + s * s), st).view(-1).numpy()

    sol = solve_ivp(f, (smax, 0.0), (z * math.sqrt(1 + smax**2)).view(-1).numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    ref = sol.y[:, -1].reshape(n, 2)
    x = _ddim_by_hand(lambda x, s: model(x, torch.tensor(s, dtype=torch.float64)), z, 10)
    rmse = float(np.sqrt(((x.numpy() - ref) ** 2).mean()))
    row = next(r for r in w["rows"] if r["family"] == "probflow" and r["method"] == "euler"
               and r["grid"] == "uniform" and r["nfe_target"] == 10)
    assert row["rmse"] == pytest.approx(rmse, rel=1e-6)
    peer = next(r for r in w["rows"] if r["family"] == "peer" and r["method"] == "ddim" and r["nfe_target"] == 10)
    assert peer["rmse"] == pytest.approx(rmse, rel=1e-6)


def test_references_record_their_convergence_check(quick):
    _, res = quick
    for wname, w in res["workloads"].items():
        ref = w["reference"]
        assert ref["check_rtol"] > ref["rtol"] and ref["nfe"] > ref["check_nfe"] > 0, wname
        # the tight and the looser solve agree far below every error the tables report
        smallest = min(r["rmse"] for r in w["rows"] if r["rmse"] > 1e-10)
        assert ref["check_rmse"] < 0.2 * smallest, wname
    assert res["workloads"]["mixture D=2"]["reference"]["method"] == "scipy_dop853"


def test_markdown_tables_match_the_json(quick):
    out, res = quick
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    rows = res["workloads"]["mixture D=64"]["rows"]
    best = bench.best_per_nfe(rows)
    assert [b["nfe"] for b in best] == res["config"]["nfe"]
    for b in best:
        p, q = b["probflow"], b["peer"]
        assert p["nfe"] <= b["nfe"] and q["nfe"] <= b["nfe"]
        assert all(r["rmse"] >= p["rmse"] for r in rows if r["family"] == "probflow" and r["nfe_target"] == b["nfe"])
        assert f"| {b['nfe']} | {p['method']}/{p['grid']} | {p['nfe']} | {p['rmse']:.2e} | {p['median']:.2e} |" in md
    for h in report.headline_rows(rows):
        u, q = h["uncalibrated"], h["peer"]
        assert f"| {h['nfe']} | {h['ddim']['rmse']:.2e} | — | {u['rmse']:.2e} `{u['method']}/{u['grid']}` | " in md


def test_overhead_is_reported_as_ratios_to_a_bare_torchdiffeq_loop(quick):
    # timings belong to the benchmark: only the structure is checked here, never a time
    _, res = quick
    ov = res["overhead"]
    by = {r["solver"]: r for r in ov["rows"]}
    assert by["torchdiffeq.odeint euler (bare)"]["ratio"] == 1.0
    assert any(k.startswith("diffusers DDIMScheduler") for k in by)
    assert ov["euler_ratio"] == by["probflow euler"]["ratio"]
    assert by["probflow heun2"]["nfe_per_step"] == 2.0


def test_existing_results_are_kept_unless_forced(quick, tmp_path, capsys):
    out, _ = quick
    before = (out / "results.json").read_bytes()
    assert main(["bench", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    (tmp_path / "RESULTS.md").write_text("old", encoding="utf-8")
    assert main(["bench", "--quick", "--suites", "overhead", "--out", str(tmp_path), "--force", "--no-progress"]) == 0
    assert "Solver overhead" in (tmp_path / "RESULTS.md").read_text(encoding="utf-8")


def test_default_output_is_a_fresh_folder_not_the_committed_benchmarks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", "--suites", "overhead", "--no-progress"]) == 0
    (run,) = (tmp_path / "bench-out").iterdir()
    assert (run / "results.json").is_file() and not (tmp_path / "benchmarks").exists()


@pytest.mark.parametrize("args, name", [
    (["--suites", "nope"], "--suites"), (["--methods", "nope"], "--methods"), (["--grids", "nope"], "--grids"),
    (["--nfe", "0"], "--nfe"), (["--nfe", "x"], "--nfe"), (["--samples", "1"], "--samples"),
    (["--digits-model", "/nonexistent"], "--digits"), (["--methods", "scipy_dop853"], "--methods"),
    (["--model", "nope"], "--model"), (["--model", "no_such_module_xyz:make"], "--model"),
    (["--model", "json:nope"], "--model"), (["--suites", "model"], "--suites"),
    (["--ref-tol", "1e-6", "--check-tol", "1e-8"], "--check-tol"), (["--ref-method", "euler"], "--ref-method"),
    (["--model", "mixture2d", "--budget-minutes", "1e-9"], "--budget-minutes"),
])
def test_bad_arguments_are_refused_in_one_line_naming_the_option(tmp_path, capsys, args, name):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert name in err and "\n" not in err, err
    assert not (tmp_path / "results.json").exists()


# ------------------------------------------------------------------------------------------- --model SPEC

MODULE = '''
import torch
from probflow.models import GaussianMixture

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
S = torch.tensor([0.3, 0.7], dtype=torch.float64)


def make():
    return GaussianMixture(torch.ones(1, dtype=torch.float64), MU[None], torch.diag(S**2)[None])
'''


def test_model_entry_point_is_benchmarked_against_its_closed_form_flow(tmp_path, monkeypatch):
    # One Gaussian N(μ, diag s²): ε(x, σ) = σ(x̄ − μ)/(s² + σ²) with x̄ = x·sqrt(1 + σ²), and the flow ends at
    # x_0 = μ + (x̄_T − μ)·s/sqrt(s² + σ_max²) (STYLE.md habit 5) — both written here, not taken from probflow.
    (tmp_path / "bench_gauss_model.py").write_text(MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bench_gauss_model", raising=False)
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--model", "bench_gauss_model:make", "--samples", "6", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (w,) = res["workloads"].values()
    assert res["config"]["model"] == "bench_gauss_model:make" and w["reference"]["method"] == "scipy_dop853"
    mu, s = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 0.7], dtype=torch.float64)
    smax = linear().sigma_max
    z = noise(6, (2,), 0)
    exact = mu + (z * math.sqrt(1 + smax**2) - mu) * s / torch.sqrt(s**2 + smax**2)

    def eps(x, sig):
        return sig * (x * math.sqrt(1 + sig * sig) - mu) / (s**2 + sig * sig)

    rmse = float((_ddim_by_hand(eps, z, 10) - exact).pow(2).mean().sqrt())
    row = next(r for r in w["rows"] if (r["family"], r["method"], r["grid"], r["nfe_target"])
               == ("probflow", "euler", "uniform", 10))
    assert row["rmse"] == pytest.approx(rmse, rel=1e-6)
    assert (out / "RESULTS.md").is_file() and all((out / p).is_file() for p in res["plots"])


def _tiny_diffusers_folder(folder):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler().save_pretrained(folder / "scheduler")
    return folder


def test_model_diffusers_folder_runs_end_to_end(tmp_path):
    torch.set_num_threads(1)
    folder = _tiny_diffusers_folder(tmp_path / "tiny-ddpm")
    out = tmp_path / "out"
    # a random network's ε is rough in t: a loose reference keeps this smoke run short (the report then cautions)
    assert main(["bench", "--model", str(folder), "--quick", "--samples", "2", "--ref-tol", "1e-4", "--check-tol",
                 "1e-3", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (w,) = res["workloads"].values()
    assert w["reference"]["method"] == "dopri5" and w["reference"]["rtol"] == 1e-4 and w["extra"]["shape"] == [1, 8, 8]
    assert {r["family"] for r in w["rows"]} == {"probflow", "adaptive", "peer"} | (
        {"fair_peer"} if fair.fair_peers() else set())
    assert all(r["error"] is None and math.isfinite(r["rmse"]) for r in w["rows"])
    assert w["reference"]["error_tol"] == 1e-5 and w["reference"]["error_rmse"] > 0  # measured at tol / 10
    md = (out / "RESULTS.md").read_text(encoding="utf-8")
    assert f"Model `{folder}`" in md and all((out / p).read_bytes()[:8] == PNG for p in res["plots"])


# ------------------------------------------------------------------------------------------- library pieces


def test_adams_methods_run_on_equal_sigma_steps():
    # torchdiffeq's Adams coefficients assume equal steps: the benchmark gives them the σ-uniform grid
    w = bench.mixture_workload(2, 4, 0, ref_tol=1e-9, check_tol=1e-7)
    rows = bench.run_workload(w, ["explicit_adams", "implicit_adams"], ["uniform", "karras"], [20], (), [])
    assert [r["grid"] for r in rows] == [bench.UNIFORM_STEP_GRID] * 2
    assert all(r["error"] is None and math.isfinite(r["rmse"]) for r in rows)
    # explicit Adams' declared start-up calls are taken off its steps, so its counted NFE meets the target
    assert rows[0]["nfe"] == 20 and rows[0]["steps"] == 20 - METHODS["explicit_adams"].extra_calls
    sig = bench.grid_sigmas(bench.UNIFORM_STEP_GRID, w.schedule, 20)
    assert torch.allclose(sig.diff(), sig.diff()[0].expand(20), rtol=1e-12)


def test_best_per_nfe_never_credits_a_run_with_extra_calls_and_reports_the_uncalibrated_best():
    def row(fam, m, nfe, rmse, grid="g"):
        return {"family": fam, "method": m, "grid": grid, "nfe_target": 10, "nfe": nfe, "rmse": rmse,
                "median": rmse, "error": None}

    rows = [row("probflow", "a", 11, 1e-9), row("probflow", "b", 10, 1e-3), row("peer", "c", 9, 1e-2),
            row("probflow", "d", 10, 1e-4, bench.CALIBRATED)]
    (b,) = bench.best_per_nfe(rows)
    assert b["probflow"]["method"] == "d" and b["uncalibrated"]["method"] == "b" and b["peer"]["method"] == "c"
    assert b["ratio"] == pytest.approx(1e-2) and b["ratio_uncalibrated"] == pytest.approx(0.1)


def test_convergence_order_measures_heun_at_order_2():
    # one broad Gaussian (a smooth flow) so that the asymptotic order shows at small step counts
    g = GaussianMixture(torch.ones(1), torch.zeros(1, 2), 0.25 * torch.eye(2).unsqueeze(0))
    r = bench.convergence_order(g, "heun2", "logsnr", steps=(8, 16, 32), n_samples=4)
    assert r["declared_order"] == 2
    assert 1.7 < r["order"] < 2.4, r


def test_calibrated_grid_is_used_by_its_methods_and_its_cost_kept_out_of_the_rows():
    w = bench.mixture_workload(2, 4, 0, ref_tol=1e-9, check_tol=1e-7)
    cal = {"methods": ("unipc_3",), "nfe": (10,), "options": {"max_evals": 8, "n": 4, "ref_tol": 1e-8}}
    rows = bench.run_workload(w, ["unipc_3", "euler", "dpmpp_3m"], ["logsnr", bench.CALIBRATED], [10, 20], (), [],
                              calibration=cal)
    got = [(r["method"], r["grid"], r["nfe_target"]) for r in rows if r["grid"] == bench.CALIBRATED]
    assert got == [("unipc_3", bench.CALIBRATED, 10)]
    c = w.extra["calibration"]
    assert c["method"] == "unipc_3" and set(c["per_steps"]) == {"10"} and c["cost_nfe"] > 10 and c["wall_s"] > 0
    assert all(r["error"] is None and r["nfe"] <= r["nfe_target"] for r in rows)
    # dpmpp_3m declares one extra call (N + 1 on N steps): it runs one step fewer, so its counted NFE meets the target
    assert [(r["steps"], r["nfe"]) for r in rows if r["method"] == "dpmpp_3m"] == [(9, 10), (19, 20)]
