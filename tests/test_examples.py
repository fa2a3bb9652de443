"""The seed's examples 1-3 (examples/) run as users run them: a fresh interpreter, offline."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script, *args):
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                         text=True, timeout=300, cwd=EXAMPLES.parent)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def test_example1_polynomial_fit():
    out = run("example1_polynomial.py")
    coef = re.search(r"Result: y = (\S+) \+ (\S+) x \+ (\S+) x\^2 \+ (\S+) x\^3", out)
    assert coef, out[-500:]
    # the least-squares cubic for sin on [-pi, pi] is about 0.857 x - 0.093 x^3
    assert float(coef.group(2)) == pytest.approx(0.857, abs=0.05)
    assert float(coef.group(4)) == pytest.approx(-0.093, abs=0.01)


def test_example2_training_loop():
    out = run("example2_training_loop.py", "--epochs", "5")
    acc = float(re.search(r"final model: .*test accuracy ([0-9.]+)", out).group(1))
    boosted = float(re.search(r"boosted model: .*test accuracy ([0-9.]+)", out).group(1))
    assert acc > 0.9 and boosted > 0.9, out[-800:]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_example3_grad_scaler(dtype):
    out = run("example3_grad_scaler.py", "--epochs", "3", "--dtype", dtype)
    assert "all finite: True" in out, out[-800:]
    acc = float(re.search(r"test accuracy ([0-9.]+)\s*$", out.strip()).group(1))
    assert acc > 0.85, out[-800:]
