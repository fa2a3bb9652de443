"""Scenarios that pin ELRA's behaviour to the reference package (elra 0.0.5), by its outputs.

Each scenario feeds an optimizer a fixed sequence of gradients and losses (spikes, NaN and
infinite losses, ``step_retrace`` calls, weight decay with train/validation losses, momentum,
warm-up, long control windows, batch growth by retraces) and records where the parameters go.
Everything is float64, so two implementations of the same algorithm agree to rounding (about
1e-13 relative) over hundreds of steps, and any difference in a rule shows at once.

This file imports nothing but torch and whichever ``elra`` the interpreter finds, so the same
scenarios run against the reference in its own virtual environment (to record its outputs into
``elra_0.0.5.json``, see ``benchmarks/reference_conformance.py``) and against this package in
the test suite (``tests/test_reference_conformance.py``). The reference prints on every call and
writes ``state_lgs.txt`` into the working directory; run it from a scratch directory.

    python scenarios.py OUT.json          # record the outputs of the elra this python imports
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys

import torch
from elra import ElraOptimizer

SAMPLE_EVERY = 10  # long trajectories are recorded at every 10th call (and the last)

# fixed-gradient probes: (classes, losses, index of a call made with step_retrace or None)
PROBES = [
    (0, [2.0, 50.0, 1.9, 1.8], None),
    (0, [2.0, math.nan, 1.9, 1.8], 1),
    (0, [2.0, 1.9, 50.0, 1.8], 1),
    (0, [2.0, math.inf, 1.9], None),
    (10, [2.0, 50.0, 1.9, 1.8], None),
    (10, [2.0, math.nan, 1.9, 1.8], 1),
    (10, [2.0, 1.9, 50.0, 1.8], 1),
    (10, [2.0, math.inf, math.inf, 1.9, 1.8], None),
    (10, [2.0, 1.9, math.inf, 1.8, math.inf, math.inf, 1.7], None),
    (0, [2.0, 1.9, math.inf, 1.8, math.inf, math.inf, 1.7], None),
]

# noisy quadratics (keyword arguments of quadratic())
QUADRATICS = [
    dict(seed=1, n=400, classes=0, batch=768),
    dict(seed=2, n=400, classes=10, batch=768),
    dict(seed=3, n=700, classes=10, batch=256, wd=0.9999, valid_every=50),
    dict(seed=4, n=700, classes=0, batch=32, wd=1e-3, valid_every=50),
    dict(seed=5, n=900, classes=10, batch=768, warmup=10),
    dict(seed=7, n=300, classes=0, batch=768, momentum=0.5),
    dict(seed=8, n=300, classes=10, batch=768, momentum=0.5),
    dict(seed=9, n=300, classes=10, batch=64, wd=0.9999, momentum=0.9, valid_every=40),
    dict(seed=11, n=600, classes=10, batch=768, spike_p=0.15),
    dict(seed=12, n=600, classes=10, batch=64, wd=0.9999, spike_p=0.15, momentum=0.5,
         valid_every=30),
    dict(seed=13, n=600, classes=0, batch=64, wd=1e-3, spike_p=0.15, valid_every=30),
    # losses that drift upwards: stalled long windows, then batch growth and harder decay
    dict(seed=14, n=1300, classes=10, batch=768, drift=0.0003),
    dict(seed=16, n=1000, classes=0, batch=768, wd=1e-3, drift=0.0003, valid_every=100),
]

ROSENBROCK_STARTS = [(0.3, 0.8), (-1.2, 1.0)]


def _quiet():
    """Silence the reference's prints (ours prints nothing)."""
    return contextlib.redirect_stdout(io.StringIO())


def _make(params, classes, batch, engine, **kw):
    if engine:  # only this package has engines; the reference is called without
        kw["engine"] = engine
    return ElraOptimizer(params, None, batch, classes, **kw)


def probe(classes, losses, retrace_at, engine=None):
    """x after each call, with a fixed, slowly changing gradient and the given losses."""
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = _make([x], classes, 64, engine, lr=0.04)
    out = []
    for i, f in enumerate(losses):
        opt.zero_grad()
        x.grad = torch.tensor([1.0, 0.5, -0.25], dtype=torch.float64) * (1 + 0.3 * i)
        if i == retrace_at:
            opt.step_retrace(f)
        else:
            opt.step(f)
        out.append(x.detach().tolist())
    return out


def quadratic(seed, n, classes, batch, wd=0.0, valid_every=0, warmup=1, momentum=None,
              spike_p=0.03, drift=0.0, dim=7, engine=None):
    """A noisy quadratic with loss spikes and NaN losses; x at every SAMPLE_EVERY-th call."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))
    kw = dict(lr=1e-3, weight_decay=wd)
    if warmup > 1:
        kw["warmup"] = warmup
    if momentum is not None:
        kw["momentum"] = momentum
    opt = _make([x], classes, batch, engine, **kw)
    curvature = torch.linspace(0.5, 3.0, dim, dtype=torch.float64)
    out = []
    for i in range(n):
        opt.zero_grad()
        noise = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.3
        x.grad = x.detach() * curvature + noise
        f = base = float((x.detach() ** 2).sum()) + rng.uniform(0, 0.5) + drift * i
        r = rng.random()
        if r < spike_p:
            f = math.inf
        elif r < 2 * spike_p:
            f = f * rng.uniform(1.5, 30)
        opt.step(f)
        if valid_every and i % valid_every == valid_every - 1:
            opt.set_train_loss(base)
            opt.set_valid_loss(base * rng.uniform(0.8, 1.6))
        if i % SAMPLE_EVERY == SAMPLE_EVERY - 1 or i == n - 1:
            out.append(x.detach().tolist())
    return out


def rosenbrock(start, budget=400, engine=None):
    """Deterministic regime, lr=1e-6, float64: the calls until the loss is below 1e-4 and the
    first 20 points."""
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = _make([x], 0, 8, engine, lr=1e-6)
    points = []
    for i in range(budget):
        opt.zero_grad()
        loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        if len(points) < 20:
            points.append(x.detach().tolist())
        if loss.item() < 1e-4:
            return {"calls": i, "points": points}
        loss.backward()
        opt.step(loss.item())
    return {"calls": budget, "points": points}


def digits(seed, epochs=20, batch=32, engine=None):
    """The anchor task of ELRA_ALGORITHM.md in float32 (scikit-learn's digits, 1400/397 split,
    MLP 64-128-10, stochastic regime, lr=1e-4, warmup=10): the mean training loss of each epoch,
    the final training loss and the test accuracy."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    Xtr, ytr, Xte, yte = X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = _make(model.parameters(), 10, batch, engine, lr=1e-4, warmup=10)
    lf = torch.nn.CrossEntropyLoss()
    epoch_losses = []
    for _ in range(epochs):
        p = torch.randperm(1400, generator=g)
        total = 0.0
        for i in range(0, 1400, batch):
            idx = p[i:i + batch]
            opt.zero_grad()
            loss = lf(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step(loss.item())
            total += loss.item()
        epoch_losses.append(total / math.ceil(1400 / batch))
    with torch.no_grad():
        train_loss = lf(model(Xtr), ytr).item()
        acc = (model(Xte).argmax(1) == yte).float().mean().item()
    return {"epoch_losses": epoch_losses, "train_loss": train_loss, "accuracy": acc}


DIGITS_SEEDS = [0, 1, 2]


def run_all(engine=None, with_digits=True) -> dict:
    with _quiet():
        out = {
            "probes": [probe(c, list(l), r, engine) for c, l, r in PROBES],
            "quadratics": [quadratic(**q, engine=engine) for q in QUADRATICS],
            "rosenbrock": [rosenbrock(s, engine=engine) for s in ROSENBROCK_STARTS],
        }
        if with_digits:
            out["digits"] = [digits(s, engine=engine) for s in DIGITS_SEEDS]
        return out


if __name__ == "__main__":
    result = run_all()
    from importlib.metadata import version

    result["recorded_with"] = {"torch": torch.__version__, "elra": version("elra")}
    with open(sys.argv[1], "w") as fh:
        json.dump(result, fh)
