"""The problems of ``benchmarks/convergence.py``: each builds a training task for a seed.

A task is what the benchmark loop needs and nothing more: the parameters, the loss of training step
``it`` (the graph built, ``backward`` not yet called), and an evaluation of the current point that
returns the problem's metrics. Everything is generated or ships with an installed package, so the
benchmark runs offline. This module imports only torch, numpy and the packages of the problems
(no matplotlib, no elra), so that the reference package's venv can run it as well.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class Task:
    """One training run's problem instance."""

    params: list[torch.Tensor]
    loss: Callable[[int], torch.Tensor]  # loss of training step ``it`` (a fresh graph)
    evaluate: Callable[[], dict[str, float]]  # metrics at the current point, under no_grad
    steps: int  # training steps (calls of ``step``)
    eval_at: Callable[[int], bool]  # evaluate after step ``it`` (1-based count of steps done)?
    model: Optional[torch.nn.Module] = None
    info: dict = field(default_factory=dict)  # facts for the results (sizes, optimum, ...)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    fmt: str  # format of one value
    better: str  # "min" or "max"


@dataclass(frozen=True)
class Problem:
    """A problem of the benchmark: how to build it and how to report it."""

    name: str
    title: str
    regime: str  # "deterministic" (full batch) or "stochastic" (mini-batches / noise)
    build: Callable[[int, bool], Task]  # (seed, quick) -> task
    seeds: tuple[int, ...]
    quick_seeds: tuple[int, ...]
    curve: str  # key of the evaluated metric drawn in the plots
    curve_label: str
    log_y: bool
    metrics: tuple[Metric, ...]  # table columns; the first is the headline metric
    # ELRA's arguments: batch_size, classes, lr, warmup (the reference's positional API); 8 is
    # the constructor's default batch_size (the deterministic problems and the digits anchor)
    elra: dict
    # learning rates of Adam and SGD (momentum 0.9): constant ("Adam", "SGD"), and the peaks of a
    # linear warm-up over 5% of the steps then cosine decay to zero ("Adam cosine", "SGD cosine"):
    # the constant-lr winner and its neighbours x1/3 and x3; Adam cosine on digits and MNIST-1D one
    # step higher (x1, x3, x10), because x1/3..x3 put the winner at its top (x10 won on both; the
    # measurements are in benchmarks/results/elra_adam_research.md)
    sweeps: dict[str, tuple[float, ...]]
    # (metric, value): the "iterations" metric counts the steps until the metric is first below it
    target: Optional[tuple[str, float]] = None
    seed_label: Callable[[int], str] = str
    per_seed_table: bool = False  # one headline column per seed (starts of Rosenbrock)
    plot_floor: float = 0.0  # smaller curve values (exact zeros) are drawn at this value


# --- Rosenbrock --------------------------------------------------------------------------------
ROSENBROCK_STARTS = ((0.3, 0.8), (-1.2, 1.0), (2.0, 2.0), (-0.5, 2.5))


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


def build_rosenbrock(seed: int, quick: bool) -> Task:
    """The "seed" picks the start; float32, full batch; evaluated after every step."""
    xy = torch.nn.Parameter(torch.tensor(ROSENBROCK_STARTS[seed]))

    def evaluate() -> dict[str, float]:
        return {"loss": rosenbrock(xy).item()}

    return Task([xy], lambda it: rosenbrock(xy), evaluate, 3000 if quick else 10000,
                lambda it: True, info={"start": ROSENBROCK_STARTS[seed]})


# --- example 1: cubic fit of sin ---------------------------------------------------------------
def build_polyfit(seed: int, quick: bool) -> Task:
    """Example 1 of the seed (PyTorch's "optim" tutorial): y = a + b x + c x^2 + d x^3 fitted to
    sin on [-pi, pi] by the summed squared error over 2000 points. The curve is the excess loss
    over the least-squares optimum (computed in float64)."""
    x = torch.linspace(-math.pi, math.pi, 2000)
    y = torch.sin(x)
    feats = x.unsqueeze(-1).pow(torch.tensor([1, 2, 3]))
    A = torch.cat([torch.ones(2000, 1), feats], 1).double()
    sol = torch.linalg.lstsq(A, y.double().unsqueeze(1)).solution
    f_opt = float(((A @ sol).squeeze(1) - y.double()).pow(2).sum())
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0, 1))

    def loss(it: int) -> torch.Tensor:
        return F.mse_loss(model(feats), y, reduction="sum")

    def evaluate() -> dict[str, float]:
        f = F.mse_loss(model(feats), y, reduction="sum").item()
        return {"loss": f, "excess": max(f - f_opt, 0.0), "rel_excess": max(f - f_opt, 0.0) / f_opt}

    return Task(list(model.parameters()), loss, evaluate, 500 if quick else 3000, lambda it: True,
                model, {"optimum": f_opt})


# --- noisy quadratic ---------------------------------------------------------------------------
QUAD_DIM = 10_000


def build_quadratic(seed: int, quick: bool) -> Task:
    """f(x) = 1/2 sum_i h_i (x_i - c_i)^2 in 10k dimensions, curvatures h log-spaced over [1e-2, 1].
    Step ``it`` sees the sampled loss 1/2 sum_i h_i (x_i - c_i - e_i)^2 with fresh noise
    e ~ N(0, 1): its gradient is the true one plus noise of the same size as the true gradient at
    the start. The curve is the true excess loss f(x) - f* = f(x), evaluated every 20 steps."""
    g = torch.Generator().manual_seed(1000 + seed)
    h = torch.logspace(-2, 0, QUAD_DIM)
    c = torch.randn(QUAD_DIM, generator=g)
    x = torch.nn.Parameter(torch.zeros(QUAD_DIM))
    noise = torch.Generator().manual_seed(2000 + seed)

    def loss(it: int) -> torch.Tensor:
        e = torch.randn(QUAD_DIM, generator=noise)
        return 0.5 * (h * (x - c - e) ** 2).sum()

    def evaluate() -> dict[str, float]:
        return {"excess": 0.5 * (h * (x.detach() - c) ** 2).sum().item()}

    steps = 500 if quick else 3000
    return Task([x], loss, evaluate, steps, lambda it: it % 20 == 0 or it == steps)


# --- classification helpers --------------------------------------------------------------------
def _classifier_task(model: torch.nn.Module, Xtr, ytr, Xte, yte, batch: int, epochs: int,
                     seed: int) -> Task:
    """Mini-batches of a fresh permutation every epoch; evaluated after every epoch."""
    per_epoch = math.ceil(len(Xtr) / batch)
    g = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []

    def loss(it: int) -> torch.Tensor:
        if it % per_epoch == 0:
            order[:] = [torch.randperm(len(Xtr), generator=g)]
        k = it % per_epoch
        idx = order[0][k * batch:(k + 1) * batch]
        return F.cross_entropy(model(Xtr[idx]), ytr[idx])

    def evaluate() -> dict[str, float]:
        was = model.training
        model.eval()
        out_tr, out_te = model(Xtr), model(Xte)
        model.train(was)
        return {"train_loss": F.cross_entropy(out_tr, ytr).item(),
                "test_loss": F.cross_entropy(out_te, yte).item(),
                "test_acc": (out_te.argmax(1) == yte).float().mean().item()}

    return Task(list(model.parameters()), loss, evaluate, epochs * per_epoch,
                lambda it: it % per_epoch == 0, model,
                {"train": len(Xtr), "test": len(Xte), "steps_per_epoch": per_epoch,
                 "params": sum(p.numel() for p in model.parameters())})


# --- digits MLP --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def build_digits(seed: int, quick: bool) -> Task:
    """scikit-learn's 8x8 digits: 1400 train / 397 test (split by seed), MLP 64-128-10, batch 32,
    20 epochs (10 in --quick): the setting of the anchor in ELRA_ALGORITHM.md."""
    X, y = digits_data()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    tr, te = perm[:1400], perm[1400:]
    return _classifier_task(model, X[tr], y[tr], X[te], y[te], 32, 10 if quick else 20, seed)


# --- MNIST-1D CNN ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def mnist1d_data() -> tuple[torch.Tensor, ...]:
    """MNIST-1D generated by the ``mnist1d`` package with its default arguments (seed 42): 4000
    train / 1000 test signals of length 40, 10 classes. Nothing is downloaded."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    f = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return f(d["x"]), torch.tensor(d["y"]), f(d["x_test"]), torch.tensor(d["y_test"])


class ConvNet1D(torch.nn.Module):
    """The convolutional baseline of the MNIST-1D paper (three stride-2 convolutions with ReLU and
    a linear classifier) at 48 channels: 16,618 parameters."""

    def __init__(self, channels: int = 48) -> None:
        super().__init__()
        c = channels
        self.net = torch.nn.Sequential(
            torch.nn.Conv1d(1, c, 5, stride=2, padding=1), torch.nn.ReLU(),   # 40 -> 19
            torch.nn.Conv1d(c, c, 3, stride=2, padding=1), torch.nn.ReLU(),   # 19 -> 10
            torch.nn.Conv1d(c, c, 3, stride=2, padding=1), torch.nn.ReLU(),   # 10 -> 5
            torch.nn.Flatten(), torch.nn.Linear(5 * c, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_mnist1d(seed: int, quick: bool) -> Task:
    """MNIST-1D, the CNN above, batch 64, 30 epochs (8 in --quick)."""
    Xtr, ytr, Xte, yte = mnist1d_data()
    torch.manual_seed(seed)
    return _classifier_task(ConvNet1D(), Xtr, ytr, Xte, yte, 64, 8 if quick else 30, seed)


# --- byte-level language model -----------------------------------------------------------------
LM_MODULES = ("argparse.py", "textwrap.py", "difflib.py", "shlex.py", "string.py", "csv.py",
              "fractions.py", "heapq.py", "bisect.py", "calendar.py")
LM_CONTEXT, LM_BATCH, LM_VALID_BATCHES, LM_BLOCK = 64, 32, 16, 2048


@functools.lru_cache(maxsize=1)
def lm_text() -> tuple[torch.Tensor, str]:
    """The bytes of a few modules of this Python's standard library (about 350 kB), and their
    SHA-256 (the text differs slightly between Python releases)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    data = b"".join(open(os.path.join(stdlib, m), "rb").read() for m in LM_MODULES)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), \
        hashlib.sha256(data).hexdigest()[:16]


class Block(torch.nn.Module):
    """A pre-norm transformer block with causal self-attention."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, ff), torch.nn.GELU(), torch.nn.Linear(ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.ff(self.ln2(x))


class ByteLM(torch.nn.Module):
    """Next-byte transformer: 256-symbol embedding of width 64, learned positions, 3 blocks
    (4 heads, feed-forward 256), untied output layer: 187,200 parameters."""

    def __init__(self, d: int = 64, layers: int = 3, heads: int = 4, ff: int = 256) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Parameter(torch.randn(LM_CONTEXT, d) * 0.02)
        self.blocks = torch.nn.Sequential(*(Block(d, heads, ff) for _ in range(layers)))
        self.ln = torch.nn.LayerNorm(d)
        self.out = torch.nn.Linear(d, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.blocks(self.emb(idx) + self.pos[:idx.shape[1]])))


def build_bytelm(seed: int, quick: bool) -> Task:
    """Batch 32 x 64 bytes at random offsets, 1500 steps (150 in --quick). The text is cut into
    blocks of 2 kB; every tenth block is validation text, so that training and validation text
    come from the same modules. The curve is the validation loss (nats per byte) on 16 fixed
    batches, every 100 steps (50 in --quick)."""
    data, digest = lm_text()
    blocks = data[:len(data) // LM_BLOCK * LM_BLOCK].view(-1, LM_BLOCK)
    is_valid = torch.arange(len(blocks)) % 10 == 9
    train, valid = blocks[~is_valid].flatten(), blocks[is_valid].flatten()
    vg = torch.Generator().manual_seed(12345)  # the same validation batches for every run
    vstarts = torch.randint(0, len(valid) - LM_CONTEXT - 1, (LM_VALID_BATCHES, LM_BATCH),
                            generator=vg)
    torch.manual_seed(seed)
    model = ByteLM()
    g = torch.Generator().manual_seed(seed)
    offs = torch.arange(LM_CONTEXT + 1)

    def windows(src: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = src[starts.unsqueeze(1) + offs]
        return w[:, :-1], w[:, 1:]

    def loss(it: int) -> torch.Tensor:
        xb, yb = windows(train, torch.randint(0, len(train) - LM_CONTEXT - 1, (LM_BATCH,),
                                              generator=g))
        return F.cross_entropy(model(xb).flatten(0, 1), yb.flatten())

    def evaluate() -> dict[str, float]:
        total = 0.0
        for s in vstarts:
            xb, yb = windows(valid, s)
            total += F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).item()
        return {"valid_loss": total / len(vstarts)}

    steps, every = (150, 50) if quick else (1500, 100)
    return Task(list(model.parameters()), loss, evaluate, steps,
                lambda it: it % every == 0 or it == steps, model,
                {"text_bytes": len(data), "text_sha256": digest,
                 "params": sum(p.numel() for p in model.parameters())})


# --- registry ----------------------------------------------------------------------------------
PROBLEMS: dict[str, Problem] = {p.name: p for p in (
    Problem("rosenbrock", "Rosenbrock, four starts (deterministic, float32)", "deterministic",
            build_rosenbrock, (0, 1, 2, 3), (0,), "loss", "lowest loss so far (log scale)", True,
            (Metric("iterations", "iterations to loss < 1e-4", "{:.0f}", "min"),
             Metric("loss", "final loss", "{:.3g}", "min")),
            {"batch_size": 8, "classes": 1, "lr": 1e-6, "warmup": 1},
            {"Adam": (1e-3, 1e-2, 1e-1), "SGD": (1e-4, 3e-4, 1e-3),
             "Adam cosine": (3e-2, 1e-1, 3e-1), "SGD cosine": (3e-4, 1e-3, 3e-3)},
            target=("loss", 1e-4),
            seed_label=lambda s: "({:g}, {:g})".format(*ROSENBROCK_STARTS[s]), per_seed_table=True,
            plot_floor=1e-15),
    Problem("polyfit", "Cubic fit of sin(x), 2000 points (example 1, deterministic)",
            "deterministic", build_polyfit, (0, 1, 2), (0,), "excess",
            "lowest loss so far - least-squares optimum (log)", True,
            (Metric("iterations", "iterations to within 1% of the optimum", "{:.0f}", "min"),
             Metric("rel_excess", "final (loss - optimum) / optimum", "{:.2e}", "min")),
            {"batch_size": 8, "classes": 1, "lr": 1e-6, "warmup": 1},
            {"Adam": (1e-3, 1e-2, 1e-1), "SGD": (1e-6, 3e-6, 1e-5),
             "Adam cosine": (3e-2, 1e-1, 3e-1), "SGD cosine": (1e-6, 3e-6, 1e-5)},
            target=("rel_excess", 0.01),
            plot_floor=1e-6),  # float32 resolution of the loss (about 8.8)
    Problem("quadratic", "Noisy quadratic, 10k dimensions (stochastic)", "stochastic",
            build_quadratic, (0, 1, 2), (0,), "excess", "true loss f(x) - f* (log scale)", True,
            (Metric("excess", "final f(x) - f*", "{:.3g}", "min"),),
            {"batch_size": 1, "classes": 2, "lr": 1e-4, "warmup": 10},
            {"Adam": (1e-3, 1e-2, 1e-1), "SGD": (0.01, 0.03, 0.1),
             "Adam cosine": (3e-3, 1e-2, 3e-2), "SGD cosine": (3e-3, 0.01, 0.03)}),
    Problem("digits", "digits MLP 64-128-10 (scikit-learn), batch 32", "stochastic",
            build_digits, (0, 1, 2), (0,), "train_loss", "training loss, full train set (log)",
            True,
            (Metric("test_acc", "test accuracy", "{:.4f}", "max"),
             Metric("train_loss", "final train loss", "{:.4f}", "min")),
            {"batch_size": 8, "classes": 10, "lr": 1e-4, "warmup": 10},
            {"Adam": (3e-4, 1e-3, 3e-3), "SGD": (0.01, 0.03, 0.1),
             "Adam cosine": (3e-3, 1e-2, 3e-2), "SGD cosine": (0.03, 0.1, 0.3)}),
    Problem("mnist1d", "MNIST-1D, 1D CNN of 16.6k parameters, batch 64", "stochastic",
            build_mnist1d, tuple(range(8)), (0,), "test_loss", "test loss (log scale)", True,
            (Metric("test_acc", "test accuracy", "{:.4f}", "max"),
             Metric("train_loss", "final train loss", "{:.4f}", "min")),
            {"batch_size": 64, "classes": 10, "lr": 1e-4, "warmup": 10},
            {"Adam": (3e-4, 1e-3, 3e-3), "SGD": (0.01, 0.03, 0.1),
             "Adam cosine": (3e-3, 1e-2, 3e-2), "SGD cosine": (0.01, 0.03, 0.1)}),
    Problem("bytelm", "Byte-level transformer LM (187k parameters), batch 32 x 64",
            "stochastic", build_bytelm, (0, 1, 2), (0,), "valid_loss",
            "validation loss (nats per byte)", False,
            (Metric("valid_loss", "validation loss (nats/byte)", "{:.3f}", "min"),),
            {"batch_size": 32, "classes": 256, "lr": 1e-4, "warmup": 10},
            {"Adam": (1e-3, 3e-3, 1e-2), "SGD": (0.03, 0.1, 0.3),
             "Adam cosine": (3e-3, 1e-2, 3e-2), "SGD cosine": (0.1, 0.3, 1.0)}),
)}
