"""ELRA with torch.compile: a compiled model trains as the eager one; a compiled training step
(the optimizer step inside it) too; the step itself does not compile into a graph.

ELRA's step is host control (decisions from loss floats and counters) around fused kernels, so
Dynamo has nothing to gain there and breaks the graph at it (with fullgraph=True it raises).
"""

import pytest
import torch

from elra import ElraOptimizer
from conftest import one_thread

pytestmark = pytest.mark.slow  # compilations


def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)


def run(how, steps=60):
    X, y = data()
    model = make()
    if how == "optimizer_first":  # the flat buffer exists before compilation
        opt = ElraOptimizer(model.parameters(), lr=1e-4, warmup=10, regime="stochastic")
        forward = torch.compile(model)
    else:
        forward = torch.compile(model) if how == "compiled_model" else model
        opt = ElraOptimizer(model.parameters(), lr=1e-4, warmup=10, regime="stochastic")

    def train_step(xb, yb):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(xb), yb)
        loss.backward()
        opt.step(loss)
        return loss

    step = torch.compile(train_step) if how == "compiled_train_step" else train_step
    losses = []
    for i in range(steps):
        idx = slice(32 * i % 512, 32 * i % 512 + 32)
        losses.append(float(step(X[idx], y[idx]).detach()))
    return losses, [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("how", ["compiled_model", "optimizer_first", "compiled_train_step"])
def test_compiled_runs_follow_the_eager_run(how):
    with one_thread():
        eager_losses, eager_params, eager_opt = run("eager")
        losses, params, opt = run(how)
    assert opt.stats["steps"] == eager_opt.stats["steps"] == 60
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    for p, q in zip(params, eager_params):  # the compiled kernels round differently
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert losses[-1] < 0.7 * losses[0]
    dev = max(float(((p - q).abs() / q.abs().clamp_min(1e-3)).max()) for p, q in zip(params, eager_params))
    print(f"[measured] {how}: max relative loss difference to eager "
          f"{max(abs(a / b - 1) for a, b in zip(losses, eager_losses)):.1e}, parameters {dev:.1e}")


def test_the_step_itself_breaks_the_graph():
    model = make()
    opt = ElraOptimizer(model.parameters(), lr=1e-4, warmup=10, regime="stochastic")
    X, y = data()
    torch.nn.functional.cross_entropy(model(X[:32]), y[:32]).backward()
    with pytest.raises(Exception):  # Dynamo's Unsupported (a host read for a decision)
        torch.compile(opt.step, fullgraph=True)(1.0)
    torch.compile(opt.step)(1.0)  # without fullgraph it falls back to running eagerly
    assert opt.last_outcome == "first"
