"""The main job runs end to end, reports errors that fall with NFE, and never overwrites without --force."""

import pytest

from probflow.cli import main
from probflow.demo import run_demo_study


def test_demo_writes_its_plot_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--n", "24", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "DDIM (euler) 10 steps" in text and "dopri5" in text
    assert main(["demo", "--n", "24", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["demo", "--n", "24", "--out", str(out), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_demo_errors_fall_with_nfe():
    import warnings

    from probflow.method import MethodCaution

    with warnings.catch_warnings():  # its dopri5 sweep reports the error itself: no caution on `make demo`
        warnings.simplefilter("error", MethodCaution)
        rows = run_demo_study(n=24, seed=1, progress=False)["rows"]
    euler = [r["rmse"] for r in rows if r["method"] == "euler"]
    dopri = [r for r in rows if r["method"] == "dopri5"]
    assert euler == sorted(euler, reverse=True)
    assert dopri[-1]["rmse"] < 1e-4 < euler[-1]
    assert [r["nfe"] for r in rows if r["method"] == "euler"] == [5, 10, 20, 50, 100]


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--n", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "--n" in capsys.readouterr().err
    assert main(["nonsense"]) == 2  # argparse's error, returned as the status
    assert "nonsense" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 5])
def test_demo_with_fewer_samples_than_plotted_paths_completes(n, tmp_path):
    assert main(["demo", "--n", str(n), "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").stat().st_size > 0
