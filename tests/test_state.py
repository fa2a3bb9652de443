"""Checkpoints: exact resume, weights_only loading, standard layout, errors that change nothing."""

import copy
import io
import math

import pytest
import torch

from elra import ElraGradScaler, ElraOptimizer, native_status
from conftest import control_of, roundtrip


def make(regime, seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    groups = [{"params": model[0].parameters(), "weight_decay": 1e-3},
              {"params": model[2].parameters()}]
    opt = ElraOptimizer(groups, model, 16, 3, lr=1e-3, regime=regime, warmup=5, **kw)
    return model, opt


def batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def train(model, opt, start, stop, nan_at=(), boost_every=None):
    lf = torch.nn.CrossEntropyLoss()
    for i in range(start, stop):
        x, y = batch(i)
        opt.zero_grad()
        loss = lf(model(x), y)
        loss.backward()
        opt.step(math.nan if i in nan_at else loss.item())
        if i == 120:
            opt.set_train_loss(loss.item())
            opt.set_valid_loss(loss.item() * 1.5)
        if boost_every and i % boost_every == boost_every - 1:
            opt.get_boost_model(True, model)


def flat_state(opt):
    sd = opt.state_dict()
    tensors = {(k, n): v.clone() for k, e in sd["state"].items() for n, v in e.items()}
    return tensors, copy.deepcopy(sd["param_groups"])


ENGINES = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native_status()["cpu"], reason="native kernels not built"))]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("regime", ["stochastic", "deterministic"])
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_exact_resume(regime, momentum, engine):
    n = 251  # odd: the checkpoint holds a partial gradient collection
    nan_at = (37, 300)
    model_a, opt_a = make(regime, collects=2, momentum=momentum, engine=engine)
    opt_a.get_boost_model(True, model_a)
    train(model_a, opt_a, 0, 2 * n, nan_at, boost_every=80)

    model_b, opt_b = make(regime, collects=2, momentum=momentum, engine=engine)
    opt_b.get_boost_model(True, model_b)
    train(model_b, opt_b, 0, n, nan_at, boost_every=80)
    extra = opt_b.state_dict()["param_groups"][0]["elra"]
    assert extra["engine"]["collected_count"] == 1 and extra["boost"]["count"] > 0
    ckpt = roundtrip({"model": model_b.state_dict(), "optim": opt_b.state_dict()})

    # other init, no collection yet
    model_c, opt_c = make(regime, seed=123, momentum=momentum, engine=engine)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["optim"])
    train(model_c, opt_c, n, 2 * n, nan_at, boost_every=80)

    stats = opt_a.stats
    assert stats["steps"] > 200 and stats["retraces"] >= 2 and stats["collects"] >= 2
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
    ta, ga = flat_state(opt_a)
    tc, gc = flat_state(opt_c)
    assert ga == gc
    assert ta.keys() == tc.keys()
    assert all(torch.equal(ta[k], tc[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.skipif(not native_status()["cpu"], reason="native kernels not built")
@pytest.mark.parametrize("saved,loaded", [("native", "torch"), ("torch", "native")])
def test_checkpoint_moves_between_engines(saved, loaded):
    """A checkpoint of one engine resumes on the other: the same decisions afterwards and the
    parameters of an uninterrupted run to float32 rounding (the engines round differently)."""
    model_a, opt_a = make("stochastic", engine=saved)
    train(model_a, opt_a, 0, 160, nan_at=(37,))
    model_b, opt_b = make("stochastic", engine=saved)
    train(model_b, opt_b, 0, 80, nan_at=(37,))
    ckpt = roundtrip({"model": model_b.state_dict(), "optim": opt_b.state_dict()})
    model_c, opt_c = make("stochastic", seed=5, engine=loaded)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["optim"])
    assert opt_c.engine_name == loaded
    train(model_c, opt_c, 80, 160, nan_at=(37,))
    ca, cc = control_of(opt_a), control_of(opt_c)
    for k, v in ca.items():  # same decisions (counters, flags); statistics to rounding
        if isinstance(v, float):
            assert cc[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
        else:
            assert cc[k] == pytest.approx(v), k
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.allclose(pa, pc, rtol=1e-4, atol=1e-5)


def test_state_dict_layout_is_torch_standard():
    model, opt = make("stochastic", momentum=None)
    opt.get_boost_model(True, model)
    train(model, opt, 0, 10)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    for g in sd["param_groups"]:
        assert g["elra"]["version"] == 1 and "control" in g["elra"] and "lr" in g
    params = list(model.parameters())
    for i, p in enumerate(params):
        entry = sd["state"][i]
        assert {"direction", "boost_average"} <= set(entry)
        assert entry["direction"].shape == p.shape
        # views of one flat buffer: nothing was copied
        assert entry["direction"].untyped_storage().data_ptr() == \
            sd["state"][0]["direction"].untyped_storage().data_ptr()
        assert entry["direction"].untyped_storage().data_ptr() == \
            opt.state[p]["direction"].untyped_storage().data_ptr()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_state_dict_changes_nothing():
    model, opt = make("deterministic")
    train(model, opt, 0, 20)
    t1, g1 = flat_state(opt)
    p1 = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.state_dict()
    t2, g2 = flat_state(opt)
    assert g1 == g2 and all(torch.equal(t1[k], t2[k]) for k in t1)
    assert all(torch.equal(a, b) for a, b in zip(p1, model.parameters()))
    train(model, opt, 20, 21)  # and stepping after it works as usual
    assert opt.last_outcome == "accepted"


def corrupt(sd, how):
    sd = copy.deepcopy(sd)
    if how == "shape":
        sd["state"][0]["direction"] = torch.zeros(3, 3)
    elif how == "groups":
        sd["param_groups"] = sd["param_groups"][:1]
    elif how == "group_size":
        sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:1]
    elif how == "version":
        for g in sd["param_groups"]:
            g["elra"]["version"] = 99
    elif how == "missing_param":
        del sd["state"][3]
    elif how == "not_elra":
        for g in sd["param_groups"]:
            del g["elra"]
    elif how == "engine_scalars":
        for g in sd["param_groups"]:
            del g["elra"]["engine"]["alpha"]
    elif how == "weight_decay":
        sd["param_groups"][0]["weight_decay"] = 0.3
    elif how == "not_a_dict":
        return [1, 2]
    return sd


@pytest.mark.parametrize("how", ["shape", "groups", "group_size", "version", "missing_param",
                                 "not_elra", "engine_scalars", "weight_decay", "not_a_dict"])
def test_bad_state_raises_and_changes_nothing(how):
    model, opt = make("stochastic")
    train(model, opt, 0, 15)
    good = roundtrip(opt.state_dict())
    model2, opt2 = make("stochastic", seed=1)
    train(model2, opt2, 0, 7)
    t1, g1 = flat_state(opt2)
    with pytest.raises(ValueError):
        opt2.load_state_dict(corrupt(good, how))
    t2, g2 = flat_state(opt2)
    assert g1 == g2 and all(torch.equal(t1[k], t2[k]) for k in t1)
    train(model2, opt2, 7, 8)


def test_frozen_layout_mismatch_raises():
    model, opt = make("stochastic")
    train(model, opt, 0, 5)
    sd = roundtrip(opt.state_dict())
    model2, _ = make("stochastic")
    model2[2].bias.requires_grad_(False)
    groups = [{"params": model2[0].parameters(), "weight_decay": 1e-3},
              {"params": model2[2].parameters()}]
    opt2 = ElraOptimizer(groups, model2, 16, 3, lr=1e-3, regime="stochastic")
    with pytest.raises(ValueError, match="frozen"):
        opt2.load_state_dict(sd)


def test_scaler_state_roundtrip():
    s = ElraGradScaler(init_scale=1024.0, growth_interval=3)
    s._growth_tracker = 2
    t = ElraGradScaler()
    t.load_state_dict(roundtrip(s.state_dict()))
    assert t.get_scale() == 1024.0 and t.state_dict() == s.state_dict()
    with pytest.raises(ValueError):
        t.load_state_dict({"scale": -1.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 1, "_growth_tracker": 0})
    with pytest.raises(ValueError):
        t.load_state_dict({})


def test_torch_distributed_checkpoint_state_dict_roundtrip():
    """DCP's get/set_optimizer_state_dict (FQN-keyed state) restore the run exactly."""
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    model_a, opt_a = make("stochastic", collects=2)
    train(model_a, opt_a, 0, 41)
    osd = get_optimizer_state_dict(model_a, opt_a)
    assert "0.weight" in osd["state"] and "elra" in osd["param_groups"][0]
    model_b, opt_b = make("stochastic", seed=3)
    model_b.load_state_dict(model_a.state_dict())
    set_optimizer_state_dict(model_b, opt_b, copy.deepcopy(osd))
    train(model_a, opt_a, 41, 80)
    train(model_b, opt_b, 41, 80)
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))


def test_zero_redundancy_optimizer_forwards_the_loss():
    """ZeroRedundancyOptimizer passes step's argument on as closure=...: a loss still works."""
    import os

    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model, _ = make("stochastic")
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ElraOptimizer,
                                      lr=1e-3, regime="stochastic")
        lf = torch.nn.CrossEntropyLoss()
        for i in range(5):
            x, y = batch(i)
            opt.zero_grad()
            loss = lf(model(x), y)
            loss.backward()
            opt.step(loss.item())
        assert opt.optim.last_outcome == "accepted"
    finally:
        dist.destroy_process_group()
