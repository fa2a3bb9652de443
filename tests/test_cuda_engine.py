"""Whole trajectories of the engine on the CUDA kernels (tests/cuda_targets.py: the GPU where
there is one, always the CPU emulation of the same kernels) against the CPU engine, on the path a
GPU takes: outcomes read one call later (``defer``, resolved at the start of the next call),
every read of the scalar tensor a transfer, the fix-up pass after every one-pass step. Also the
device-to-host transfers of a step, counted. These drive the optimizer's engine, so they use its
private parts.
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch

import cuda_targets
from conftest import Transfers
from elra import ElraOptimizer, _ops, native_status

pytestmark = pytest.mark.skipif(not native_status()["cpu"],
                                reason="the CPU reference needs the native kernels")


@pytest.fixture(params=cuda_targets.target_params(), scope="module")
def target(request):
    return cuda_targets.get(request.param)


def counting(kernels: _ops.Kernels) -> tuple[_ops.Kernels, Counter]:
    """The kernel table with each op's calls counted."""
    counts: Counter = Counter()

    def wrap(name, fn):
        def call(*args):
            counts[name] += 1
            return fn(*args)

        return call

    return kernels._replace(**{op: wrap(op, getattr(kernels, op)) for op in _ops.OPS}), counts


def on_target(opt, target) -> Counter:
    """Drive the optimizer's engine with the target's kernels as a GPU does (on the emulated
    target, whose tensors are CPU tensors: deferred outcomes and no free view of the scalars)."""
    eng = opt._stepper.engine
    eng.kernels, counts = counting(target.kernels)
    if target.device.type == "cpu":
        eng.defer, eng._view = True, None
    assert eng.defer and eng.fuse
    return counts


def train(device, target=None, steps=250, nan_at=(40, 41, 90), **kw):
    """The 20-32-2 MLP, stochastic ELRA with momentum and weight decay; a NaN written into a
    gradient at ``nan_at``. ``target``: run on its kernels as on a GPU."""
    torch.manual_seed(0)
    X = torch.randn(512, 20)
    y = (X[:, :3].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 2)).to(device)
    kw = {"regime": "stochastic", "classes": 2, "warmup": 10, "lr": 1e-4, "momentum": 0.5,
          "weight_decay": 1e-3, **kw}
    opt = ElraOptimizer(model.parameters(), engine="native", **kw)
    counts = on_target(opt, target) if target is not None else None
    gen = torch.Generator().manual_seed(1)
    lf = torch.nn.CrossEntropyLoss()
    losses = []
    for i in range(steps):
        idx = torch.randint(0, 512, (32,), generator=gen)
        opt.zero_grad()
        loss = lf(model(X[idx].to(device)), y[idx].to(device))
        loss.backward()
        if i in nan_at:
            next(model.parameters()).grad[0, 0] = math.nan
        f = loss.item()
        opt.step(f)
        losses.append(f)
    return model, opt, losses, counts


@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.0, "momentum": 0.0}])
def test_deferred_trajectory_on_the_cuda_kernels_matches_cpu(target, kw):
    """The default path of a GPU: deferred outcomes, the one-pass step with its fix-up."""
    m_c, o_c, l_c, _ = train("cpu", **kw)
    m_t, o_t, l_t, counts = train(target.device, target, **kw)
    assert o_c.stats["retraces"] == o_t.stats["retraces"] >= 3
    assert o_c.stats["steps"] == o_t.stats["steps"]
    # the one-pass step was taken on most steps, each followed by its fix-up pass
    assert counts["step_fused"] >= 150, counts
    assert counts["fixup"] == counts["step_fused"]
    # the emulated kernels round as the CPU ones do but for the order of the sums (2e-7 apart
    # after 250 steps); a GPU also contracts multiply-adds, so its path drifts further
    rtol, atol = (1e-4, 1e-5) if target.name == "emulated" else (1e-2, 2e-3)
    np.testing.assert_allclose(l_t, l_c, rtol=rtol, atol=atol)
    for a, b in zip(m_c.parameters(), m_t.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=rtol, atol=atol)
    # the scalar state: the control law's counters equal, its values and the engine's slots
    # (read from the device by the checkpoint) close
    ec, et = (o.state_dict()["param_groups"][0]["elra"] for o in (o_c, o_t))
    for part in ("control", "engine"):
        for k, v in ec[part].items():
            if isinstance(v, float):
                assert math.isclose(et[part][k], v, rel_tol=100 * rtol, abs_tol=atol), (part, k)
            else:
                assert et[part][k] == v, (part, k)


def test_two_pass_trajectory_on_the_cuda_kernels_matches_cpu(target):
    """The other steps: reduce + finalize + update (the one pass switched off). The sums go in
    another order than on the CPU; the rounding differences (1e-7 at first) grow along the path,
    to about 5e-4 after 120 steps."""
    def run(device, tgt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 1)).to(device)
        opt = ElraOptimizer(model.parameters(), engine="native", regime="stochastic", lr=1e-4,
                            warmup=5, weight_decay=1e-3)
        counts = on_target(opt, tgt) if tgt is not None else None
        opt._stepper.engine.fuse = False
        X = torch.randn(256, 20)
        y = X[:, :1] * 0.5 - X[:, 1:2]
        for i in range(120):
            opt.zero_grad()
            loss = ((model(X[i % 8 * 32:(i % 8 + 1) * 32].to(device)) -
                     y[i % 8 * 32:(i % 8 + 1) * 32].to(device)) ** 2).mean()
            loss.backward()
            opt.step(loss.item())
        return model, counts

    m_c, _ = run("cpu", None)
    m_t, counts = run(target.device, target)
    assert counts["step_fused"] == 0 and counts["update"] >= 119 and counts["reduce"] >= 119
    for a, b in zip(m_c.parameters(), m_t.parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("wd", [1e-3, 0.0])
def test_a_step_reads_the_device_at_most_once(target, monkeypatch, wd):
    """With the loss passed as a float, a normal step makes one device-to-host transfer (the
    scalar slots at the start of the call: the previous step's outcome); a step that closes the
    100-step window one more (its sums); the first none. Every way a tensor value can reach the
    host is counted (conftest.Transfers)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 2)).to(target.device)
    opt = ElraOptimizer(model.parameters(), engine="native", lr=1e-4, warmup=10, classes=2,
                        weight_decay=wd)
    counts = on_target(opt, target)
    X = torch.randn(512, 20, device=target.device)
    y = (X[:, :3].sum(1) > 0).long()
    lf = torch.nn.CrossEntropyLoss()
    counter = Transfers(monkeypatch)
    reads = []
    for i in range(210):
        sl = slice(i % 16 * 32, (i % 16 + 1) * 32)
        opt.zero_grad()
        loss = lf(model(X[sl]), y[sl])
        loss.backward()
        f = loss.item()
        counter.count, counter.active = 0, True
        opt.step(f)
        counter.active = False
        reads.append(counter.count)
    windows = [k for k in range(len(reads)) if (k + 1) % 100 == 0]
    assert [reads[k] for k in windows] == [2] * len(windows), reads
    assert all(r == 1 for k, r in enumerate(reads) if k not in windows and k > 0), reads
    assert reads[0] == 0
    assert counts["step_fused"] >= 150
