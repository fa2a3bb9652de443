"""Shared helpers: small problems with known answers."""

import contextlib
import importlib
import io
import math
import os

import pytest
import torch

from elra import ElraOptimizer


def pytest_terminal_summary(terminalreporter):
    """The largest deviations of the CUDA kernels from the CPU ones (tests/cuda_targets.py)."""
    import sys

    targets = sys.modules.get("cuda_targets")
    for line in targets.deviation_report() if targets is not None else []:
        terminalreporter.write_line(line)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def rosenbrock_steps(start=(0.3, 0.8), lr=1e-6, limit=1e-4, budget=200, dtype=torch.float32):
    """Calls of step() until the loss first falls below ``limit`` (ELRA, deterministic)."""
    x = torch.nn.Parameter(torch.tensor(start, dtype=dtype))
    opt = ElraOptimizer([x], lr=lr, regime="deterministic")
    thresholds = []
    for i in range(budget):
        opt.zero_grad()
        loss = rosenbrock(x)
        if loss.item() < limit:
            return i, thresholds, opt
        loss.backward()
        opt.step(loss.item())
        thresholds.append(opt.stats["threshold"])
    return budget, thresholds, opt


def elra_state(opt) -> dict:
    """ELRA's scalars as the checkpoint holds them (the "elra" entry of ``state_dict()``)."""
    return opt.state_dict()["param_groups"][0]["elra"]


def control_of(opt) -> dict:
    """The control law's state as the checkpoint holds it."""
    return elra_state(opt)["control"]


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    return X, y


def mlp(seed=0, hidden=128):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))


DIGITS_SEEDS = (0, 1, 2)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: small networks train several times faster so (much more on a
    busy machine), with the same results (checked bit for bit on the digits anchor)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def digits_anchor_optimizer(model):
    """The optimizer of the digits anchor (ELRA_ALGORITHM.md): stochastic, lr=1e-4, warmup=10."""
    return ElraOptimizer(model.parameters(), lr=1e-4, warmup=10, regime="stochastic", classes=10)


@pytest.fixture(scope="session")
def digits_anchor(digits):
    """The hand-written digits loop with the anchor's optimizer, seeds 0-2 (trained once)."""
    X, y = digits
    with one_thread():
        return [train_digits(X, y, digits_anchor_optimizer, seed=s) for s in DIGITS_SEEDS]


def digits_split(X, y, seed):
    """The 1400/397 split of :func:`train_digits` and the generator it continues with
    (each epoch draws its batch order from it)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    return X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]], g


def require(module: str):
    """Import a test extra (requirements-dist.txt): skipped where it is not installed, but a
    failure in CI, where scripts/setup_env.sh installs it."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is a test extra: "
                               "pip install -r requirements-dist.txt")


def train_digits(X, y, make_opt, seed=0, epochs=20, batch=32, model=None, dtype=torch.float32):
    """Train the 64-128-10 MLP on a 1400/397 split; return (train loss, test accuracy, model, opt)."""
    Xtr, ytr, Xte, yte, g = digits_split(X, y, seed)
    model = model if model is not None else mlp(seed)
    model = model.to(dtype)
    opt = make_opt(model)
    lf = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        p = torch.randperm(1400, generator=g)
        for i in range(0, 1400, batch):
            idx = p[i:i + batch]
            opt.zero_grad()
            loss = lf(model(Xtr[idx].to(dtype)).float(), ytr[idx])
            loss.backward()
            opt.step(loss.item())
    with torch.no_grad():
        tl = lf(model(Xtr.to(dtype)).float(), ytr).item()
        acc = (model(Xte.to(dtype)).argmax(1) == yte).float().mean().item()
    return tl, acc, model, opt


def roundtrip(obj):
    """torch.save + torch.load(weights_only=True) through memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def all_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def _to_host(args, kwargs) -> bool:
    """Whether Tensor.to(*args, **kwargs) asks for the CPU."""
    dev = kwargs.get("device", args[0] if args else None)
    if isinstance(dev, torch.Tensor):
        dev = dev.device
    return isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cpu"


class Transfers:
    """Counts every way a tensor's value can reach the host while active (item, tolist, numpy,
    cpu, to("cpu"), float, int, bool, index, complex), as a GPU would see them:
    reading the host copy that ``.cpu()`` just made is part of the same transfer (on the
    CPU, where this runs, ``.cpu()`` returns the tensor itself)."""

    NAMES = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__",
             "__complex__", "to")  # (np.asarray(t) goes through t.numpy())

    def __init__(self, monkeypatch):
        self.count = 0
        self.active = False
        self._copied = None  # the result of the last counted .cpu()
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                out = _orig(t, *a, **k)
                if _name == "to" and not _to_host(a, k):
                    return out
                if self.active:
                    if self._copied is not t:
                        self.count += 1
                    self._copied = out if _name in ("cpu", "to") else None
                return out

            monkeypatch.setattr(torch.Tensor, name, counted)
