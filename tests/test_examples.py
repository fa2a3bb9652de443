"""The examples (examples/) run as users run them: a fresh interpreter, offline; the seed's
examples 1-3, and examples 4-8 (DDP, ZeRO, FSDP2 on two gloo processes, Lightning, accelerate)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

pytestmark = pytest.mark.slow  # trainings and subprocess runs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script, *args, threads=None):
    env = None if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                         text=True, timeout=300, cwd=EXAMPLES.parent, env=env)
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


# --- distributed training and training frameworks (examples 4-8) -----------------------------------
def accuracy(out):
    return float(re.search(r"test accuracy ([0-9.]+)\s*$", out.strip()).group(1))


def test_example4_ddp():
    out = run("example4_ddp.py", "--epochs", "2")
    assert "parameters bitwise equal on all ranks: True" in out, out[-800:]
    assert "process group of 2" in out and accuracy(out) > 0.85, out[-800:]


def test_example5_zero():
    out = run("example5_zero.py", "--epochs", "2")
    assert out.count("(sharded=True)") == 2, out[-800:]
    assert "the checkpoint restored 88 steps" in out and accuracy(out) > 0.85, out[-800:]


def test_example6_fsdp2():
    out = run("example6_fsdp2.py", "--epochs", "2")
    assert "parameters equal True, step length equal True" in out, out[-800:]
    assert out.count("sharded=True") == 2 and accuracy(out) > 0.85, out[-800:]


def test_example7_lightning():  # bf16-mixed: tests/test_frameworks.py
    require("lightning")
    out = run("example7_lightning.py", "--epochs", "2", threads=1)  # (a small network)
    logged = re.search(r"(\d+) step lengths logged by LearningRateMonitor", out)
    assert logged and int(logged.group(1)) >= 8, out[-800:]
    assert accuracy(out) > 0.85, out[-800:]


def test_example8_accelerate():
    require("accelerate")
    out = run("example8_accelerate.py", "--epochs", "2", "--accumulate", "2", threads=1)
    assert "accumulation 2: 44 calls of ELRA's step" in out and accuracy(out) > 0.8, out[-800:]
