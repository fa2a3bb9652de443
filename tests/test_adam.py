"""ElraAdam: the research prototype's trajectory, exact resume, non-finite safety, bad arguments,
the API (groups, lr shown, schedulers, set_loss, closures, layout changes) and Lightning.

The prototype (benchmarks/elra_adam_proto.py with its defaults) is what the research log
(benchmarks/results/elra_adam_research.md) measured; ElraAdam must follow its trajectory so
that those numbers hold for the product: in float64 with the pure-torch kernels exactly (one tensor per group), with
the native kernels to 1e-12, in float32 to float32 rounding.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from elra import ElraAdam, ElraOptimizer, native_status
from conftest import digits_split, mlp, one_thread, require, roundtrip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from elra_adam_proto import ElraAdamProto  # noqa: E402

HAVE_NATIVE = native_status()["cpu"]
ENGINES = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not HAVE_NATIVE, reason=f"native kernels not built: {native_status()['error']}"))]
# events of the regression run, by step: what that step's call gets instead of a normal one
EVENTS = {25: "nan_loss", 26: "nan_loss", 40: "inf_grad", 55: "nan_element", 70: "big_loss",
          90: "bare", 91: "bare_inf_grad"}


def make(cls, dtype, **kw):
    """A noisy linear regression in two groups (the bias group with decoupled decay)."""
    torch.manual_seed(0)
    X = torch.randn(256, 20, dtype=dtype)
    y = X @ torch.randn(20, dtype=dtype) + 0.1 * torch.randn(256, dtype=dtype)
    w = torch.nn.Parameter(torch.zeros(4, 5, dtype=dtype))
    b = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    opt = cls([{"params": [w]}, {"params": [b], "weight_decay": 0.05}], **kw)
    return X, y, w, b, opt


def regression(cls, dtype=torch.float64, steps=120, events=None, **kw):
    """``(parameters, lr per call, outcome per call)`` of ``steps`` calls."""
    X, y, w, b, opt = make(cls, dtype, **kw)
    g = torch.Generator().manual_seed(1)
    lrs, outcomes = [], []
    for i in range(steps):
        idx = torch.randint(0, 256, (16,), generator=g)
        opt.zero_grad()
        loss = ((X[idx] @ w.view(-1) + b - y[idx]) ** 2).mean()
        loss.backward()
        event = (events or {}).get(i)
        if event == "inf_grad" or event == "bare_inf_grad":
            w.grad.fill_(math.inf)
        elif event == "nan_element":
            w.grad.view(-1)[3] = math.nan
        f = {"nan_loss": math.nan, "big_loss": 1e6}.get(event, loss.item())
        opt.step() if event in ("bare", "bare_inf_grad") else opt.step(f)
        lrs.append(opt.param_groups[0]["lr"])
        outcomes.append(opt.last_outcome)
        assert torch.isfinite(w).all() and torch.isfinite(b).all()
    return torch.cat([w.detach().view(-1), b.detach()]), torch.tensor(lrs), outcomes


# --- the prototype's trajectory --------------------------------------------------------------------
def test_float64_pure_torch_is_the_prototype_exactly():
    ref = regression(ElraAdamProto)
    got = regression(ElraAdam, engine="torch")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prototype_trajectory_through_retraces(engine, dtype):
    """NaN losses (twice in a row), an inf gradient, one NaN gradient element, a loss spike the
    guard rejects, bare steps: the same outcomes, step sizes and parameters as the prototype."""
    ref = regression(ElraAdamProto, dtype, events=EVENTS)
    got = regression(ElraAdam, dtype, events=EVENTS, engine=engine)
    assert got[2] == ref[2]
    assert [got[2][i] for i in (25, 26, 40, 55, 70, 90, 91)] == [
        "retrace_loss", "retrace_loss", "retrace_gradient", "retrace_gradient", "retrace_loss",
        "accepted", "retrace_gradient"]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got[1], ref[1], rtol=tol, atol=0)
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)


def digits_run(cls, X, y, steps=300, **kw):
    Xtr, ytr, _, _, g = digits_split(X, y, 0)
    model = mlp(0).double()
    opt = cls(model.parameters(), **kw)
    lf = torch.nn.CrossEntropyLoss()
    lrs = []
    perm = torch.randperm(1400, generator=g)
    for i in range(steps):
        idx = perm[(32 * i) % 1376:(32 * i) % 1376 + 32]
        opt.zero_grad()
        loss = lf(model(Xtr[idx].double()), ytr[idx])
        loss.backward()
        opt.step(loss.item())
        lrs.append(opt.param_groups[0]["lr"])
    return torch.cat([p.detach().view(-1) for p in model.parameters()]), torch.tensor(lrs)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_digits_follows_the_prototype(digits, engine):
    """300 steps of the digits MLP in float64: the prototype's trajectory (to the rounding of
    its sums, which it forms per tensor, ElraAdam over the flat buffer)."""
    X, y = digits
    with one_thread():
        ref = digits_run(ElraAdamProto, X, y)
        got = digits_run(ElraAdam, X, y, engine=engine)
    assert ref[1].max() > 3 * ref[1][0]  # the step moved by itself
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)


# --- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("at", [30, 26])  # 26: right after a retrace (the next one does not undo)
def test_resume_is_bitwise(engine, at):
    """Save mid-run (torch.load(weights_only=True)), load into a fresh optimizer and model:
    the rest of the run is bit for bit the uninterrupted one, retraces included."""
    events = {25: "nan_loss", 26: "nan_loss", 40: "nan_element", 50: "big_loss"}
    full = regression(ElraAdam, torch.float32, steps=80, events=events, engine=engine)
    X, y, w, b, opt = make(ElraAdam, torch.float32, engine=engine)
    g = torch.Generator().manual_seed(1)

    def run(opt, w, b, lo, hi):
        for i in range(lo, hi):
            idx = torch.randint(0, 256, (16,), generator=g)
            opt.zero_grad()
            loss = ((X[idx] @ w.view(-1) + b - y[idx]) ** 2).mean()
            loss.backward()
            if events.get(i) == "nan_element":
                w.grad.view(-1)[3] = math.nan
            opt.step({"nan_loss": math.nan, "big_loss": 1e6}.get(events.get(i), loss.item()))

    run(opt, w, b, 0, at)
    saved = roundtrip({"opt": opt.state_dict(), "w": w.detach(), "b": b.detach()})
    _, _, w2, b2, opt2 = make(ElraAdam, torch.float32, engine=engine)
    with torch.no_grad():
        w2.copy_(saved["w"])
        b2.copy_(saved["b"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    run(opt2, w2, b2, at, 80)
    assert torch.equal(torch.cat([w2.detach().view(-1), b2.detach()]), full[0])
    assert opt2.stats["retraces"] == 4 and opt2.stats["steps"] == 76


def test_load_rejects_other_states_and_changes_nothing():
    _, _, w, b, opt = make(ElraAdam, torch.float32)
    good = opt.state_dict()
    before = roundtrip(good)
    elra = ElraOptimizer([torch.nn.Parameter(torch.zeros(4, 5)),
                          torch.nn.Parameter(torch.zeros(1))], regime="stochastic")
    bad_shape = roundtrip(good)
    bad_shape["state"][0]["drift"] = torch.zeros(3)
    bad_groups = roundtrip(good)
    bad_groups["param_groups"] = bad_groups["param_groups"][:1]
    bad_wd = roundtrip(good)
    bad_wd["param_groups"][1]["weight_decay"] = 2.0
    for sd in ("state", {"state": {}}, elra.state_dict(), bad_shape, bad_groups, bad_wd):
        with pytest.raises(ValueError):
            opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(after["state"][k][n], before["state"][k][n])
               for k in before["state"] for n in before["state"][k])
    assert after["param_groups"][1]["weight_decay"] == 0.05


# --- non-finite values -----------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_never_writes_a_non_finite_value(engine):
    """NaN/inf losses and gradients retrace to the last good point, the step quarters, nothing
    non-finite reaches the parameters or the state; training goes on."""
    X, y, w, b, opt = make(ElraAdam, torch.float32, engine=engine)

    def loss_fn():
        return ((X @ w.view(-1) + b - y) ** 2).mean()

    def call(f=None, grad=None):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if grad is not None:
            grad(w.grad)
        opt.step(f if f is not None else loss.item())
        state = [t for s in opt.state.values() for t in s.values()]
        assert all(torch.isfinite(t).all() for t in [w, b] + state)
        return opt.last_outcome

    for _ in range(30):
        assert call() == "accepted"
    good = w.detach().clone()
    call()
    for f, grad, outcome in [(math.nan, None, "retrace_loss"), (math.inf, None, "retrace_loss"),
                             (-math.inf, None, "retrace_loss"),
                             (None, lambda g: g.fill_(math.inf), "retrace_gradient"),
                             (None, lambda g: g.view(-1).__setitem__(0, -math.inf),
                              "retrace_gradient"),
                             (None, lambda g: g.view(-1).__setitem__(7, math.nan),
                              "retrace_gradient")]:
        lr = opt.param_groups[0]["lr"]
        assert call(f, grad) == outcome
        assert opt.param_groups[0]["lr"] == pytest.approx(lr / 4)
        torch.testing.assert_close(w.detach(), good, rtol=0, atol=1e-6)
    before = loss_fn().item()
    for _ in range(30):
        assert call() == "accepted"
    assert loss_fn().item() < before


# --- arguments -------------------------------------------------------------------------------------
def p(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.zeros(*shape, dtype=dtype))


@pytest.mark.parametrize("kw, error", [
    ({"alpha0": 0.0}, ValueError), ({"alpha0": -1e-3}, ValueError), ({"alpha0": math.nan}, ValueError),
    ({"alpha0": math.inf}, ValueError), ({"alpha0": 1e5}, ValueError), ({"alpha0": "1e-3"}, TypeError),
    ({"alpha0": True}, TypeError), ({"weight_decay": -0.1}, ValueError),
    ({"weight_decay": 1.0}, ValueError), ({"weight_decay": math.nan}, ValueError),
    ({"weight_decay": "0.1"}, TypeError), ({"weight_decay": None}, TypeError),
    ({"engine": "gpu"}, ValueError), ({"process_group": "world"}, ValueError),
    ({"process_group": 3}, TypeError)])
def test_bad_arguments_raise(kw, error):
    with pytest.raises(error, match=next(iter(kw))):
        ElraAdam([p(3)], **kw)


@pytest.mark.parametrize("params, error, match", [
    ({p(3)}, TypeError, "ordered"), ([torch.zeros(3, dtype=torch.int64)], TypeError, "floating"),
    ([p(3, dtype=torch.complex64)], TypeError, "complex"), (["x"], TypeError, "Tensors"),
    ([torch.nn.Parameter(torch.zeros(3), requires_grad=False)], ValueError, "trainable"),
    ([{"params": [p(3)], "weight_decay": 3}], ValueError, "weight_decay"),
    ([{"params": [p(3)], "weight_decay": "x"}], TypeError, "weight_decay")])
def test_bad_parameters_raise(params, error, match):
    with pytest.raises(error, match=match):
        ElraAdam(params)


def test_bad_losses_raise():
    opt = ElraAdam([p(3)])
    with pytest.raises(ValueError, match="single value"):
        opt.step(torch.ones(2))
    with pytest.raises(TypeError):
        opt.step("1.0")
    with pytest.raises(TypeError, match="not both"):
        opt.step(1.0, closure=lambda: 1.0)
    with pytest.raises(TypeError):
        opt.set_loss(None)


# --- the API ---------------------------------------------------------------------------------------
def test_lr_shows_the_step_and_schedulers_are_ignored_with_one_warning():
    X, y, w, b, opt = make(ElraAdam, torch.float32)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    with pytest.warns(UserWarning, match="sets its own step size") as rec:
        for _ in range(20):
            opt.zero_grad()
            loss = ((X @ w.view(-1) + b - y) ** 2).mean()
            loss.backward()
            opt.step(loss)
            assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] == opt.stats["alpha"]
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
    assert len([r for r in rec if "own step size" in str(r.message)]) == 1
    assert lrs[-1] > 1e-3 and len(set(lrs)) > 10  # its own step, not the scheduler's


def test_no_lr_to_pass_and_a_group_lr_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="one step size"):
        opt = ElraAdam([{"params": [p(3)], "lr": 0.1}])
    assert opt.param_groups[0]["lr"] == 1e-3


def test_loss_set_loss_closure_and_bare_step_paths():
    """step(loss), set_loss + step() and step(closure) give the same run; a bare step() without
    a recorded loss trains with the guard off."""
    results = []
    for how in ("loss", "set_loss", "closure", "bare"):
        X, y, w, b, opt = make(ElraAdam, torch.float32)

        def closure():
            opt.zero_grad()
            loss = ((X @ w.view(-1) + b - y) ** 2).mean()
            loss.backward()
            return loss

        for _ in range(40):
            if how == "closure":
                assert isinstance(opt.step(closure), torch.Tensor)
                continue
            loss = closure()
            if how == "set_loss":
                opt.set_loss(loss * 2)
                opt.set_loss(0.0)  # accumulation: the step takes the mean
                opt.step()
            elif how == "bare":
                opt.step()
            else:
                opt.step(loss)
        assert opt.last_outcome == "accepted"
        results.append(torch.cat([w.detach().view(-1), b.detach()]))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert torch.equal(results[0], results[3])  # no retrace in this run: the guard never fired


def test_groups_layout_changes_and_no_gradient():
    """add_param_group mid-run, replaced parameter data (model.to) and a call without any
    gradient: the state is carried over, the calls do what they say."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    extra = p(2)
    opt = ElraAdam([model.weight])
    X, y = torch.randn(64, 6), torch.randn(64, 1)

    def call():
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean() + (extra ** 2).sum() + model.bias.sum()
        loss.backward()
        opt.step(loss)

    for _ in range(10):
        call()
    m_before = opt.state[model.weight]["exp_avg"].clone()
    opt.add_param_group({"params": [model.bias, extra], "weight_decay": 0.01})
    assert torch.equal(opt.state[model.weight]["exp_avg"], m_before)
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    call()
    assert opt.last_outcome == "accepted" and model.bias.item() != 0.0
    model.double()  # new parameter data: a new layout, the state carried over
    X, y = X.double(), y.double()
    m_before = opt.state[model.weight]["exp_avg"].clone()
    call()
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float64
    assert not torch.equal(opt.state[model.weight]["exp_avg"], m_before.double())
    assert opt.stats["buffer_bytes"] == 3 * (6 * 8 + 8 + 2 * 4)  # m, v, D per buffer
    opt.zero_grad(set_to_none=True)
    for q in (model.weight, model.bias, extra):
        q.grad = None
    before = [q.detach().clone() for q in (model.weight, model.bias, extra)]
    opt.step(1.0)
    assert opt.last_outcome == "no_gradient"
    assert all(torch.equal(q, r) for q, r in zip((model.weight, model.bias, extra), before))


def test_opcheck_of_the_optimizer_ops_is_in_test_adam_ops():
    """(The ops themselves are tested in tests/test_adam_ops.py.) Here: the engine picks the
    native kernels where they are built."""
    opt = ElraAdam([p(3)])
    assert opt.engine_name == ("native" if HAVE_NATIVE else "torch")
    assert ElraAdam([p(3)], engine="torch").engine_name == "torch"


# --- Lightning -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*does not have many workers",
                            "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.parametrize("set_loss", [False, True])
def test_lightning_is_the_hand_written_loop(digits, set_loss):
    """Lightning's closure (or set_loss in training_step) gives the hand-written run exactly."""
    pl = require("lightning.pytorch")
    X, y = digits
    Xtr, ytr = X[:320], y[:320]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(0)

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            if set_loss:
                self.optimizers().optimizer.set_loss(loss.detach())
            return loss

        def configure_optimizers(self):
            return ElraAdam(self.net.parameters())

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=32)
    module = Module()
    with one_thread():
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, train_dataloaders=loader)
        net = mlp(0)
        opt = ElraAdam(net.parameters())
        for _ in range(3):
            for xb, yb in loader:
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(xb), yb)
                loss.backward()
                opt.step(loss)
    assert trainer.optimizers[0].stats["steps"] == 30 == opt.stats["steps"]
    assert all(torch.equal(a, b) for a, b in zip(module.net.parameters(), net.parameters()))


def test_parameters_of_several_dtypes_share_one_step():
    """float32 and float64 parameters (two flat buffers): one step size from both."""
    torch.manual_seed(0)
    a, b = p(5), p(3, dtype=torch.float64)
    opt = ElraAdam([a, b])
    X = torch.randn(32, 5)
    for _ in range(30):
        opt.zero_grad()
        loss = ((X @ a - 1) ** 2).mean() + ((b - 2) ** 2).sum().float()
        loss.backward()
        opt.step(loss)
    assert opt.last_outcome == "accepted" and opt.stats["steps"] == 30
    assert opt.stats["buffer_bytes"] == 3 * (5 * 4 + 3 * 8)
    assert (b - 2).abs().max() < 2 and opt.param_groups[0]["lr"] > 1e-3
