"""How the loss reaches a step: set_loss before a bare step(), steps without any loss,
step(retrace=True), and the process-group arguments in a single process."""

import logging
import math

import pytest
import torch

from elra import ElraOptimizer
from conftest import control_of, digits_anchor_optimizer, elra_state, one_thread, roundtrip, train_digits


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # small networks; the digits run is compared with digits_anchor's
        yield


def mlp_setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    kw.setdefault("regime", "stochastic")
    kw.setdefault("lr", 1e-4)
    return model, ElraOptimizer(model.parameters(), **kw)


def batches(n, seed=1, size=16):
    """Mini-batches of a learnable task (labels from a fixed linear teacher)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(6, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(size, 6, generator=g)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def loss_of(model, xb):
    x, y = xb
    return torch.nn.functional.cross_entropy(model(x), y)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --- set_loss ---------------------------------------------------------------------------------------
def test_set_loss_then_bare_step_is_step_with_the_loss():
    m1, o1 = mlp_setup()
    m2, o2 = mlp_setup()
    for xb in batches(30):
        for m, o, bare in ((m1, o1, False), (m2, o2, True)):
            o.zero_grad()
            loss = loss_of(m, xb)
            loss.backward()
            if bare:
                o.set_loss(loss)
                o.step()
            else:
                o.step(loss)
        assert o1.last_outcome == o2.last_outcome
    assert same(params(m1), params(m2))
    assert control_of(o1) == control_of(o2)


def test_set_loss_several_times_steps_with_the_mean():
    m1, o1 = mlp_setup()
    m2, o2 = mlp_setup()
    for xb in batches(20):
        losses = [1.0, 2.0, 4.5]
        for m, o, recorded in ((m1, o1, False), (m2, o2, True)):
            o.zero_grad()
            loss_of(m, xb).backward()
            if recorded:
                for v in losses:
                    o.set_loss(torch.tensor(v))
                o.step()
            else:
                o.step(sum(losses) / 3)
    assert same(params(m1), params(m2))
    assert control_of(o2)["f0"] == pytest.approx(2.5)


def test_a_given_loss_discards_recorded_ones():
    m1, o1 = mlp_setup()
    m2, o2 = mlp_setup()
    for xb in batches(10):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            loss = loss_of(m, xb)
            loss.backward()
            if o is o2:
                o.set_loss(123.0)  # superseded by the loss given to step
            o.step(loss)
    assert same(params(m1), params(m2))
    assert elra_state(o2)["recorded_loss"] == [0.0, 0]


def test_set_loss_rejects_what_is_not_a_loss():
    _, opt = mlp_setup()
    for bad, err in ((None, TypeError), ("1", TypeError), (torch.ones(2), ValueError)):
        with pytest.raises(err):
            opt.set_loss(bad)
    assert elra_state(opt)["recorded_loss"] == [0.0, 0]


def test_recorded_nan_loss_retraces():
    model, opt = mlp_setup()
    bs = batches(5)
    for xb in bs[:3]:
        opt.zero_grad()
        loss = loss_of(model, xb)
        loss.backward()
        opt.step(loss)
    before = params(model)
    opt.zero_grad()
    loss_of(model, bs[3]).backward()
    opt.set_loss(float("nan"))
    opt.step()
    assert opt.last_outcome == "retrace_loss"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not same(before, params(model))  # went back along the last direction


def test_recorded_losses_survive_a_checkpoint():
    model, opt = mlp_setup()
    xb = batches(1)[0]
    opt.zero_grad()
    loss_of(model, xb).backward()
    opt.set_loss(0.75)
    state = roundtrip(opt.state_dict())
    model2, opt2 = mlp_setup()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state)
    assert elra_state(opt2)["recorded_loss"] == [0.75, 1]


# --- no loss at all ---------------------------------------------------------------------------------
def test_bare_step_without_any_loss_trains_and_says_so_once(caplog):
    model, opt = mlp_setup()
    xs = batches(40)
    first = sum(loss_of(model, xb).item() for xb in xs) / len(xs)
    with caplog.at_level(logging.WARNING, logger="elra"):
        for xb in xs * 3:
            opt.zero_grad()
            loss_of(model, xb).backward()
            opt.step()
    said = [r for r in caplog.records if "got no loss" in r.getMessage()]
    assert len(said) == 1
    for way in ("set_loss", "step(loss)", "closure", "ElraGradScaler"):
        assert way in said[0].getMessage()
    assert opt.last_outcome == "accepted"
    assert opt.stats["no_loss_steps"] == opt.stats["steps"] == 120
    last = sum(loss_of(model, xb).item() for xb in xs) / len(xs)
    assert last < 0.8 * first


class _BareSteps:
    """train_digits calls opt.step(loss); this optimizer gets a bare step() instead."""

    def __init__(self, model):
        self.opt = digits_anchor_optimizer(model)
        self.zero_grad = self.opt.zero_grad

    def step(self, loss):
        self.opt.step()


@pytest.mark.slow
def test_digits_without_losses_is_the_anchor_run_when_nothing_retraces(digits, digits_anchor):
    """On the digits anchor no step is retraced and the batch never grows, so the loss
    statistics never act: the run without any loss is the run with losses, bit for bit."""
    X, y = digits
    _, acc, model, bare = train_digits(X, y, _BareSteps, seed=0)
    _, hand_acc, hand_model, hand_opt = digits_anchor[0]
    assert hand_opt.stats["retraces"] == 0 and bare.opt.stats["no_loss_steps"] == 880
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), hand_model.parameters()))
    assert acc == hand_acc >= 0.965


def test_no_loss_retraces_only_on_non_finite_gradients():
    model, opt = mlp_setup()
    bs = batches(6)
    outcomes = []
    for i, xb in enumerate(bs):
        opt.zero_grad()
        loss = loss_of(model, xb) * (1e6 if i == 3 else 1.0)  # a huge loss is not seen
        loss.backward()
        if i == 4:
            next(model.parameters()).grad[0, 0] = math.inf
        opt.step()
        outcomes.append(opt.last_outcome)
    assert outcomes == ["first", "accepted", "accepted", "accepted", "retrace_gradient",
                        "accepted"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_losses_after_steps_without_one_use_only_their_own_statistics():
    model, opt = mlp_setup()
    bs = batches(12)
    for xb in bs[:4]:  # no loss: statistics stay open
        opt.zero_grad()
        loss_of(model, xb).backward()
        opt.step()
    assert math.isinf(opt.stats["threshold"])
    for xb in bs[4:10]:
        opt.zero_grad()
        loss = loss_of(model, xb)
        loss.backward()
        opt.step(loss)
        assert opt.last_outcome == "accepted"
    assert control_of(opt)["mean_ref"] < 3.0 and math.isfinite(opt.stats["threshold"])
    opt.zero_grad()
    loss_of(model, bs[10]).backward()
    opt.step(50.0)  # an outlier against the losses that were given
    assert opt.last_outcome == "retrace_loss"


def test_no_loss_steps_in_the_deterministic_regime_and_collection():
    model, opt = mlp_setup(regime="deterministic", collects=2)
    for xb in batches(30):
        opt.zero_grad()
        loss_of(model, xb).backward()
        opt.step()
    assert opt.stats["steps"] == 15 and opt.last_outcome == "accepted"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- step(retrace=True) -----------------------------------------------------------------------------
def test_step_retrace_keyword_is_step_retrace():
    m1, o1 = mlp_setup()
    m2, o2 = mlp_setup()
    for i, xb in enumerate(batches(30)):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            loss = loss_of(m, xb)
            loss.backward()
            if i in (7, 19):
                if o is o1:
                    o.step_retrace(loss)
                else:
                    o.step(loss, retrace=True)
            else:
                o.step(loss)
        assert o1.last_outcome == o2.last_outcome
    assert same(params(m1), params(m2)) and o1.stats["retraces"] == 2


# --- process group arguments without torch.distributed ---------------------------------------------
def test_process_group_defaults_to_none_without_torch_distributed():
    _, opt = mlp_setup()
    assert opt.process_group is None and opt.sharded is False
    _, opt = mlp_setup(process_group=None)
    assert opt.process_group is None


@pytest.mark.parametrize("kw,err", [
    (dict(process_group="world"), ValueError),
    (dict(process_group=3), TypeError),
    (dict(sharded=1), TypeError),
    (dict(sharded=True, process_group=None), ValueError),
    (dict(sharded=True), ValueError),  # "auto" without torch.distributed initialised
])
def test_bad_distributed_arguments(kw, err):
    with pytest.raises(err):
        mlp_setup(**kw)
