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


# --- eval() / train(): the average in place -----------------------------------------------------
def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def test_eval_and_train_before_any_step_and_without_boosting_change_nothing():
    model, opt = setup()
    before = params_of(model)
    opt.eval()  # before the first step, boosting off: nothing to put in
    opt.train()
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    train(model, opt, 5)
    opt.eval()  # boosting off: the training point stays, steps go on
    train(model, opt, 5)
    assert opt.last_outcome == "accepted"
    opt.get_boost_model(True)
    opt.eval()  # on, but nothing averaged yet
    train(model, opt, 3)
    assert opt.last_outcome == "accepted"


def test_eval_puts_the_average_in_place_and_train_takes_it_back():
    model_a, opt_a = setup()
    model_b, opt_b = setup()
    for m, o in ((model_a, opt_a), (model_b, opt_b)):
        o.get_boost_model(True)
        train(m, o, 40)
    expected = [p.detach().clone() for p in opt_a.get_boost_model(True, model_a)[2].parameters()]
    training_point = params_of(model_b)
    storage = next(model_b.parameters()).untyped_storage().data_ptr()
    opt_b.eval()
    opt_b.eval()  # idempotent: the training point is not lost
    for p, q in zip(model_b.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    assert next(model_b.parameters()).untyped_storage().data_ptr() == storage  # in place
    with pytest.raises(RuntimeError, match="train()"):
        x, y = data(99)
        ((model_b(x) - y) ** 2).mean().backward()
        opt_b.step(1.0)
    opt_b.train()
    opt_b.train()
    assert all(torch.equal(a, b) for a, b in zip(training_point, model_b.parameters()))
    # and the path goes on as if eval/train had never been called (the get_boost_model call
    # on opt_a restarted its average; the path never depends on it)
    train(model_a, opt_a, 20)
    train(model_b, opt_b, 20)
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoints_in_either_mode_resume_the_same_path(mode):
    """A checkpoint saved in evaluation mode holds the averaged model (model.state_dict()) and
    the training point (the optimizer's state): loading it and calling train() resumes exactly
    the uninterrupted run."""
    from conftest import roundtrip

    model_a, opt_a = setup()
    opt_a.get_boost_model(True)
    train(model_a, opt_a, 60)
    model_b, opt_b = setup()
    opt_b.get_boost_model(True)
    train(model_b, opt_b, 30)
    if mode == "eval":
        opt_b.eval()
    ckpt = roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    assert ("train_point" in ckpt["opt"]["state"][0]) == (mode == "eval")
    model_c, opt_c = setup(seed=7)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    opt_c.train()  # the Trainer calls it before training; a no-op when saved in train mode
    opt_b.train()
    for m, o in ((model_b, opt_b), (model_c, opt_c)):
        for i in range(30, 60):
            x, y = data(i)
            o.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            o.step(loss.item())
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_c.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_eval_leaves_buffers_alone():
    """Only the optimized parameters are averaged: BatchNorm's running statistics (buffers)
    stay what the training run made them (the manual says how to recompute them)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 1))
    opt = ElraOptimizer(model.parameters(), model, lr=1e-3, regime="stochastic")
    opt.get_boost_model(True)
    train(model, opt, 20)
    stats = [b.clone() for b in model.buffers()]
    opt.eval()
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    opt.train()


# --- torch's own GradScaler around ELRA ------------------------------------------------------------
@pytest.mark.slow
def test_torch_grad_scaler_in_a_hand_written_loop(digits, digits_anchor):
    """torch.amp.GradScaler with float16 autocast (on the CPU): scaler.step(optimizer, loss)
    passes the loss on to ELRA; steps whose scaled gradients overflow are skipped by the scaler
    (so nothing non-finite reaches the parameters) and the run trains like the float32 one."""
    from conftest import digits_anchor_optimizer, digits_split, mlp, one_thread

    X, y = digits
    with one_thread():
        for seed, (_, hand_acc, _, _) in zip((0, 1, 2), digits_anchor):
            Xtr, ytr, Xte, yte, g = digits_split(X, y, seed)
            model = mlp(seed)
            opt = digits_anchor_optimizer(model)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # overflows at first
            skipped = 0
            for _ in range(20):
                p = torch.randperm(1400, generator=g)
                for i in range(0, 1400, 32):
                    idx = p[i:i + 32]
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.float16):
                        loss = torch.nn.functional.cross_entropy(model(Xtr[idx]).float(),
                                                                 ytr[idx])
                    before = opt.stats["steps"]
                    scaler.scale(loss).backward()
                    scaler.step(opt, loss.item())
                    scaler.update()
                    skipped += opt.stats["steps"] == before
                    assert all_finite(model.parameters())
            with torch.no_grad():
                acc = (model(Xte).argmax(1) == yte).float().mean().item()
            assert 0 < skipped < 40 and scaler.get_scale() < 2.0 ** 30
            assert opt.stats["no_loss_steps"] == 0 and abs(acc - hand_acc) <= 0.01, (acc, hand_acc)
            print(f"[measured] GradScaler loop seed {seed}: accuracy {acc:.4f} (float32 {hand_acc:.4f}), "
                  f"{skipped} steps skipped")
