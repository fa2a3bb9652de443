"""ElraGradScaler and boosting."""

import math

import pytest
import torch

from elra import ElraGradScaler, ElraOptimizer
from conftest import all_finite


def setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    kw.setdefault("regime", "stochastic")
    return model, ElraOptimizer(model.parameters(), model, lr=1e-3, **kw)


def data(i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(32, 5, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def test_power_of_two_scale_gives_bitwise_identical_steps():
    finals = []
    for use_scaler in (False, True):
        model, opt = setup()
        scaler = ElraGradScaler(init_scale=2.0**10)
        for i in range(60):
            x, y = data(i)
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            if use_scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step(loss)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_overflow_retraces_and_backs_off():
    model, opt = setup()
    scaler = ElraGradScaler(init_scale=2.0**16, growth_interval=3)
    x, y = data(0)
    seen = []
    for i in range(12):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if i == 6:
            scaler._scale = 3e38  # the scaled gradients overflow float32
        scaler.scale(loss).backward()
        scaler.step(opt)
        seen.append((opt.last_outcome, scaler.get_scale()))
        scaler.update()
        assert all_finite(model.parameters())
    assert seen[6][0] == "retrace_gradient"
    assert scaler.get_scale() < 3e38
    # growth after growth_interval clean steps
    assert seen[3][1] == 2.0**17


def test_scaler_needs_a_loss_and_an_elra_optimizer():
    model, opt = setup()
    scaler = ElraGradScaler()
    with pytest.raises(TypeError, match="scale"):
        scaler.step(opt)
    with pytest.raises(TypeError, match="ElraOptimizer"):
        scaler.step(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(ValueError):
        ElraGradScaler(init_scale=0.0)
    with pytest.raises(ValueError):
        ElraGradScaler(backoff_factor=1.5)


def test_unscale_then_step_is_not_unscaled_twice():
    finals = []
    for unscale in (False, True):
        model, opt = setup()
        scaler = ElraGradScaler(init_scale=2.0**8)
        for i in range(20):
            x, y = data(i)
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            scaler.scale(loss).backward()
            if unscale:
                scaler.unscale_(opt)
                with pytest.raises(RuntimeError):
                    scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_disabled_scaler_is_a_plain_step():
    model, opt = setup()
    scaler = ElraGradScaler(enabled=False)
    x, y = data(0)
    loss = ((model(x) - y) ** 2).mean()
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0
    loss.backward()
    scaler.step(opt)
    assert opt.last_outcome == "first"
    assert scaler.state_dict() == {}


def train(model, opt, n, boost=False):
    points, losses = [], []
    for i in range(n):
        x, y = data(i)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(loss.item())
        if opt.last_outcome in ("first", "accepted"):
            points.append(before)
            losses.append(loss.item())
    return points, losses


def test_boosting_never_changes_the_path_and_averages_accepted_points():
    model_a, opt_a = setup()
    train(model_a, opt_a, 50)
    model_b, opt_b = setup()
    assert opt_b.get_boost_model(True, model_b) == (0, pytest.approx(math.nan, nan_ok=True), None)
    points, losses = train(model_b, opt_b, 50)
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    count, avg_loss, copy_ = opt_b.get_boost_model(True)
    assert count == len(points) > 40
    assert avg_loss == pytest.approx(sum(losses) / len(losses))
    for k, p in enumerate(copy_.parameters()):
        mean = torch.stack([pt[k] for pt in points]).mean(0)
        assert torch.allclose(p, mean, atol=1e-6)
        assert p.untyped_storage().data_ptr() != \
            next(model_b.parameters()).untyped_storage().data_ptr()  # a copy
    # each call that hands out a model restarts the average
    assert opt_b.get_boost_model(True)[0] == 0
    assert opt_b.get_boost_model(False) == (0, pytest.approx(math.nan, nan_ok=True), None)
    assert "boost_average" not in opt_b.state[next(model_b.parameters())]


def test_boost_cycle_halves_the_count():
    """Unit test of the booster: at the cycle length the count (and the loss sum) halve, so the
    average never spans much more than a cycle and older points fade."""
    from elra.boost import Booster
    from elra.flat_buffer import FlatBuffer

    p = torch.nn.Parameter(torch.zeros(3))
    buf = FlatBuffer([p], [0])
    b = Booster([buf], cycle=10)
    counts = []
    for k in range(25):
        with torch.no_grad():
            p.fill_(float(k))
        b.update([buf], loss=float(k))
        counts.append(b.count)
    assert max(counts) == 10 and counts[10] == 6 and 5 < b.count <= 10
    assert b.avg_loss < 24 and b.average[0][0].item() > 12  # weighted towards recent points
