"""Held-out tasks for ElraAdam, and a small runner for them and for the benchmark's own problems.

ElraAdam's default configuration was chosen on the six problems of ``convergence.py``. The tasks
here were never used to choose anything; they check that the rule does not fall apart on a
different text, architecture, width or batch size. All offline and deterministic (fixed seeds):

* ``lm_other``: the byte-level transformer of ``bytelm`` on other standard-library modules
  (inspect, typing, dataclasses, enum, functools), 600 steps instead of 1500.
* ``lm_half``: ``bytelm`` at half width (d=32, feed-forward 128; 52k parameters), 1500 steps.
* ``gru_mnist1d``: MNIST-1D read as a sequence of 40 scalars by a GRU (hidden 64), batch 64,
  15 epochs.
* ``mlp_reg``: regression of a random smooth teacher (sum of 16 random sine ridges in 8
  dimensions, noise sd 0.1) by an MLP 8-128-128-1, batch 64, 2000 steps; test MSE.
* ``digits_cnn``: scikit-learn's 8x8 digits with a 2D CNN (two 3x3 convolutions of width 24,
  max-pool, linear), batch 32, 20 epochs (a different model than ``digits``' MLP).
* ``mnist1d_b256`` / ``mnist1d_b16``: ``mnist1d`` with batch 256 (x4) and 16 (x1/4), same
  30 epochs (so 4x fewer / 4x more steps).

The runner reuses ``convergence.run_job`` (the same loop, optimizers and cosine schedule), so a
number from here on a benchmark problem is the benchmark's own::

    python benchmarks/heldout_tasks.py --tasks heldout --optimizers ElraAdam Adam "Adam cosine" \\
        --seeds 0 1 --out /tmp/heldout.jsonl
    python benchmarks/heldout_tasks.py --tasks mnist1d --optimizers ElraAdam --seeds 0 1 2 \\
        --variant '{"one_pass": true}' --tag one-pass --out /tmp/research.jsonl
    python benchmarks/heldout_tasks.py --summary /tmp/research.jsonl   # tables of a JSONL file

``--variant`` passes keyword arguments to ElraAdam in every run (research only; the benchmark runs
its defaults). Every finished run is appended to ``--out`` as one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import convergence as cv  # noqa: E402
import convergence_problems as cp  # noqa: E402
from convergence_problems import Metric, Problem, Task  # noqa: E402

ADAM_GRID = (1e-3, 3e-3, 1e-2)  # constant lr and cosine peak, the same on every held-out task
SGD_GRID = (0.01, 0.03, 0.1)
SWEEPS = {"Adam": ADAM_GRID, "Adam cosine": ADAM_GRID, "SGD": SGD_GRID, "SGD cosine": SGD_GRID}
ACC = (Metric("test_acc", "test accuracy", "{:.4f}", "max"),
       Metric("train_loss", "final train loss", "{:.4f}", "min"))


# --- language models -------------------------------------------------------------------------------
OTHER_MODULES = ("inspect.py", "typing.py", "dataclasses.py", "enum.py", "functools.py")


@functools.lru_cache(maxsize=2)
def _text(modules: tuple[str, ...]) -> torch.Tensor:
    stdlib = sysconfig.get_paths()["stdlib"]
    data = b"".join(open(os.path.join(stdlib, m), "rb").read() for m in modules)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _lm_task(seed: int, modules: tuple[str, ...], d: int, ff: int, steps: int, every: int) -> Task:
    """As ``convergence_problems.build_bytelm``, with the text, the width and the budget as
    arguments."""
    data = _text(modules)
    blocks = data[:len(data) // cp.LM_BLOCK * cp.LM_BLOCK].view(-1, cp.LM_BLOCK)
    is_valid = torch.arange(len(blocks)) % 10 == 9
    train, valid = blocks[~is_valid].flatten(), blocks[is_valid].flatten()
    vg = torch.Generator().manual_seed(12345)
    vstarts = torch.randint(0, len(valid) - cp.LM_CONTEXT - 1,
                            (cp.LM_VALID_BATCHES, cp.LM_BATCH), generator=vg)
    torch.manual_seed(seed)
    model = cp.ByteLM(d=d, ff=ff)
    g = torch.Generator().manual_seed(seed)
    offs = torch.arange(cp.LM_CONTEXT + 1)

    def windows(src, starts):
        w = src[starts.unsqueeze(1) + offs]
        return w[:, :-1], w[:, 1:]

    def loss(it: int) -> torch.Tensor:
        xb, yb = windows(train, torch.randint(0, len(train) - cp.LM_CONTEXT - 1, (cp.LM_BATCH,),
                                              generator=g))
        return F.cross_entropy(model(xb).flatten(0, 1), yb.flatten())

    def evaluate() -> dict[str, float]:
        total = 0.0
        for s in vstarts:
            xb, yb = windows(valid, s)
            total += F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).item()
        return {"valid_loss": total / len(vstarts)}

    return Task(list(model.parameters()), loss, evaluate, steps,
                lambda it: it % every == 0 or it == steps, model,
                {"text_bytes": len(data), "params": sum(p.numel() for p in model.parameters())})


def build_lm_other(seed: int, quick: bool) -> Task:
    return _lm_task(seed, OTHER_MODULES, 64, 256, 150 if quick else 600, 100)


def build_lm_half(seed: int, quick: bool) -> Task:
    return _lm_task(seed, cp.LM_MODULES, 32, 128, 150 if quick else 1500, 100)


# --- GRU on MNIST-1D ---------------------------------------------------------------------------------
class GRUClassifier(torch.nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(1, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 40)
        _, h = self.gru(x.transpose(1, 2))
        return self.out(h[-1])


def build_gru_mnist1d(seed: int, quick: bool) -> Task:
    Xtr, ytr, Xte, yte = cp.mnist1d_data()
    torch.manual_seed(seed)
    return cp._classifier_task(GRUClassifier(), Xtr, ytr, Xte, yte, 64, 3 if quick else 15, seed)


# --- MLP regression ------------------------------------------------------------------------------
def build_mlp_reg(seed: int, quick: bool) -> Task:
    """y = sum_k a_k sin(w_k . x + b_k) + noise, x ~ N(0, I_8): a fixed teacher (its own seed),
    4000 train / 1000 test points, MLP 8-128-128-1 (ReLU), batch 64, MSE."""
    tg = torch.Generator().manual_seed(777)
    W, b = torch.randn(16, 8, generator=tg) / math.sqrt(8), torch.rand(16, generator=tg) * 6.28
    a = torch.randn(16, generator=tg) / 4
    X = torch.randn(5000, 8, generator=tg)
    y = torch.sin(X @ W.T + b) @ a + 0.1 * torch.randn(5000, generator=tg)
    Xtr, ytr, Xte, yte = X[:4000], y[:4000], X[4000:], y[4000:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 1), torch.nn.Flatten(0))
    g = torch.Generator().manual_seed(seed)
    steps = 300 if quick else 2000

    def loss(it: int) -> torch.Tensor:
        idx = torch.randint(0, 4000, (64,), generator=g)
        return F.mse_loss(model(Xtr[idx]), ytr[idx])

    def evaluate() -> dict[str, float]:
        return {"train_mse": F.mse_loss(model(Xtr), ytr).item(),
                "test_mse": F.mse_loss(model(Xte), yte).item()}

    return Task(list(model.parameters()), loss, evaluate, steps,
                lambda it: it % 200 == 0 or it == steps, model,
                {"params": sum(p.numel() for p in model.parameters()),
                 "target_var": float(yte.var())})


# --- CNN on digits ----------------------------------------------------------------------------------
def build_digits_cnn(seed: int, quick: bool) -> Task:
    X, y = cp.digits_data()
    X = X.view(-1, 1, 8, 8)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    torch.manual_seed(seed)
    c = 24
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(c * 16, 10))
    tr, te = perm[:1400], perm[1400:]
    return cp._classifier_task(model, X[tr], y[tr], X[te], y[te], 32, 10 if quick else 20, seed)


# --- MNIST-1D, other batch sizes -------------------------------------------------------------------
def _mnist1d_batch(batch: int):
    def build(seed: int, quick: bool) -> Task:
        Xtr, ytr, Xte, yte = cp.mnist1d_data()
        torch.manual_seed(seed)
        return cp._classifier_task(cp.ConvNet1D(), Xtr, ytr, Xte, yte, batch, 8 if quick else 30,
                                   seed)
    return build


# --- registry ---------------------------------------------------------------------------------------
def _p(name, title, build, curve, label, log_y, metrics, elra) -> Problem:
    return Problem(name, title, "stochastic", build, (0, 1, 2), (0,), curve, label, log_y, metrics,
                   elra, SWEEPS)


LM_METRIC = (Metric("valid_loss", "validation loss (nats/byte)", "{:.3f}", "min"),)
HELDOUT: dict[str, Problem] = {p.name: p for p in (
    _p("lm_other", "held-out: byte LM on other stdlib text, 600 steps", build_lm_other,
       "valid_loss", "validation loss", False, LM_METRIC,
       {"batch_size": 32, "classes": 256, "lr": 1e-4, "warmup": 10}),
    _p("lm_half", "held-out: byte LM at half width (52k parameters)", build_lm_half, "valid_loss",
       "validation loss", False, LM_METRIC,
       {"batch_size": 32, "classes": 256, "lr": 1e-4, "warmup": 10}),
    _p("gru_mnist1d", "held-out: MNIST-1D with a GRU (hidden 64), batch 64", build_gru_mnist1d,
       "test_loss", "test loss", True, ACC,
       {"batch_size": 64, "classes": 10, "lr": 1e-4, "warmup": 10}),
    _p("mlp_reg", "held-out: MLP 8-128-128-1 regression, batch 64", build_mlp_reg, "test_mse",
       "test MSE", True, (Metric("test_mse", "test MSE", "{:.4f}", "min"),),
       {"batch_size": 64, "classes": 2, "lr": 1e-4, "warmup": 10}),
    _p("digits_cnn", "held-out: digits with a 2D CNN (width 24), batch 32", build_digits_cnn,
       "train_loss", "training loss", True, ACC,
       {"batch_size": 32, "classes": 10, "lr": 1e-4, "warmup": 10}),
    _p("mnist1d_b256", "held-out: MNIST-1D CNN, batch 256 (x4)", _mnist1d_batch(256), "test_loss",
       "test loss", True, ACC, {"batch_size": 256, "classes": 10, "lr": 1e-4, "warmup": 10}),
    _p("mnist1d_b16", "held-out: MNIST-1D CNN, batch 16 (x1/4)", _mnist1d_batch(16), "test_loss",
       "test loss", True, ACC, {"batch_size": 16, "classes": 10, "lr": 1e-4, "warmup": 10}),
)}
cp.PROBLEMS.update({k: v for k, v in HELDOUT.items() if k not in cp.PROBLEMS})


# --- runner ---------------------------------------------------------------------------------------
def specs_for(problem: Problem, families: list[str]) -> list[cv.OptSpec]:
    out = []
    for fam in families:
        if fam in cv.SWEPT:
            out += [cv.OptSpec(f"{fam} lr={lr:g}", fam, lr) for lr in problem.sweeps[fam]]
        elif "lr=" in fam:  # one setting, e.g. "Adam cosine lr=0.01"
            f, lr = fam.rsplit(" lr=", 1)
            out.append(cv.OptSpec(fam, f, float(lr)))
        else:
            out.append(cv.OptSpec(fam, fam))
    return out


def summary(path: str) -> str:
    """Markdown tables of a JSONL file of runs: per task, per (tag, optimizer), the headline
    metric over seeds (all values listed), best of each sweep family marked."""
    runs = [json.loads(line) for line in open(path) if line.strip()]
    lines = []
    for task in dict.fromkeys(r["problem"] for r in runs):
        problem = cp.PROBLEMS[task]
        m = problem.metrics[0]
        rs = [r for r in runs if r["problem"] == task]
        lines += [f"\n### {task}: {m.label}\n", "| tag | optimizer | mean ± sd | seeds: values | "
                  "retraces | peak lr (ElraAdam) |", "|---|---|---:|---|---:|---:|"]
        groups: dict = {}
        for r in rs:
            groups.setdefault((r.get("tag", ""), r["optimizer"]), []).append(r)
        for (tag, name), g in groups.items():
            g.sort(key=lambda r: r["seed"])
            vals = [r["metrics"].get(m.key) for r in g]
            vals = [math.nan if v is None else v for v in vals]
            ok = [v for v in vals if math.isfinite(v)]
            mean = statistics.fmean(ok) if ok else math.nan
            sd = statistics.stdev(ok) if len(ok) > 1 else 0.0
            per = ", ".join(f"{r['seed']}: {m.fmt.format(v)}" for r, v in zip(g, vals))
            retr = "-" if any(r["retraces"] is None for r in g) else \
                "/".join(str(r["retraces"]) for r in g)
            peaks = [max((e.get("lr") or 0) for e in r["evals"]) for r in g]
            peak = f"{statistics.fmean(peaks):.3g}" if any(peaks) else "-"
            lines.append(f"| {tag} | {name} | {m.fmt.format(mean)} ± {m.fmt.format(sd)} | {per} "
                         f"| {retr} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["heldout"],
                    help="held-out tasks or benchmark problems; 'heldout' = all held-out tasks")
    ap.add_argument("--optimizers", nargs="+", default=["ElraAdam", "Adam", "Adam cosine"],
                    help="families (a swept family runs its three lrs) or 'FAMILY lr=X'")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant", default="{}", help="JSON keyword arguments of ElraAdam")
    ap.add_argument("--tag", default="", help="label of this variant in the JSONL file")
    ap.add_argument("--out", default="benchmarks/out/heldout.jsonl")
    ap.add_argument("--quick", action="store_true", help="short budgets (smoke test)")
    ap.add_argument("--summary", default=None, metavar="JSONL", help="print tables, run nothing")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(1)
    cv.ELRA_ADAM_OPTIONS.update(json.loads(args.variant))
    tasks = [t for name in args.tasks for t in (HELDOUT if name == "heldout" else [name])]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for task in tasks:
        problem = cp.PROBLEMS[task]
        for spec in specs_for(problem, args.optimizers):
            for seed in args.seeds:
                t0 = time.perf_counter()
                rec = cv._jsonable(cv.run_job(task, spec, seed, args.quick))
                rec["tag"], rec["variant"] = args.tag, json.loads(args.variant)
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                m = problem.metrics[0]
                v = rec["metrics"].get(m.key)
                print(f"{task} {args.tag} {spec.name} seed {seed}: {m.key} = {v} "
                      f"(retraces {rec['retraces']}, {time.perf_counter() - t0:.0f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
