"""`probflow bench --peers fair`: the named configurations (README's recommended, benchmarks/FAIR.md's chosen) drive
the run, the fair peers are their libraries' own loops on probflow's grids, the measured reference error is an
error, and a difference below it is marked unresolved."""

import json
import math

import pytest
import torch

from probflow.bench import fair, kdiffusion, peers, recipes, report
from probflow.bench.grids import grid_name, grid_sigmas
from probflow.bench.reference import ANALYTIC_REF, reference
from probflow.bench.runner import run_workload
from probflow.bench.workloads import mixture_workload
from probflow.cli import main
from probflow.flows import noise
from probflow.models import GaussianMixture
from probflow.schedules import linear

needs_both = pytest.mark.skipif(not (kdiffusion.available() and peers.available()),
                                reason="k-diffusion and diffusers are both needed")


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    return mixture_workload(2, 3, 0, ref_tol=1e-10, check_tol=1e-8)


def test_recipe_for_takes_the_table_entry_or_the_nearest():
    assert recipes.recipe_for(recipes.RECOMMENDED, 20) == recipes.RECOMMENDED[20]
    assert recipes.recipe_for(recipes.RECOMMENDED, 30) == recipes.RECOMMENDED[20]  # 20 is nearer than 50
    assert recipes.recipe_for(recipes.RECOMMENDED, 35) == recipes.RECOMMENDED[20]  # a tie takes the smaller
    assert recipes.recipe_for(recipes.RECOMMENDED, 7) == recipes.RECOMMENDED[5]
    sch = linear()
    for n, (m, g) in recipes.RECOMMENDED.items():  # every entry is a valid grid for its method's step count
        from probflow.solvers import METHODS

        sig = grid_sigmas(g, sch, METHODS[m].steps_for_nfe(n))
        assert float(sig[-1]) == 0.0 and len(sig) == METHODS[m].steps_for_nfe(n) + 1
    # each entry's grid ends at the σ_min its name says before its last step into 0
    for _, g in recipes.RECOMMENDED.values():
        end = g.__name__.rsplit("/", 1)[1] if "/" in g.__name__ else None
        if end is not None:
            want = sch.sigma_min if end == "s0" else float(end)
            assert math.isclose(float(grid_sigmas(g, sch, 20)[-2]), want, rel_tol=1e-9)


def test_family_grid_builds_the_fair_families_grids_by_name():
    sch = linear()
    assert torch.equal(recipes.family_grid("logsnr/s0")(sch, 7), recipes.logsnr(sch, 7))
    assert torch.equal(recipes.family_grid("quadratic")(sch, 7), recipes.quadratic(sch, 7))
    from probflow import grids as G

    assert torch.equal(recipes.family_grid("t^2.5/0.03")(sch, 7), G.t_power(sch, 7, 2.5, 0.03))
    assert torch.equal(recipes.family_grid("karras7/0.05")(sch, 7), G.karras(sch.sigma_max, 0.05, 7, 7.0))
    for bad in ("karras/0.1", "t^x/0.1", "logsnr", "nope/s0"):
        with pytest.raises(ValueError, match="grid"):
            recipes.family_grid(bad)


def test_the_recommended_table_drives_the_plan(small, monkeypatch):
    rows = [t() for t in fair.fair_plan(small, [], [10], peers=[])]
    rec = [r for r in rows if r.get("role") == "recommended"]
    m, g = recipes.RECOMMENDED[10]
    assert [(r["method"], r["grid"]) for r in rec] == [(m, g.__name__)]
    monkeypatch.setitem(recipes.RECOMMENDED, 10, ("dpmpp_3m", recipes.quadratic))
    rows = [t() for t in fair.fair_plan(small, [], [10], peers=[])]
    assert [(r["method"], r["grid"]) for r in rows if r.get("role") == "recommended"] == [("dpmpp_3m", "quadratic")]


@needs_both
def test_bench_on_the_2d_mixture_has_recommended_chosen_and_oracle_rows_of_both_sides(tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "--model", "mixture2d", "--samples", "2", "--nfe", "5,10", "--methods", "unipc",
                 "--grids", "uniform", "--ref-tol", "1e-9", "--check-tol", "1e-7", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["workloads"]["mixture2d"]["rows"] if "mixture2d" in res["workloads"] else \
        next(iter(res["workloads"].values()))["rows"]
    for n in (5, 10):
        m, g = recipes.RECOMMENDED[n]
        assert any(r.get("role") == "recommended" and (r["method"], r["grid"]) == (m, grid_name(g))
                   and r["nfe_target"] == n and r["error"] is None for r in rows)
        p, g = recipes.FAIR_CHOSEN["peer"][n]
        assert any(r.get("role") == "chosen" and r["family"] == "fair_peer" and (r["method"], r["grid"])
                   == (p, grid_name(g)) and r["error"] is None for r in rows)
    fams = {r["method"][:2] for r in rows if r["family"] == "fair_peer" and r["error"] is None}
    assert fams == {"k_", "d_"}  # k-diffusion's and diffusers' peers, on probflow's grid "uniform" too
    assert {r["method"] for r in rows if r["family"] == "fair_peer" and r["grid"] == "uniform"} == set(
        recipes.FAIR_PEERS)
    fr = fair.fair_rows(rows)
    assert [f["nfe"] for f in fr] == [5, 10]
    for f in fr:
        assert all(f[k] is not None for k in ("recommended", "chosen", "oracle", "peer_chosen", "peer_oracle"))
        peer_rows = [r for r in rows if r["family"] in ("peer", "fair_peer") and r["nfe_target"] == f["nfe"]
                     and r["error"] is None and r["nfe"] <= f["nfe"]]
        assert f["peer_oracle"]["rmse"] == min(r["rmse"] for r in peer_rows)
        assert f["oracle"]["rmse"] <= min(f["recommended"]["rmse"], f["chosen"]["rmse"])
    md = (out / "RESULTS.md").read_text()
    assert "| NFE | probflow recommended | probflow chosen | probflow oracle | peer chosen | peer oracle" in md


@needs_both
def test_each_fair_peer_row_is_its_librarys_own_loop(small):
    sch = small.schedule
    sig = grid_sigmas(recipes.logsnr, sch, 6)
    w = type(small)(small.name, small.model, sch, small.noise, small.reference, small.ref, extra={"keep_x": True})
    k = fair.run_fair_peer(w, "k_dpmpp_3m", recipes.logsnr, 6)
    spec = kdiffusion.KPEERS["k_dpmpp_3m"]
    xbar = small.noise * math.sqrt(1 + sch.sigma_max**2)
    own = getattr(kdiffusion.load_sampling(), spec.fn)(
        kdiffusion.denoiser(small.model), xbar, sig, disable=True, noise_sampler=lambda a, b: torch.zeros_like(xbar),
        **spec.kwargs)
    assert torch.allclose(k["_x"].double(), own.float().double(), rtol=0, atol=1e-6)
    d = fair.run_fair_peer(w, "d_unipc_3", recipes.logsnr, 6)
    assert torch.equal(d["_x"], peers.run_peer("unipc_3", small.model, small.noise, sch, 6, sigmas=sig).x.float()
                       .reshape(len(small.noise), -1))
    # two independent libraries' DPM-Solver++(2M) on the same grid agree (diffusers' float32 state: ~1e-6)
    a = fair.run_fair_peer(w, "k_dpmpp_2m", recipes.logsnr, 6)["_x"]
    b = fair.run_fair_peer(w, "d_dpmpp_2m", recipes.logsnr, 6)["_x"]
    assert float((a - b).abs().max()) < 1e-4


def _row(method, rmse, n=10, family="probflow", role=None):
    return {"workload": "w", "family": family, "method": method, "grid": "g", "nfe_target": n, "steps": n,
            "tol": None, "nfe": n, "rmse": rmse, "median": rmse, "max": rmse, "wall_s": 0.0, "error": None,
            "notes": [], "role": role}


def test_a_difference_within_the_reference_error_is_marked_unresolved():
    rows = [_row("a", 1.00e-3, role="recommended"), _row("b", 1.05e-3, role="chosen"),
            _row("k_lms", 1.02e-3, family="fair_peer", role="chosen")]
    assert not fair.resolved(1.00e-3, 1.05e-3, 1e-4) and fair.resolved(1.00e-3, 1.05e-3, 1e-5)
    loose = next(line for line in report._fair(rows, 1e-4) if line.startswith("| 10 |"))
    assert loose.count("(unresolved)") == 4  # every ratio of this row: RMSEs within 2e-4 of each other
    tight = next(line for line in report._fair(rows, 1e-6) if line.startswith("| 10 |"))
    assert "(unresolved)" not in tight
    vs = report._vs_best(rows, 1e-4)
    assert sorted(vs.values()) == ["best", "unresolved", "unresolved"]
    assert sorted(report._vs_best(rows, 1e-6).values()) == ["best", "resolved", "resolved"]


def test_measured_reference_error_is_the_error_against_the_exact_flow():
    """dopri5 at 1e-4, its error measured against itself at 1e-5, vs its true error against DOP853 at 1e-12."""
    torch.set_num_threads(1)
    model = GaussianMixture.random(4, 3, 5, std_range=(0.05, 0.3))
    sch = linear()
    xbar = noise(6, (4,), 3) * math.sqrt(1 + sch.sigma_max**2)
    exact, _ = reference(model, xbar, sch, ANALYTIC_REF[0], ANALYTIC_REF[1], ANALYTIC_REF[2])
    x, info = reference(model, xbar, sch, "dopri5", 1e-4, 1e-3, error_tol=1e-5)
    true = float((x - exact).pow(2).mean().sqrt())
    assert info["error_tol"] == 1e-5 and info["error_nfe"] > info["nfe"]
    assert 0.5 * true < info["error_rmse"] < 2.0 * true, (info["error_rmse"], true)
    with pytest.raises(ValueError, match="error_tol"):
        reference(model, xbar, sch, "dopri5", 1e-4, 1e-3, error_tol=1e-3)


def test_peers_flag_is_checked_and_none_runs_no_peer(tmp_path, capsys):
    assert main(["bench", "--model", "mixture2d", "--peers", "all", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--peers" in capsys.readouterr().err
    out = tmp_path / "n"
    assert main(["bench", "--model", "mixture2d", "--samples", "2", "--nfe", "5", "--methods", "euler",
                 "--grids", "uniform", "--ref-tol", "1e-9", "--check-tol", "1e-7", "--peers", "none",
                 "--out", str(out), "--no-progress"]) == 0
    rows = next(iter(json.loads((out / "results.json").read_text())["workloads"].values()))["rows"]
    assert rows and all(r["family"] == "probflow" for r in rows) and not any(r.get("role") for r in rows)


def test_run_workload_extra_solves_are_appended(small):
    rows = run_workload(small, ["euler"], ["uniform"], [5], (), [], None, False, None,
                        lambda w, g: fair.fair_plan(w, g, [5], ["unipc"], peers=[]))
    roles = [r.get("role") for r in rows]
    assert roles[0] is None and "recommended" in roles and "chosen" in roles
