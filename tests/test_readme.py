"""The README's Python examples run as written (each in a fresh interpreter)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_example_runs(i, tmp_path):
    code = BLOCKS[i]
    if "register(" in code:  # a new solver must then integrate Eq. 12 at its declared order
        code += (
            "\nimport math, torch, probflow\nfrom probflow.models import GaussianMixture\n"
            "gm = GaussianMixture.random(2, 3, seed=0, std_range=(0.3, 0.8))\n"
            "x = probflow.noise(4, (2,), 0) * math.sqrt(101)\n"
            "ref = probflow.integrate(gm, x, torch.tensor([10.0, 0.1], dtype=torch.float64), 'scipy_dop853',"
            " rtol=1e-12, atol=1e-12, options={'group': 4}).x\n"
            "e = [(probflow.integrate(gm, x, probflow.grids.log_uniform(10.0, 0.1, n, final_zero=False),"
            " 'ralston').x - ref).abs().max().item() for n in (32, 64)]\n"
            "assert 1.7 < math.log2(e[0] / e[1]) < 2.3, e\n"
        )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
