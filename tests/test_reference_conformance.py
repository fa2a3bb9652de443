"""Our optimizer against the recorded outputs of the reference package (elra 0.0.5).

``tests/reference/scenarios.py`` drives an optimizer through fixed gradients and losses (spikes,
NaN and infinite losses, step_retrace, weight decay with train/validation losses, momentum,
warm-up, long control windows, batch growth) in float64; ``elra_0.0.5.json`` holds where the
reference's parameters went (recorded by ``benchmarks/reference_conformance.py``). Both engines
must land on the same points to rounding: 1e-9 relative to |x| (seen: below 1e-12).
"""

import json
import math
import sys
from pathlib import Path

import pytest

from elra import native_status

HERE = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(HERE))
import scenarios  # noqa: E402

RECORDED = json.loads((HERE / "elra_0.0.5.json").read_text())
ENGINES = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native_status()["cpu"], reason="native kernels not built"))]
TOL = 1e-9


def assert_points_close(got, expected, what):
    assert len(got) == len(expected), what
    for k, (a, b) in enumerate(zip(got, expected)):
        scale = max(1.0, math.sqrt(sum(v * v for v in b)))
        err = math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))
        assert err <= TOL * scale, f"{what}: point {k} is {a}, the reference's {b}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", range(len(scenarios.PROBES)))
def test_probe(engine, k):
    classes, losses, retrace_at = scenarios.PROBES[k]
    got = scenarios.probe(classes, list(losses), retrace_at, engine)
    assert_points_close(got, RECORDED["probes"][k], f"probe {scenarios.PROBES[k]}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", range(len(scenarios.QUADRATICS)))
def test_noisy_quadratic(engine, k):
    got = scenarios.quadratic(**scenarios.QUADRATICS[k], engine=engine)
    assert_points_close(got, RECORDED["quadratics"][k], f"quadratic {scenarios.QUADRATICS[k]}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", range(len(scenarios.ROSENBROCK_STARTS)))
def test_rosenbrock_float64(engine, k):
    got = scenarios.rosenbrock(scenarios.ROSENBROCK_STARTS[k], engine=engine)
    exp = RECORDED["rosenbrock"][k]
    assert got["calls"] == exp["calls"]  # 31 from (0.3, 0.8), 27 from (-1.2, 1)
    assert_points_close(got["points"], exp["points"], f"rosenbrock {scenarios.ROSENBROCK_STARTS[k]}")


@pytest.mark.slow
@pytest.mark.parametrize("engine,seed", [("torch", 0)] + [
    pytest.param("native", s, marks=pytest.mark.skipif(not native_status()["cpu"],
                                                       reason="native kernels not built"))
    for s in scenarios.DIGITS_SEEDS])
def test_digits_float32(engine, seed):
    """The 880-step anchor run in float32: the reference's epoch losses, final training loss and
    test accuracy (recorded: identical to the last bit on this machine; allowed: 1e-5)."""
    got = scenarios.digits(seed, engine=engine)
    exp = RECORDED["digits"][scenarios.DIGITS_SEEDS.index(seed)]
    assert got["epoch_losses"] == pytest.approx(exp["epoch_losses"], rel=1e-5)
    assert got["train_loss"] == pytest.approx(exp["train_loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(exp["accuracy"], abs=1e-6)
