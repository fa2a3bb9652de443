"""The optimizer's API: construction, the loss argument, bad input, gradients, groups."""

import math
import os
import warnings

import pytest
import torch

import elra
from elra import ElraOptimizer, get_user_manual_path
from conftest import all_finite, control_of, elra_state as elra_state_of, rosenbrock


def quad_setup(n=5, **kw):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    kw.setdefault("regime", "stochastic")
    return p, ElraOptimizer([p], **kw)


def quad_step(p, opt, target=None):
    opt.zero_grad()
    loss = ((p - (target if target is not None else 1.0)) ** 2).sum()
    loss.backward()
    opt.step(loss.item())
    return loss.item()


# --- construction -------------------------------------------------------------------------------
def test_public_imports_and_manual():
    assert {"ElraOptimizer", "ElraGradScaler", "get_user_manual_path"} <= set(elra.__all__)
    path = get_user_manual_path()
    assert os.path.isfile(path) and path.endswith(".md")


def test_seed_positional_call():
    model = torch.nn.Linear(3, 2)
    opt = ElraOptimizer(model.parameters(), None, 32, 10, lr=1e-5, weight_decay=0.99999)
    assert opt.regime == "stochastic"
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-5)
    assert opt.param_groups[0]["lr"] == 1e-5
    ctl = control_of(opt)
    assert ctl["batch_size"] == 32 and ctl["classes"] == 10


def test_seed_keyword_calls():
    model = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="regime"):
        ElraOptimizer(model.parameters(), model=model, lr=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ElraOptimizer(model.parameters(), lr=1e-4, warmup=10).regime == "stochastic"
        assert ElraOptimizer(model.parameters(), momentum=0.5,
                             regime="deterministic").regime == "deterministic"
        assert ElraOptimizer(model.parameters(), classes=0).regime == "deterministic"


@pytest.mark.parametrize("mode", ["P2M", "p2min", "p2m"])
def test_mode_p2m(mode):
    p, opt = quad_setup(mode=mode)
    assert opt.mode == "P2M"
    assert opt.state_dict()["param_groups"][0]["elra"]["mode"] == "P2M"
    first = quad_step(p, opt)
    for _ in range(10):
        last = quad_step(p, opt)
    assert opt.last_outcome == "accepted" and last < first


@pytest.mark.parametrize("mode", ["C2M", "c2min"])
def test_mode_c2m_discontinued(mode):
    with pytest.raises(ValueError, match="discontinued"):
        ElraOptimizer(torch.nn.Linear(2, 2).parameters(), mode=mode, regime="stochastic")


@pytest.mark.parametrize("kw,err,match", [
    ({"lr": -1e-3}, ValueError, "lr"), ({"lr": 0.0}, ValueError, "lr"),
    ({"lr": math.nan}, ValueError, "lr"), ({"lr": "1e-3"}, ValueError, "lr"),
    ({"weight_decay": 0.3}, ValueError, "weight_decay"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"momentum": 1.0}, ValueError, "momentum"), ({"warmup": -1}, ValueError, "warmup"),
    ({"batch_size": -2}, ValueError, "batch_size"), ({"collects": 0}, ValueError, "collects"),
    ({"regime": "full"}, ValueError, "regime"), ({"engine": "gpu"}, ValueError, "engine"),
    ({"mode": "X"}, ValueError, "mode"),
])
def test_bad_arguments(kw, err, match):
    kw = {"regime": "stochastic", **kw}
    with pytest.raises(err, match=match):
        ElraOptimizer(torch.nn.Linear(2, 2).parameters(), **kw)


def test_native_engine_refuses_what_it_cannot_run():
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(RuntimeError, match="native"):
        ElraOptimizer([meta], regime="stochastic", engine="native")
    assert ElraOptimizer([meta], regime="stochastic").engine_name == "torch"


@pytest.mark.slow
def test_without_native_kernels_the_torch_engine_takes_over():
    """With the kernels unavailable (here: switched off before import), import works, the
    reason is reported, "auto" falls back to pure torch and "native" refuses clearly."""
    import subprocess
    import sys

    code = """
import torch, elra
from elra import ElraOptimizer
st = elra.native_status()
assert st == {"built": False, "cpu": False, "cuda": False,
              "error": "disabled by ELRA_DISABLE_NATIVE", "build": None,
              "self_check": {"enabled": True, "devices": {}}}, st
p = torch.nn.Parameter(torch.ones(3))
opt = ElraOptimizer([p], regime="stochastic")
assert opt.engine_name == "torch"
for _ in range(5):
    opt.zero_grad(); loss = (p ** 2).sum(); loss.backward(); opt.step(loss)
assert opt.last_outcome == "accepted" and (p ** 2).sum().item() < 3.0
try:
    ElraOptimizer([p], regime="stochastic", engine="native")
except RuntimeError as e:
    assert "ELRA_DISABLE_NATIVE" in str(e), e
else:
    raise AssertionError("engine='native' did not raise")
print("ok")
"""
    env = dict(os.environ, ELRA_DISABLE_NATIVE="1")
    env.pop("ELRA_SELF_CHECK", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_bad_parameter_lists():
    with pytest.raises(ValueError, match="empty"):
        ElraOptimizer([], regime="stochastic")
    with pytest.raises(TypeError, match="floating point"):
        ElraOptimizer([torch.zeros(3, dtype=torch.int64)], regime="stochastic")
    with pytest.raises(TypeError, match="complex"):
        ElraOptimizer([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))],
                      regime="stochastic")
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        ElraOptimizer([a, b], regime="stochastic")
    with pytest.raises(ValueError, match="no trainable"):
        ElraOptimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)],
                      regime="stochastic")
    with pytest.raises(ValueError, match="twice"):
        ElraOptimizer([a, a], regime="stochastic")


def test_groups_of_two_dtypes_train_in_a_buffer_each():
    """Parameters of two dtypes lie in two flat buffers (one per device and dtype) and train
    together with one step size."""
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ElraOptimizer([{"params": [a]}, {"params": [b], "weight_decay": 1e-4}],
                        regime="stochastic", lr=1e-3)
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert opt.state[a]["direction"].dtype == torch.float32
    assert opt.state[b]["direction"].dtype == torch.float64
    for _ in range(20):
        opt.zero_grad()
        loss = ((a - 1) ** 2).sum() + ((b - 2) ** 2).sum()
        loss.backward()
        opt.step(loss)
    assert opt.last_outcome == "accepted" and loss.item() < 0.1 * (2 + 12)


# --- the loss argument --------------------------------------------------------------------------
@pytest.mark.parametrize("loss,err", [("1.0", TypeError), (b"1", TypeError), (True, TypeError),
                                      (torch.ones(3), ValueError), ([1.0], TypeError),
                                      (torch.ones(1, dtype=torch.complex64), TypeError)])
def test_bad_loss_values(loss, err):
    p, opt = quad_setup()
    ((p - 1) ** 2).sum().backward()
    before = p.detach().clone()
    with pytest.raises(err):
        opt.step(loss)
    assert torch.equal(p, before)


@pytest.mark.parametrize("kind", ["tensor0", "tensor1", "numpy", "int"])
def test_loss_kinds_give_identical_steps(kind):
    import numpy as np
    convert = {"tensor0": lambda t: t.detach(), "tensor1": lambda t: t.detach()[None],
               "numpy": lambda t: np.float64(t.item()), "int": lambda t: round(t.item())}[kind]
    finals = []
    for k in ("float", kind):
        p, opt = quad_setup()
        for _ in range(5):
            opt.zero_grad()
            loss = ((p - 1) ** 2).sum()
            loss.backward()
            v = convert(loss)
            opt.step(float(v) if k == "float" else v)
        finals.append(p.detach().clone())
    assert torch.equal(*finals)


def test_closure_positional_and_keyword():
    results = []
    for how in ("positional", "keyword"):
        p, opt = quad_setup()

        def closure():
            opt.zero_grad()
            loss = ((p - 1) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(10):
            out = opt.step(closure) if how == "positional" else opt.step(closure=closure)
            assert isinstance(out, torch.Tensor)
        results.append(p.detach().clone())
    assert torch.equal(*results)
    with pytest.raises(TypeError, match="not both"):
        opt.step(1.0, closure=closure)


# --- failed steps ---------------------------------------------------------------------------------
def run_quad(n_steps, bad_at=None, bad="loss"):
    p, opt = quad_setup(regime="deterministic", lr=1e-2)
    outcomes = []
    for i in range(n_steps):
        opt.zero_grad()
        loss = ((p - 1) ** 2).sum()
        loss.backward()
        f = loss.item()
        if i == bad_at:
            if bad == "loss":
                f = math.nan
            elif bad == "grad":
                p.grad[0] = math.inf
            elif bad == "nan_grad":
                p.grad[1] = math.nan
            elif bad == "none":
                p.grad = None
            elif bad == "retrace":
                opt.step_retrace(f)
                outcomes.append(opt.last_outcome)
                continue
        opt.step(f)
        outcomes.append(opt.last_outcome)
    return p, opt, outcomes


@pytest.mark.parametrize("bad,outcome", [("loss", "retrace_loss"), ("grad", "retrace_gradient"),
                                         ("nan_grad", "retrace_gradient"),
                                         ("none", "retrace_no_gradient"),
                                         ("retrace", "retrace_requested")])
def test_failed_step_retraces_and_never_writes_nan(bad, outcome):
    p, opt, outcomes = run_quad(6, bad_at=5, bad=bad)
    assert outcomes[-1] == outcome
    assert all_finite([p])
    st = opt.state[p]
    # back at the last good point, moved along the last direction by the (shrunk) new step
    expected = torch.add(st["retrace_point"], st["direction"], alpha=-opt.param_groups[0]["lr"])
    assert torch.equal(p.detach(), expected)
    assert opt.stats["retraces"] == 1
    # and training goes on to the optimum
    for _ in range(40):
        quad_step(p, opt)
    assert ((p - 1) ** 2).sum().item() < 1e-6


def test_failure_on_the_very_first_call_leaves_parameters():
    p, opt = quad_setup()
    before = p.detach().clone()
    p.grad = torch.full_like(p, math.nan)
    opt.step(1.0)
    assert torch.equal(p, before) and opt.last_outcome == "retrace_gradient"
    opt.step_retrace(math.nan)
    assert torch.equal(p, before) and opt.stats["steps"] == 0
    p.grad = torch.ones_like(p)
    opt.step(math.inf)  # an infinite loss on the first call (the reference raises here)
    assert torch.equal(p, before) and opt.last_outcome == "retrace_loss"
    opt.step(1.0)  # and the next call starts for real
    assert opt.last_outcome == "first" and not torch.equal(p, before)


@pytest.mark.parametrize("engine", ["torch", "native"])
@pytest.mark.parametrize("regime", ["stochastic", "deterministic"])
def test_vanished_gradient_and_zero_parameters_are_safe(engine, regime):
    """A gradient that is exactly zero (a solved problem; the reference raises
    ZeroDivisionError there) and parameters that are all zero (|x| = 0 in the weight decay):
    no exception, no NaN, and training goes on once the gradient returns."""
    if engine == "native" and not elra.native_status()["cpu"]:
        pytest.skip("native kernels not built")
    p = torch.nn.Parameter(torch.zeros(5))
    opt = ElraOptimizer([p], lr=1e-3, regime=regime, weight_decay=1e-3, engine=engine)
    for _ in range(5):
        opt.zero_grad()
        opt.step(((p.detach() - 1) ** 2).sum())  # the true loss, with a zero gradient
        assert all_finite([p]) and math.isfinite(opt.param_groups[0]["lr"])
    for _ in range(30):
        quad_step(p, opt)
    assert all_finite([p]) and ((p - 1) ** 2).sum().item() < 1.0


def test_sparse_gradient_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ElraOptimizer(emb.parameters(), regime="stochastic")
    emb.weight.grad = None
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(1.0)


# --- gradients, frozen and unused parameters ----------------------------------------------------
def test_frozen_and_unused_parameters_untouched():
    torch.manual_seed(0)
    used, unused, frozen = (torch.nn.Linear(4, 1) for _ in range(3))
    for q in frozen.parameters():
        q.requires_grad_(False)
    params = [*used.parameters(), *unused.parameters(), *frozen.parameters()]
    opt = ElraOptimizer(params, regime="stochastic", weight_decay=0.0)
    snap = [q.detach().clone() for q in (*unused.parameters(), *frozen.parameters())]
    x = torch.randn(16, 4)
    for _ in range(20):
        opt.zero_grad()
        loss = ((used(x) + frozen(x)) ** 2).mean()
        loss.backward()
        opt.step(loss)
    for q, s in zip((*unused.parameters(), *frozen.parameters()), snap):
        assert torch.equal(q, s)
    assert all(q.grad is None for q in frozen.parameters())


def test_model_zero_grad_set_to_none_is_equivalent():
    results = []
    for how in ("optimizer", "model"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = ElraOptimizer(model.parameters(), regime="stochastic", lr=1e-3)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        for _ in range(30):
            (opt if how == "optimizer" else model).zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step(loss)
        results.append([q.detach().clone() for q in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_parameters_are_views_of_one_buffer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = ElraOptimizer(model.parameters(), regime="stochastic")
    ptrs = {q.untyped_storage().data_ptr() for q in model.parameters()}
    gptrs = {q.grad.untyped_storage().data_ptr() for q in model.parameters()}
    sptrs = {opt.state[q]["direction"].untyped_storage().data_ptr() for q in model.parameters()}
    assert len(ptrs) == len(gptrs) == len(sptrs) == 1


def test_model_moved_after_construction_rebuilds():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = ElraOptimizer(model.parameters(), regime="stochastic", lr=1e-3)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for i in range(10):
        if i == 5:
            model.to(torch.float64)
            x, y = x.double(), y.double()
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss)
        assert opt.last_outcome in ("first", "accepted")
    assert all(opt.state[q]["direction"].dtype == torch.float64 for q in model.parameters())
    assert len({q.untyped_storage().data_ptr() for q in model.parameters()}) == 1


def test_unfreezing_rebuilds_and_trains_the_new_parameters():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    b.requires_grad_(False)
    opt = ElraOptimizer([*a.parameters(), *b.parameters()], regime="stochastic", lr=1e-3)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for i in range(20):
        if i == 10:
            b.requires_grad_(True)
            snap = b.weight.detach().clone()
        opt.zero_grad()
        loss = ((a(x) + b(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss)
    assert not torch.equal(snap, b.weight)


# --- groups, weight decay, lr display ---------------------------------------------------------
def test_group_weight_decay_applies_only_to_its_group():
    torch.manual_seed(0)
    decayed, plain = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = ElraOptimizer([{"params": decayed.parameters(), "weight_decay": 0.05},
                         {"params": plain.parameters()}], regime="stochastic", lr=1e-3)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    x = torch.randn(8, 4)
    for i in range(3):
        opt.zero_grad()
        loss = (decayed(x) ** 2).mean() + (plain(x) ** 2).mean()
        loss.backward()
        old = {q: q.detach().clone() for q in (*decayed.parameters(), *plain.parameters())}
        opt.step(loss)
    # the stored direction is g' = g (+ c * x_old for the decayed group)
    for q in plain.parameters():
        assert torch.equal(opt.state[q]["direction"], q.grad)
    for q in decayed.parameters():
        diff = opt.state[q]["direction"] - q.grad
        c = (diff.flatten() @ old[q].flatten()) / (old[q].flatten() @ old[q].flatten())
        assert c > 0 and torch.allclose(diff, c * old[q], atol=1e-6)


def test_add_param_group_later_keeps_state():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    opt = ElraOptimizer(a.parameters(), regime="stochastic", lr=1e-3)
    x = torch.randn(8, 4)
    for _ in range(5):
        opt.zero_grad()
        loss = (a(x) ** 2).mean()
        loss.backward()
        opt.step(loss)
    d_before = opt.state[a.weight]["direction"].clone()
    steps_before = opt.stats["steps"]
    opt.add_param_group({"params": b.parameters(), "weight_decay": 0.9999})
    assert opt.param_groups[1]["weight_decay"] == pytest.approx(1e-4)
    assert torch.equal(opt.state[a.weight]["direction"], d_before)
    assert torch.equal(opt.state[b.weight]["direction"], torch.zeros_like(b.weight))
    assert opt.stats["steps"] == steps_before
    for _ in range(5):
        opt.zero_grad()
        loss = (a(x) ** 2).mean() + (b(x) ** 2).mean()
        loss.backward()
        opt.step(loss)
    assert opt.last_outcome == "accepted"


def test_lr_shows_applied_step_and_schedulers_are_ignored():
    p, opt = quad_setup(lr=1e-3)
    assert opt.param_groups[0]["lr"] == 1e-3
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    with pytest.warns(UserWarning, match="ignored"):
        for _ in range(5):
            quad_step(p, opt)
            sched.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for _ in range(5):
            quad_step(p, opt)
            sched.step()
    quad_step(p, opt)
    assert opt.param_groups[0]["lr"] == opt.stats["step_size"]


def test_group_lr_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="one step length"):
        ElraOptimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.5}],
                      lr=1e-4, regime="stochastic")


def test_library_is_silent(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = torch.nn.Parameter(torch.tensor([0.3, 0.8]))
    opt = ElraOptimizer([x], lr=1e-6, regime="deterministic")
    for _ in range(50):
        opt.zero_grad()
        loss = rosenbrock(x)
        loss.backward()
        opt.step(loss.item())
    opt.step_retrace(math.nan)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert list(tmp_path.iterdir()) == []


def test_step_hooks_and_profiler_range_work_as_for_torch_optimizers():
    """torch.optim's step pre/post hooks (per optimizer and global, with argument replacement)
    and the profiler's Optimizer.step range are there when used (ELRA skips torch's wrapper,
    which costs as much as a small step, only when nothing is registered or profiling)."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    p, opt = quad_setup()
    seen = []
    # torch passes step's arguments with the optimizer first; a pre hook may replace them
    h1 = opt.register_step_pre_hook(lambda o, args, kw: seen.append(("pre", args)) or
                                    ((o, 99.0), kw))  # the step gets loss 99 instead
    h2 = opt.register_step_post_hook(lambda o, args, kw: seen.append(("post", args)))
    h3 = register_optimizer_step_pre_hook(lambda o, args, kw: seen.append(("global", o is opt)))
    h4 = register_optimizer_step_post_hook(lambda o, args, kw: seen.append(("global_post",)))
    try:
        quad_step(p, opt)
        assert seen[0] == ("global", True) and seen[1][0] == "pre"
        assert seen[2] == ("post", (opt, 99.0))
        assert seen[3] == ("global_post",)
        assert elra_state_of(opt)["control"]["f0"] == 99.0  # the replaced argument was used
    finally:
        for h in (h1, h2, h3, h4):
            h.remove()
    seen.clear()
    quad_step(p, opt)
    assert seen == []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        quad_step(p, opt)
    assert any(e.name == "Optimizer.step#ElraOptimizer.step" for e in prof.events())
