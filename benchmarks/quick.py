"""Quick comparison of ElraOptimizer with torch.optim.Adam and SGD (about 20 s on 2 CPU cores).

Two problems, each with its own set of optimizers:

* ``rosenbrock``: ``(1 - x)^2 + 100 (y - x^2)^2`` from (0.3, 0.8), full-batch, float32. Reports
  the iterations (calls of ``step``, ELRA's retraces included) until the loss is first below
  1e-4, within a budget of 3000, and the loss at the end of the budget.
* ``digits``: a 64-128-10 MLP on scikit-learn's 8x8 digits (1400 train / 397 test, batch 32,
  20 epochs, seeds 0, 1, 2). Reports the mean over the seeds of the final full-batch training loss,
  the test accuracy and the wall time of the training loop (per run).

Prints one markdown table per problem and writes them (``results.md``), the raw curves
(``results.json``) and a plot (``quick.png``) to ``--out``.

    PYTHONPATH=. python benchmarks/quick.py
    PYTHONPATH=. python benchmarks/quick.py --problems rosenbrock --budget 500

To grow this into a fuller convergence benchmark, add an entry to ``OPTIMIZERS`` (a factory
``params -> optimizer``) and a ``Problem`` to ``PROBLEMS`` (a run function, its optimizers, its
seeds, a table and a plot panel).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from elra import ElraOptimizer  # noqa: E402

# --- optimizers ---------------------------------------------------------------------------------
# name -> factory(params) -> optimizer. ELRA needs the loss in step(); see take_step().
OPTIMIZERS: dict[str, Callable[[Iterable], torch.optim.Optimizer]] = {
    "ELRA det lr=1e-6": lambda ps: ElraOptimizer(ps, lr=1e-6, regime="deterministic"),
    "ELRA stoch lr=1e-4 warmup=10": lambda ps: ElraOptimizer(ps, lr=1e-4, warmup=10, classes=10,
                                                             regime="stochastic"),
    "Adam lr=1e-3": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "Adam lr=1e-2": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "SGD lr=1e-3": lambda ps: torch.optim.SGD(ps, lr=1e-3),
    "SGD lr=1e-2": lambda ps: torch.optim.SGD(ps, lr=1e-2),
    "SGD lr=0.1 momentum=0.9": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
}


def take_step(opt: torch.optim.Optimizer, loss: float) -> None:
    """One optimizer step after backward(); ELRA gets the loss value it needs."""
    if isinstance(opt, ElraOptimizer):
        opt.step(loss)
    else:
        opt.step()


@dataclass
class Run:
    """The outcome of one (problem, optimizer, seed) run."""

    problem: str
    optimizer: str
    seed: int
    curve: list[float]  # loss per iteration (rosenbrock) or per epoch (digits)
    metrics: dict[str, float] = field(default_factory=dict)


# --- problem: Rosenbrock --------------------------------------------------------------------------
def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


def run_rosenbrock(opt_name: str, seed: int, args: argparse.Namespace) -> Run:
    """Minimize Rosenbrock from (0.3, 0.8); the curve is the loss before every step (and at the end)."""
    xy = torch.nn.Parameter(torch.tensor([0.3, 0.8]))
    opt = OPTIMIZERS[opt_name]([xy])
    curve, hit, retraces = [], None, 0
    start = time.perf_counter()
    for it in range(args.budget):
        opt.zero_grad()
        loss = rosenbrock(xy)
        f = loss.item()
        curve.append(f)
        if hit is None and f < args.target:
            hit = it
        if not math.isfinite(f):  # diverged: nothing more to learn
            break
        loss.backward()
        take_step(opt, f)
        retraces += getattr(opt, "last_outcome", "").startswith("retrace")
    else:
        with torch.no_grad():
            curve.append(rosenbrock(xy).item())
        if hit is None and curve[-1] < args.target:
            hit = args.budget
    elapsed = time.perf_counter() - start
    return Run("rosenbrock", opt_name, seed, curve,
               {"iterations": hit if hit is not None else math.nan, "final_loss": curve[-1],
                "min_loss": min(curve), "time": elapsed,
                "retraces": retraces if isinstance(opt, ElraOptimizer) else math.nan})


def table_rosenbrock(runs: list[Run], args: argparse.Namespace) -> str:
    rows = [f"| optimizer | iterations to loss < {args.target:g} | final loss after {args.budget} "
            "| lowest loss | ELRA retraces | time s |", "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        m = r.metrics
        it = f"{m['iterations']:.0f}" if not math.isnan(m["iterations"]) else f"> {args.budget}"
        final = f"{m['final_loss']:.3g}" if math.isfinite(m["final_loss"]) else \
            f"diverged ({m['final_loss']:g} at iteration {len(r.curve) - 1})"
        retr = "-" if math.isnan(m["retraces"]) else f"{m['retraces']:.0f}"
        rows.append(f"| {r.optimizer} | {it} | {final} | {m['min_loss']:.3g} | {retr} "
                    f"| {m['time']:.2f} |")
    rows.append("\nfinal: the loss after the whole budget; lowest: the best loss seen on the way "
                "(ELRA's path is not monotone: it keeps taking large steps after reaching the "
                "target). Iterations count every call of step, ELRA's retraces included.")
    return "\n".join(rows)


def plot_rosenbrock(ax, runs: list[Run], args: argparse.Namespace) -> None:
    """Loss per iteration on log-log axes; diverged runs leave the plot at the top."""
    for k, r in enumerate(runs):
        ys = [v for v in r.curve if math.isfinite(v)]
        diverged = len(ys) < len(r.curve)
        elra = r.optimizer.startswith("ELRA")
        line, = ax.plot(range(1, len(ys) + 1), ys, lw=0.7 if elra else 1.6, alpha=0.8 if elra else 1,
                        zorder=1 if elra else 2 + k,
                        label=r.optimizer + (" (diverged)" if diverged else ""))
        if diverged:
            continue
        best = [min(ys[:i + 1]) for i in range(len(ys))]
        if best[-1] < ys[-1] / 10:  # a non-monotone run: also show its best loss so far
            ax.plot(range(1, len(best) + 1), best, ls="--", lw=1.4, color=line.get_color(),
                    zorder=20, label=f"{r.optimizer}: best so far")
    ax.axhline(args.target, color="gray", ls=":", lw=1.2, label=f"target {args.target:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    top = max(max(r.curve[0] for r in runs) * 1e3, args.target * 10)
    ax.set_ylim(top=top)
    ax.set_xlabel("iteration (loss evaluations = calls of step, log scale)")
    ax.set_ylabel("loss (log scale)")
    ax.set_title("Rosenbrock from (0.3, 0.8), full batch, float32")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")


# --- problem: digits MLP ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def run_digits(opt_name: str, seed: int, args: argparse.Namespace) -> Run:
    """Train the MLP; the curve is the full training-set loss after every epoch (epoch 0: start)."""
    X, y = digits_data()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    Xtr, ytr, Xte, yte = X[perm[:1400]], y[perm[:1400]], X[perm[1400:]], y[perm[1400:]]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = OPTIMIZERS[opt_name](model.parameters())
    lf = torch.nn.CrossEntropyLoss()

    def train_loss() -> float:
        with torch.no_grad():
            return lf(model(Xtr), ytr).item()

    curve, elapsed = [train_loss()], 0.0
    for _ in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), args.batch):
            idx = order[i:i + args.batch]
            opt.zero_grad()
            loss = lf(model(Xtr[idx]), ytr[idx])
            loss.backward()
            take_step(opt, loss.item())
        elapsed += time.perf_counter() - start
        curve.append(train_loss())
    with torch.no_grad():
        acc = (model(Xte).argmax(1) == yte).float().mean().item()
    return Run("digits", opt_name, seed, curve,
               {"train_loss": curve[-1], "test_acc": acc, "time": elapsed})


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def _by_optimizer(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        out.setdefault(r.optimizer, []).append(r)
    return out


def table_digits(runs: list[Run], args: argparse.Namespace) -> str:
    seeds = sorted({r.seed for r in runs})
    rows = ["| optimizer | final train loss | test accuracy | time s per run |",
            "|---|---:|---:|---:|"]
    for name, rs in _by_optimizer(runs).items():
        rows.append(f"| {name} | {_mean_sd([r.metrics['train_loss'] for r in rs])} "
                    f"| {_mean_sd([r.metrics['test_acc'] for r in rs])} "
                    f"| {statistics.fmean(r.metrics['time'] for r in rs):.2f} |")
    rows.append(f"\nmean ± sd over seeds {seeds}; {args.epochs} epochs, batch {args.batch}")
    return "\n".join(rows)


def plot_digits(ax, runs: list[Run], args: argparse.Namespace) -> None:
    for name, rs in _by_optimizer(runs).items():
        epochs = range(len(rs[0].curve))
        cols = list(zip(*(r.curve for r in rs)))
        mean = [statistics.fmean(c) for c in cols]
        line, = ax.plot(epochs, mean, marker=".", label=f"{name} (mean of {len(rs)})")
        ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols],
                        color=line.get_color(), alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("training loss on the full training set (log scale)")
    ax.set_title(f"digits MLP 64-128-10, batch {args.batch} (band: min-max over seeds)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


# --- problems registry ----------------------------------------------------------------------------
@dataclass
class Problem:
    title: str
    run: Callable[[str, int, argparse.Namespace], Run]
    optimizers: list[str]
    seeds: Callable[[argparse.Namespace], list[int]]
    table: Callable[[list[Run], argparse.Namespace], str]
    plot: Callable[..., None]


PROBLEMS: dict[str, Problem] = {
    "rosenbrock": Problem(
        "Rosenbrock from (0.3, 0.8)", run_rosenbrock,
        ["ELRA det lr=1e-6", "Adam lr=1e-3", "Adam lr=1e-2", "SGD lr=1e-3", "SGD lr=1e-2"],
        lambda args: [0],  # deterministic: one run each
        table_rosenbrock, plot_rosenbrock),
    "digits": Problem(
        "digits MLP (sklearn load_digits)", run_digits,
        ["ELRA stoch lr=1e-4 warmup=10", "Adam lr=1e-3", "SGD lr=0.1 momentum=0.9"],
        lambda args: args.seeds,
        table_digits, plot_digits),
}


# --- driver ---------------------------------------------------------------------------------------
def run_all(problems: list[str], args: argparse.Namespace) -> dict[str, list[Run]]:
    jobs = [(p, o, s) for p in problems for o in PROBLEMS[p].optimizers
            for s in PROBLEMS[p].seeds(args)]
    results: dict[str, list[Run]] = {p: [] for p in problems}
    for p, o, s in tqdm(jobs, desc="runs", unit="run"):
        results[p].append(PROBLEMS[p].run(o, s, args))
    return results


def _jsonable(obj):
    """``obj`` with non-finite floats (diverged runs, missing values) as ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_outputs(results: dict[str, list[Run]], report: str, out: str,
                  args: argparse.Namespace) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, n) for n in ("results.md", "results.json", "quick.png")]
    with open(paths[0], "w") as fh:
        fh.write(report)
    with open(paths[1], "w") as fh:
        json.dump({p: [_jsonable(vars(r)) for r in rs] for p, rs in results.items()}, fh)
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, (p, rs) in zip(axes[0], results.items()):
        PROBLEMS[p].plot(ax, rs, args)
    fig.suptitle("ELRA vs Adam vs SGD (benchmarks/quick.py)")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/quick", help="output folder")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--budget", type=int, default=3000, help="Rosenbrock iterations")
    parser.add_argument("--target", type=float, default=1e-4, help="Rosenbrock loss target")
    parser.add_argument("--epochs", type=int, default=20, help="digits epochs")
    parser.add_argument("--batch", type=int, default=32, help="digits batch size")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="digits seeds")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    results = run_all(args.problems, args)
    total = time.perf_counter() - start
    sections = [f"## {PROBLEMS[p].title}\n\n{PROBLEMS[p].table(rs, args)}\n"
                for p, rs in results.items()]
    report = (f"# Quick benchmark: ELRA vs Adam vs SGD\n\n"
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"total {total:.1f} s\n\n" + "\n".join(sections))
    print(report)
    for path in write_outputs(results, report, args.out, args):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
