"""The fair few-step study (benchmarks/fair_fewstep.py): its grid family, its choice rule (tuning results only, the
same rule for both sides) and its calibrated row (never the evaluation noise); `probflow.grids.t_power`."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from probflow import grids, schedules

_spec = importlib.util.spec_from_file_location("fair_fewstep", Path(__file__).parents[1] / "benchmarks/fair_fewstep.py")
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)


def test_t_power_grid_is_a_power_of_t_ending_at_sigma_min_then_zero():
    sch = schedules.linear()
    g = grids.t_power(sch, 9, 2.5, 0.03)
    assert g.numel() == 10 and float(g[0]) == pytest.approx(sch.sigma_max, rel=1e-12) and float(g[-1]) == 0.0
    assert float(g[-2]) == pytest.approx(0.03, rel=1e-9)
    t = sch.t(g[:-1])
    te = float(sch.t(torch.tensor(0.03, dtype=torch.float64)))
    frac = ((t - te) / (sch.T - 1 - te)).flip(0)  # j/(N−1))^q for j = 0 … N−1
    assert torch.allclose(frac, (torch.arange(9, dtype=torch.float64) / 8) ** 2.5, atol=1e-9)


@pytest.mark.parametrize("kw,match", [({"power": 0.0}, "power"), ({"sigma_min": 1e-4}, "sigma_min"),
                                      ({"sigma_min": 500.0}, "sigma_min")])
def test_t_power_refuses_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        grids.t_power(schedules.linear(), 5, **kw)


def _res(pf, peer, n=10):
    return {"pf": {f"{k}|{n}": v for k, v in pf.items()}, "peer": {f"{k}|{n}": v for k, v in peer.items()}}


def test_choice_uses_tuning_results_only_and_the_same_rule_for_both_sides():
    tuning = [_res({"a|g": 1.0, "b|g": 2.0}, {"x|g": 3.0, "y|g": 1.5}),
              _res({"a|g": 1.0, "b|g": 0.5}, {"x|g": 0.9, "y|g": 1.0}),
              _res({"a|g": 1.0, "b|g": 3.0}, {"x|g": 1.2, "y|g": 1.1})]
    for rule in F.RULES:
        assert F.choose(tuning, 10, "pf", rule) == "a|g" and F.choose(tuning, 10, "peer", rule) == "y|g"
    held = [_res({"a|g": 9.0, "b|g": 0.1}, {"x|g": 0.1, "y|g": 3.0})]
    _, data = F.table(tuning, held, ["h"], (10,))
    assert data[10]["pf"] == "a|g" and data[10]["peer"] == "y|g"  # held-out errors change nothing
    assert data[10]["chosen"] == [3.0] and data[10]["vs_oracle"] == [90.0] and data[10]["oracle"] == [1.0]


def test_minimax_rule_avoids_a_configuration_far_behind_on_one_tuning_problem():
    # "b" is best on two of three tuning problems (smaller median regret) but 20× behind on the third
    tuning = [_res({"a|g": 1.2, "b|g": 1.0}, {"x|g": 1.0}), _res({"a|g": 1.2, "b|g": 1.0}, {"x|g": 1.0}),
              _res({"a|g": 1.5, "b|g": 20.0}, {"x|g": 1.0})]
    assert F.choose(tuning, 10, "pf", "median") == "b|g"
    assert F.choose(tuning, 10, "pf") == F.choose(tuning, 10, "pf", "max") == "a|g"


def test_calibrated_row_never_sees_the_evaluation_noise():
    torch.set_num_threads(1)
    p = F.outside_problem(5, 4, "diagonal", k=3)
    s = F.setup(p, 3)
    seen = []
    model = p.model

    class Spy:
        def __call__(self, x, sigma):
            seen.append(x.clone())
            return model(x, sigma)

    p.model = Spy()
    out = F.fit_run(s, (5,), n_cal=4, n_val=4)
    assert out["5"]["fit_calls"] > 0 and out["5"]["ref_calls"] > 0
    calls_before_eval = out["5"]["ref_calls"] + out["5"]["fit_calls"]
    assert len(seen) == calls_before_eval + 5  # then one evaluation solve of 5 calls on the evaluation noise
    for x in seen[:calls_before_eval]:
        assert x.shape[0] == 4 and not any(torch.allclose(r, e) for r in x for e in s.z)
    assert all(x.shape[0] == 3 for x in seen[calls_before_eval:])
    assert math.isfinite(out["5"]["rmse"])


def test_design_scripts_take_tuning_seeds_only():
    """`tuning_seeds` (fit_design.py's and adaptive_bound.py's --seeds): ranges and lists of tuning or design seeds;
    a held-out seed or a malformed list is a ValueError naming what was expected (the scripts exit 2 with it)."""
    from probflow.bench.heldout import DESIGN_SEEDS, HELDOUT_SEEDS

    assert F.tuning_seeds("100-102") == [100, 101, 102]
    assert F.tuning_seeds(f"100,{DESIGN_SEEDS[-1]}") == [100, DESIGN_SEEDS[-1]]
    for bad in (str(HELDOUT_SEEDS[0]), "100-201", "100-x", "1o0", ""):
        with pytest.raises(ValueError, match="expected"):
            F.tuning_seeds(bad)


def test_recipes_are_fair_md_chosen_rows():
    # the README's recipe (`recipes.RECOMMENDED_NAMES`) and FAIR_CHOSEN are the rows benchmarks/FAIR.md chose
    from probflow.bench import recipes

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "FAIR.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = ([c.strip().replace("\x00", "|") for c in line.replace("\\|", "\x00").strip("|").split("|")]
                 if line.startswith("| ") else [])
        if len(cells) > 3 and cells[0].isdigit() and cells[1].startswith("`"):  # the main table's rows
            rows.setdefault(int(cells[0]), (cells[1].strip("`"), cells[2].strip("`")))
    assert set(rows) == set(recipes.RECOMMENDED_NAMES), rows
    for n, (pf, peer) in rows.items():
        assert recipes.RECOMMENDED_NAMES[n] == pf
        m, g = recipes.FAIR_CHOSEN["peer"][n]
        assert f"{m}|{g.__name__}" == peer


def test_cached_problem_gets_only_its_missing_methods_and_the_pool_decides_the_rows(tmp_path, monkeypatch):
    # a method added to the pool is computed into a cached problem's rows (only that method), and rows of a method
    # outside the pool are not reported
    import json
    from types import SimpleNamespace

    monkeypatch.setattr(F, "PF_METHODS", ("unipc", "unipc_3"))
    monkeypatch.setattr(F, "K_PEERS", ("k_lms",))
    monkeypatch.setattr(F, "D_CUSTOM", ())
    (tmp_path / "p100.json").write_text(json.dumps(
        {"pf": {"unipc|uniform|10": 0.1, "old_method|uniform|10": 0.01}, "peer": {"k_lms|uniform|10": 0.2}}))
    asked = []

    def fake_run(p, samples, nfe, native, family="base", only=None):
        asked.append(only)
        return {"pf": {f"{m}|uniform|10": 0.05 for m in only}, "peer": {}, "methods": sorted(only)}

    monkeypatch.setattr(F, "_problem_run", fake_run)
    a = SimpleNamespace(families="base", samples=8, native=False)
    out = F._results(tmp_path, SimpleNamespace(seed=100), a, (10,))
    assert asked == [{"unipc_3"}]
    assert out == {"pf": {"unipc|uniform|10": 0.1, "unipc_3|uniform|10": 0.05}, "peer": {"k_lms|uniform|10": 0.2}}
    cached = json.loads((tmp_path / "p100.json").read_text())
    assert "unipc_3" in cached["methods"] and cached["pf"]["old_method|uniform|10"] == 0.01
    F._results(tmp_path, SimpleNamespace(seed=100), a, (10,))
    assert asked == [{"unipc_3"}]  # nothing missing any more


def _persample():
    spec = importlib.util.spec_from_file_location("fair_persample",
                                                  Path(__file__).parents[1] / "benchmarks/fair_persample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_persample_counts_samples_sent_into_another_component(capsys):
    """fair_persample over two problems: one line per configuration and NFE, then the per-configuration sums; at
    NFE 4 DDIM sends some of 16 samples of problem 102 (11 broad components in 25-D) into another component, at NFE
    200 UniPC-3 none."""
    assert _persample().main(["--problem", "102,103", "--samples", "16", "--nfe", "4,200",
                              "--configs", "euler|uniform,unipc_3|t^2/0.05"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if " at NFE " in line]
    assert len(rows) == 8 and all("in another component: " in line for line in rows)
    sums = {line.split(":")[0].strip(): int(line.split(": ")[1].split()[0]) for line in out if line.startswith("  NFE")}
    assert set(sums) == {"NFE 4 euler|uniform", "NFE 4 unipc_3|t^2/0.05", "NFE 200 euler|uniform",
                         "NFE 200 unipc_3|t^2/0.05"}
    assert sums["NFE 4 euler|uniform"] > 0 and sums["NFE 200 unipc_3|t^2/0.05"] == 0


@pytest.mark.parametrize("args,name", [(["--problem", "x"], "--problem"), (["--nfe", "0"], "--nfe"),
                                       (["--configs", "foo|uniform"], "--configs"), (["--trace", "300"], "--trace")])
def test_persample_refuses_bad_arguments_in_one_line(args, name, capsys):
    with pytest.raises(SystemExit) as e:
        _persample().main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and name in err and "\n" not in err


def _fit_factors():
    path = Path(__file__).parents[1] / "benchmarks/fit_factors.py"
    spec = importlib.util.spec_from_file_location("fit_factors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_factors_compares_the_same_grid_with_and_without_the_factors(tmp_path, capsys):
    """benchmarks/fit_factors.py: zero factors give ratios of exactly 1, factors −1 (first order) a larger error,
    no factors no row; a cache without the problem's fit is refused by name (exit 2)."""
    from probflow.bench.heldout import make_problem
    from probflow.fit import candidate_grids

    ff = _fit_factors()
    p = make_problem(200)
    grid = candidate_grids(schedules.linear(), 20)["t^2/0.02"]
    n = len(grid) - 1
    fits = {"20": {"method": "unipc_3", "grid": grid.tolist(), "scales": [[0.0, 0.0]] * n},
            "21": {"method": "unipc_3", "grid": grid.tolist(), "scales": [[-1.0, -1.0]] * n},
            "22": {"method": "unipc_3", "grid": grid.tolist(), "scales": None}}
    r = ff.per_problem(p, fits, ["20", "21", "22"], samples=4)
    assert r["20"] == (1.0, 1.0, 1.0) and r["21"][0] > 2.0 and r["22"] is None
    with pytest.raises(SystemExit) as e:
        ff.main(["--cache", str(tmp_path)])
    assert e.value.code == 2 and "--cache" in capsys.readouterr().err
