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


# --- the CUDA kernels (emulated on the CPU: tests/cuda_targets.py) and the engine's use ---------
def test_emulated_cuda_kernels_pass():
    import cuda_targets

    res = selfcheck.check_kernels(cuda_targets.emulated().kernels, "cpu")
    assert res.ok and res.detail == "", res
    assert 0.0 < res.max_deviation <= 1.0 and res.seconds < 10


def broken_emulated(op="update", by=1e-3):
    """The emulated CUDA table with one op that moves x (its first argument) by ``by``."""
    import cuda_targets

    kernels = cuda_targets.emulated().kernels
    fn = getattr(kernels, op)

    def wrong(*args):
        fn(*args)
        args[0].add_(by)

    return kernels._replace(**{op: wrong})


@pytest.fixture
def engine_checks_cpu(monkeypatch):
    """make_engine as on a CUDA device (the self-check on), for tables given to it."""
    import elra.engine

    monkeypatch.setattr(selfcheck, "CHECKED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(selfcheck, "RESULTS", {})
    monkeypatch.setattr(selfcheck, "_CHECKED", {})
    monkeypatch.delenv(selfcheck.ENV_SWITCH, raising=False)

    def use(kernels):
        monkeypatch.setattr(elra.engine, "kernels_for", lambda device, choice: (kernels, None))

    return use


def new_optimizer(engine="auto"):
    from elra import ElraOptimizer

    return ElraOptimizer(torch.nn.Linear(40, 30).parameters(), lr=1e-3, engine=engine,
                         regime="stochastic")


def test_failed_self_check_falls_back_with_one_warning(engine_checks_cpu):
    import warnings

    engine_checks_cpu(broken_emulated())
    with pytest.warns(RuntimeWarning, match="self-check") as caught:
        opt = new_optimizer()
    assert len([w for w in caught if "self-check" in str(w.message)]) == 1
    assert opt.engine_name == "torch"
    status = native_status()["self_check"]
    assert status["enabled"] and not status["devices"]["cpu"]["ok"]
    assert status["devices"]["cpu"]["detail"].startswith("update")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check ran once: no second warning
        assert new_optimizer().engine_name == "torch"
    with pytest.raises(RuntimeError, match="self-check failed"):
        new_optimizer("native")


def test_self_check_switched_off(engine_checks_cpu, monkeypatch):
    import warnings

    engine_checks_cpu(broken_emulated())
    monkeypatch.setenv(selfcheck.ENV_SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = new_optimizer()
    assert opt.engine_name == "cuda-emulated"  # the (broken) table, unchecked
    assert native_status()["self_check"] == {"enabled": False, "devices": {}}


def test_passing_self_check_keeps_the_kernels(engine_checks_cpu, monkeypatch):
    import cuda_targets

    engine_checks_cpu(cuda_targets.emulated().kernels)
    runs = []
    check = selfcheck.check_kernels
    monkeypatch.setattr(selfcheck, "check_kernels",
                        lambda k, dev, dtypes: runs.append(dtypes) or check(k, dev, dtypes))
    assert new_optimizer().engine_name == "cuda-emulated"
    entry = native_status()["self_check"]["devices"]["cpu"]
    assert entry["ok"] and entry["detail"] == "" and entry["seconds"] > 0
    # once per device and dtype: the float32 engine checked float32; a second float32 engine
    # checks nothing, a bfloat16 one bfloat16 only
    new_optimizer()
    bf16 = torch.nn.Linear(8, 4).to(torch.bfloat16)
    from elra import ElraOptimizer

    assert ElraOptimizer(bf16.parameters(), regime="stochastic").engine_name == "cuda-emulated"
    assert runs == [(torch.float32,), (torch.bfloat16,)]
