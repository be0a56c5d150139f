"""Benchmark entry points refuse bad arguments before any work: one line naming the argument, exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd", [
    ["benchmarks/inversion.py", "--out", "/nonexistent-folder/x"],
    ["benchmarks/inversion.py", "--cases", "digits,cats"],
    ["benchmarks/inversion.py", "--all", "--workers", "0"],
    ["benchmarks/inversion.py", "--all", "--out", "/nonexistent-folder/x"],
    ["benchmarks/heldout.py", "--out", "/nonexistent-folder/a.md", "--quick"],
    ["benchmarks/heldout.py", "--samples", "0"],
])
def test_bad_arguments_exit_2_with_one_line(cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert any(a in lines[0] for a in ("--out", "--cases", "--samples", "--workers"))


def test_an_existing_report_is_not_overwritten_without_force(tmp_path):
    (tmp_path / "INVERSION.md").write_text("keep")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "benchmarks/inversion.py", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "--force" in p.stderr
    assert (tmp_path / "INVERSION.md").read_text() == "keep"
