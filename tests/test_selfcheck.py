"""The self-check of a kernel table (elra.selfcheck) and the diagnosis ``python -m elra``."""

import io
import subprocess
import sys

import pytest
import torch

import elra.selfcheck as selfcheck
from elra import _ops, native_status
from elra.__main__ import main

HAVE_NATIVE = native_status()["cpu"]
native_only = pytest.mark.skipif(not HAVE_NATIVE, reason="native kernels not built")


@native_only
def test_native_cpu_kernels_pass_quickly():
    result = selfcheck.check_kernels(_ops.kernels_for(torch.device("cpu"), "native")[0], "cpu")
    assert result.ok and result.detail == "", result
    assert 0.0 < result.max_deviation <= 1.0  # the native kernels round differently, within bounds
    assert result.seconds < 1.0


# the argument whose last element a "skips the tail" bug leaves alone: the buffer, or the last
# segment's sums (reduce) or coefficient (finalize)
TAIL_OF = {"reduce": 5, "collect": 0, "finalize": 2, "update": 0, "step_fused": 0, "fixup": 0}


def _bugs(op):
    right = getattr(_ops.TORCH_KERNELS, op)

    def does_nothing(*args):
        pass

    def skips_the_tail(*args):
        t = args[TAIL_OF[op]]
        last = t.reshape(-1)[-1:].clone()
        right(*args)
        t.reshape(-1)[-1:] = last

    def raises(*args):
        raise RuntimeError("elra: planted failure")

    return {"does nothing": does_nothing, "skips the tail": skips_the_tail, "raises": raises}


@pytest.mark.parametrize("bug", ["does nothing", "skips the tail", "raises"])
@pytest.mark.parametrize("op", _ops.OPS)
def test_a_planted_bug_in_any_op_is_caught_and_named(op, bug):
    broken = _ops.TORCH_KERNELS._replace(name="broken", **{op: _bugs(op)[bug]})
    result = selfcheck.check_kernels(broken, "cpu", dtypes=(torch.float32,))
    assert not result.ok and result.detail.startswith(op), result
    assert ("raised" in result.detail) == (bug == "raises")


def test_diagnosis_names_versions_build_and_engines():
    out = io.StringIO()
    assert main(["--no-self-check"], out=out) == 0
    text = out.getvalue()
    assert f"elra {__import__('elra').__version__}" in text and torch.__version__ in text
    assert "a CPU tensor gets: " + ("native" if HAVE_NATIVE else "pure-torch") in text
    assert "a CUDA tensor gets: " in text and "self-check" not in text
    if HAVE_NATIVE:
        assert native_status()["build"]["cpu_isa"] in text


@native_only
def test_diagnosis_runs_the_self_check_and_fails_on_a_mismatch(monkeypatch):
    out = io.StringIO()
    assert main([], out=out) == 0
    assert "  cpu: ok (" in out.getvalue()
    failed = selfcheck.SelfCheck(False, "update [torch.float32]: planted", 0.01, 9.0)
    monkeypatch.setattr(selfcheck, "check_kernels", lambda *a, **k: failed)
    out = io.StringIO()
    assert main([], out=out) == 1
    assert "cpu: FAILED: update [torch.float32]: planted" in out.getvalue()


@pytest.mark.slow
def test_python_dash_m_elra():
    res = subprocess.run([sys.executable, "-m", "elra"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("elra ") and "self-check" in res.stdout
