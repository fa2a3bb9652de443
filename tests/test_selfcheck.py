"""The self-check of kernel tables (elra/selfcheck.py): it passes for the kernels that are right
(the emulated CUDA kernels, the native CPU ones), it finds a broken kernel and names it, and the
engine falls back to the pure-torch kernels with one warning when a device's check fails."""

import warnings

import pytest
import torch

import cuda_targets
import elra.engine
from elra import ElraOptimizer, _ops, native_status, selfcheck

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def test_emulated_cuda_kernels_pass():
    res = selfcheck.check_kernels(cuda_targets.emulated().kernels, "cpu", dtypes=ALL_DTYPES)
    assert res.ok, res.detail
    assert "agree" in res.detail and 0 < res.seconds < 10


@pytest.mark.skipif(not native_status()["cpu"], reason="native kernels not built")
def test_native_cpu_kernels_pass():
    res = selfcheck.check_kernels(_ops.dispatched("elra"), torch.device("cpu"))
    assert res.ok, res.detail


def broken(kernels, op="update", by=1e-3):
    """The table with one op that moves x (its first argument) by ``by`` after its work."""
    fn = getattr(kernels, op)

    def wrong(*args):
        fn(*args)
        args[0].add_(by)

    return kernels._replace(**{op: wrong})


@pytest.mark.parametrize("op", ["update", "step_fused", "fixup", "collect"])
def test_a_broken_kernel_is_found_and_named(op):
    res = selfcheck.check_kernels(broken(cuda_targets.emulated().kernels, op), "cpu")
    assert not res.ok
    assert res.detail.startswith(op) and "float32" in res.detail and "deviation" in res.detail


def test_a_kernel_that_raises_fails_the_check():
    def boom(*args):
        raise RuntimeError("no kernel image for this device")

    res = selfcheck.check_kernels(_ops.TORCH_KERNELS._replace(reduce=boom), "cpu")
    assert not res.ok and "no kernel image" in res.detail


@pytest.fixture
def checked_on_cpu(monkeypatch):
    """make_engine as on a CUDA device (self-check on), with a broken native table."""
    monkeypatch.setattr(selfcheck, "CHECKED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(selfcheck, "RESULTS", {})
    bad = broken(cuda_targets.emulated().kernels)
    monkeypatch.setattr(elra.engine, "kernels_for", lambda device, choice: (bad, None))
    monkeypatch.delenv(selfcheck.ENV_SWITCH, raising=False)
    return bad


def new_optimizer(engine="auto"):
    return ElraOptimizer(torch.nn.Linear(40, 30).parameters(), lr=1e-3, engine=engine,
                         regime="stochastic")


def test_failed_self_check_falls_back_with_one_warning(checked_on_cpu):
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


def test_self_check_switched_off(checked_on_cpu, monkeypatch):
    monkeypatch.setenv(selfcheck.ENV_SWITCH, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = new_optimizer()
    assert opt.engine_name == "cuda-emulated"  # the (broken) table, unchecked
    assert native_status()["self_check"] == {"enabled": False, "devices": {}}


def test_passing_self_check_keeps_the_kernels(monkeypatch):
    monkeypatch.setattr(selfcheck, "CHECKED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(selfcheck, "RESULTS", {})
    good = cuda_targets.emulated().kernels
    monkeypatch.setattr(elra.engine, "kernels_for", lambda device, choice: (good, None))
    assert new_optimizer().engine_name == "cuda-emulated"
    assert native_status()["self_check"]["devices"]["cpu"]["ok"]
