"""Convergence benchmark: ELRA against Adam, SGD and the self-tuning optimizers, on six problems.

Every (problem, optimizer, seed) run has a fixed budget and fixed seeds; the results are a
markdown table per problem, a headline table, one PNG figure per problem (the evaluated loss
against steps and against training wall time) and the raw curves as JSON, all in ``--out``.

* Problems (``convergence_problems.py``, all offline): Rosenbrock from four starts and the cubic fit
  of sin of example 1 (deterministic, full batch); a noisy quadratic in 10k dimensions, scikit-learn
  digits with an MLP, MNIST-1D with a small CNN and a byte-level transformer language model
  (stochastic).
* Optimizers: ELRA (this package, the regime each problem calls for, lr=1e-6 deterministic and
  lr=1e-4 with warmup=10 stochastic, as the package's usage hints say); ElraAdam (``elra.ElraAdam``
  once the package has it, else the research prototype ``benchmarks/elra_adam_proto.py``; its
  defaults, one configuration on every problem, no learning rate); Adam and SGD with momentum
  0.9, each at three learning rates per problem, with a constant learning rate and with a linear
  warm-up over the first 5% of the steps then cosine decay to zero ("Adam cosine", "SGD cosine":
  three peak learning rates; all runs are reported; the best of each three is marked); Prodigy, Schedule-Free AdamW and D-Adaptation Adam with their documented defaults; and
  the reference package ``elra`` 0.0.5 when ``--reference-python`` names a Python that has it
  (it imports as ``elra`` as well, so it runs in its own process). An optimizer whose package is
  not installed is skipped with a note.
* Wall time counts the training steps only (zero_grad, forward, backward, step), not evaluations.

    python benchmarks/convergence.py --quick             # about 2 minutes: the README's main job
    python benchmarks/convergence.py --jobs 2 --out benchmarks/results \\
        --reference-python /tmp/refvenv/bin/python       # the full run (about an hour on 2 cores)
    python benchmarks/convergence.py --problems digits mnist1d --seeds 0

``--quick`` shortens every budget, runs one seed and, for Adam and SGD (constant and cosine), only
the learning rate that won the full run's sweep (``QUICK_LR``), so its numbers are not the committed
results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm import tqdm

from convergence_problems import PROBLEMS, Problem

# --- optimizers ----------------------------------------------------------------------------------
# Learning rates of Adam and SGD in --quick: the winners of the full run's sweeps (benchmarks/results;
# the cosine ones: benchmarks/results/elra_adam_research.md)
QUICK_LR = {
    "rosenbrock": {"Adam": 1e-1, "SGD": 1e-3, "Adam cosine": 3e-1, "SGD cosine": 3e-3},
    "polyfit": {"Adam": 1e-1, "SGD": 3e-6, "Adam cosine": 3e-1, "SGD cosine": 3e-6},
    "quadratic": {"Adam": 1e-2, "SGD": 0.01, "Adam cosine": 1e-2, "SGD cosine": 0.01},
    "digits": {"Adam": 3e-3, "SGD": 0.1, "Adam cosine": 3e-2, "SGD cosine": 0.3},
    "mnist1d": {"Adam": 3e-3, "SGD": 0.03, "Adam cosine": 3e-2, "SGD cosine": 0.1},
    "bytelm": {"Adam": 1e-2, "SGD": 0.3, "Adam cosine": 1e-2, "SGD cosine": 0.3},
}

# family -> (python package that provides it, description of the setting)
PEERS = {
    "Prodigy": ("prodigyopt", "prodigyopt.Prodigy, defaults (lr=1.0)"),
    "Schedule-Free AdamW": ("schedulefree", "schedulefree.AdamWScheduleFree, defaults "
                                            "(lr=0.0025, no warm-up)"),
    "D-Adapt Adam": ("dadaptation", "dadaptation.DAdaptAdam, defaults (lr=1.0)"),
}
FAMILY_ORDER = ["ELRA", "ELRA 0.0.5 (reference)", "ElraAdam", "Adam", "Adam cosine", "SGD",
                "SGD cosine", *PEERS]
# families with a learning-rate sweep (``problem.sweeps``); "... cosine": linear warm-up over the
# first WARMUP_FRACTION of the run's steps, then cosine decay to zero, peak lr best of three
SWEPT = ("Adam", "Adam cosine", "SGD", "SGD cosine")
WARMUP_FRACTION = 0.05
# keyword arguments of ElraAdam in every run (empty: its defaults); a research hook of
# heldout_tasks.py --variant, never set per problem
ELRA_ADAM_OPTIONS: dict = {}
REFERENCE = "ELRA 0.0.5 (reference)"


@dataclass(frozen=True)
class OptSpec:
    name: str  # unique within a problem
    family: str
    lr: Optional[float] = None


def optimizer_specs(problem: Problem, quick: bool, reference: bool) -> tuple[list[OptSpec], list[str]]:
    """The optimizers run on ``problem``, and notes on those skipped."""
    specs = [OptSpec("ELRA", "ELRA")]
    notes = []
    if reference:
        specs.append(OptSpec(REFERENCE, REFERENCE))
    specs.append(OptSpec("ElraAdam", "ElraAdam"))
    for fam in SWEPT:
        lrs = (QUICK_LR[problem.name][fam],) if quick else problem.sweeps[fam]
        specs += [OptSpec(f"{fam} lr={lr:g}", fam, lr) for lr in lrs]
    for fam, (module, _) in PEERS.items():
        if importlib.util.find_spec(module) is None:
            notes.append(f"{fam} skipped: package `{module}` is not installed")
        else:
            specs.append(OptSpec(fam, fam))
    return specs, notes


def build_optimizer(spec: OptSpec, params: list, problem: Problem) -> torch.optim.Optimizer:
    if spec.family in ("ELRA", REFERENCE):
        import elra  # ours, or the reference in its own venv (see run_reference)

        e = problem.elra  # the reference's positional API: params, model, batch_size, classes
        return elra.ElraOptimizer(params, None, e["batch_size"], e["classes"], lr=e["lr"],
                                  warmup=e["warmup"])
    if spec.family == "ElraAdam":
        return elra_adam_class()(params, **ELRA_ADAM_OPTIONS)
    if spec.family in ("Adam", "Adam cosine"):
        return torch.optim.Adam(params, lr=spec.lr)
    if spec.family in ("SGD", "SGD cosine"):
        return torch.optim.SGD(params, lr=spec.lr, momentum=0.9)
    if spec.family == "Prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params)
    if spec.family == "Schedule-Free AdamW":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params)
    if spec.family == "D-Adapt Adam":
        import dadaptation

        return dadaptation.DAdaptAdam(params)
    raise ValueError(f"unknown optimizer family {spec.family!r}")


def elra_adam_class() -> type:
    """``elra.ElraAdam`` once the package has it, else the research prototype beside this file."""
    import elra

    if hasattr(elra, "ElraAdam"):
        return elra.ElraAdam
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from elra_adam_proto import ElraAdamProto

    return ElraAdamProto


def cosine_lr(peak: float, it: int, steps: int) -> float:
    """Learning rate of step ``it`` (0-based) of ``steps``: linear warm-up to ``peak`` over the first
    WARMUP_FRACTION of the steps, then cosine decay to zero at the end."""
    warm = max(1, round(WARMUP_FRACTION * steps))
    if it < warm:
        return peak * (it + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, steps - warm)))


# --- one run -------------------------------------------------------------------------------------
def _keep(step: int, last: int) -> bool:
    """Which evaluations of an every-step curve are stored: steps 0..20, then ~60 per decade."""
    if step <= 20 or step == last:
        return True
    return math.floor(60 * math.log10(step)) != math.floor(60 * math.log10(step - 1))


def run_job(problem_name: str, spec: OptSpec, seed: int, quick: bool) -> dict:
    """Train one (problem, optimizer, seed); returns a JSON-able record of the run."""
    problem = PROBLEMS[problem_name]
    task = problem.build(seed, quick)
    opt = build_optimizer(spec, task.params, problem)
    elra_like = spec.family in ("ELRA", REFERENCE)
    schedule_free = spec.family == "Schedule-Free AdamW"  # evaluates at its averaged point
    if schedule_free:
        opt.train()

    def evaluate() -> dict[str, float]:
        if schedule_free:
            opt.eval()
        with torch.no_grad():
            m = task.evaluate()
        if schedule_free:
            opt.train()
        return m

    evals = [{"step": 0, "time": 0.0, **evaluate()}]
    train_time, retraces, status = 0.0, 0, "ok"
    hit = None
    cosine = spec.family.endswith(" cosine")
    for it in range(task.steps):
        t0 = time.perf_counter()
        if cosine:
            for grp in opt.param_groups:
                grp["lr"] = cosine_lr(spec.lr, it, task.steps)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(it)
        loss.backward()
        f = loss.item()
        if elra_like or spec.family == "ElraAdam":
            opt.step(f)
        else:
            opt.step()
        train_time += time.perf_counter() - t0
        retraces += str(getattr(opt, "last_outcome", "")).startswith("retrace")
        if task.eval_at(it + 1):
            m = evaluate()
            evals.append({"step": it + 1, "time": train_time, **m})
            if spec.family == "ElraAdam":  # its own step size, for the research log
                evals[-1]["lr"] = opt.param_groups[0]["lr"]
            if problem.target and hit is None and m[problem.target[0]] < problem.target[1]:
                hit = it + 1
            if not math.isfinite(m[problem.curve]):
                status = "diverged"
                break
    last = evals[-1]
    metrics = {k: v for k, v in last.items() if k not in ("step", "time")}
    if problem.target:
        metrics["iterations"] = float(hit) if hit is not None else math.nan
    if len(evals) > 300:  # an every-step curve: keep a log-spaced subset
        evals = [e for e in evals if _keep(e["step"], last["step"])]
    return {"problem": problem_name, "optimizer": spec.name, "family": spec.family, "lr": spec.lr,
            "seed": seed, "status": status, "steps": last["step"], "budget": task.steps,
            "time": train_time,
            # the reference package does not tell its retraces
            "retraces": retraces if hasattr(opt, "last_outcome") else None, "metrics": metrics,
            "evals": evals, "info": task.info}


def run_reference(python: str, problem_name: str, spec: OptSpec, seed: int, quick: bool,
                  threads: int) -> dict:
    """Run one job with the reference package, in its own Python (it imports as ``elra`` too),
    in a scratch folder (it writes ``state_lgs.txt``), with its prints discarded."""
    with tempfile.TemporaryDirectory(prefix="elra-ref-") as tmp:
        out = os.path.join(tmp, "run.json")
        job = json.dumps({"problem": problem_name, "spec": asdict(spec), "seed": seed,
                          "quick": quick, "threads": threads, "out": out})
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([python, os.path.abspath(__file__), "--worker", job], cwd=tmp,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            # the reference stops with an exception on some problems (a gradient that vanishes
            # exactly): a result of its own, reported in the table
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            problem = PROBLEMS[problem_name]
            return {"problem": problem_name, "optimizer": spec.name, "family": spec.family,
                    "lr": spec.lr, "seed": seed, "status": f"crashed: {last[:200]}", "steps": 0,
                    "budget": 0, "time": 0.0, "retraces": None,
                    "metrics": {m.key: None for m in problem.metrics}, "evals": [], "info": {}}
        with open(out) as fh:
            return json.load(fh)


def worker_main(job_json: str) -> None:
    """``--worker``: one run in this process (the reference's venv), result written to a file."""
    job = json.loads(job_json)
    torch.set_num_threads(job["threads"])
    import elra

    if hasattr(elra, "native_status"):
        sys.exit("--worker found this package's elra, not the reference (check the venv)")
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        rec = run_job(job["problem"], OptSpec(**job["spec"]), job["seed"], job["quick"])
    with open(job["out"], "w") as fh:
        json.dump(_jsonable(rec), fh)


def _pool_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_any(job: tuple, quick: bool, reference_python: Optional[str], threads: int) -> dict:
    problem_name, spec, seed = job
    if spec.family == REFERENCE:
        return run_reference(reference_python, problem_name, spec, seed, quick, threads)
    return _jsonable(run_job(problem_name, spec, seed, quick))


# --- aggregation ---------------------------------------------------------------------------------
def _jsonable(obj):
    """``obj`` with non-finite floats as ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _value(rec: dict, key: str) -> float:
    v = rec["metrics"].get(key)
    return math.nan if v is None else float(v)


def _score(recs: list[dict], problem: Problem) -> tuple:
    """Sort key of an optimizer on a problem (smaller is better): the headline metric's mean over
    seeds, a run that never reached the target or diverged counting as the worst."""
    out = []
    for m in problem.metrics:
        vals = [_value(r, m.key) for r in recs]
        if any(math.isnan(v) for v in vals):
            out.append(math.inf)
        else:
            mean = statistics.fmean(vals)
            out.append(mean if m.better == "min" else -mean)
    return tuple(out)


def group(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["optimizer"], []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r["seed"])
    return out


def best_of_sweeps(problem: Problem, runs: list[dict]) -> dict[str, str]:
    """family -> name of its best setting on this problem (one entry per family)."""
    best: dict[str, tuple] = {}
    for name, recs in group(runs).items():
        fam = recs[0]["family"]
        key = _score(recs, problem)
        if fam not in best or key < best[fam][0]:
            best[fam] = (key, name)
    return {fam: name for fam, (_, name) in best.items()}


def _crashed(rec: dict) -> bool:
    return rec["status"].startswith("crashed")


def _cells(metric, recs: list[dict], budget: int) -> str:
    """One table cell of ``metric`` over the runs ``recs`` (a crashed run says so)."""
    if any(_crashed(r) for r in recs):
        return " / ".join("crashed" if _crashed(r) else _fmt(metric, [_value(r, metric.key)], budget)
                          for r in recs)
    return _fmt(metric, [_value(r, metric.key) for r in recs], budget)


def _fmt(metric, values: list[float], budget: int) -> str:
    def one(v: float) -> str:
        if math.isnan(v):
            return f"> {budget}" if metric.key == "iterations" else "diverged"
        return metric.fmt.format(v)

    if len(values) == 1:
        return one(values[0])
    if any(math.isnan(v) for v in values):
        return " / ".join(one(v) for v in values)
    sd = statistics.stdev(values)
    return f"{metric.fmt.format(statistics.fmean(values))} ± {metric.fmt.format(sd)}"


def problem_table(problem: Problem, runs: list[dict], notes: list[str]) -> str:
    groups = group(runs)
    best = set(best_of_sweeps(problem, runs).values())
    seeds = sorted({r["seed"] for r in runs})
    budget = max(r["budget"] for r in runs)
    if problem.per_seed_table:
        m0 = problem.metrics[0]
        head = [f"{m0.label} from {problem.seed_label(s)}" for s in seeds] + \
               [m.label for m in problem.metrics[1:]]
    else:
        head = [m.label for m in problem.metrics]
    rows = ["| optimizer | " + " | ".join(head) + " | ELRA retraces | time s per run |",
            "|---|" + "---:|" * (len(head) + 2)]
    ordered = sorted(groups.items(), key=lambda kv: (FAMILY_ORDER.index(kv[1][0]["family"]),
                                                      kv[1][0]["lr"] or 0))
    for name, recs in ordered:
        cells = []
        metrics = problem.metrics
        if problem.per_seed_table:
            cells += [_cells(metrics[0], [r], budget) for r in recs]
            # the other metrics per start too, joined
            cells += [" / ".join(_cells(m, [r], budget) for r in recs) for m in metrics[1:]]
        else:
            cells += [_cells(m, recs, budget) for m in metrics]
        retr = "-" if any(r["retraces"] is None for r in recs) else \
            f"{statistics.fmean(r['retraces'] for r in recs):.0f}"
        t = statistics.fmean(r["time"] for r in recs)
        label = f"**{name}**" if name in best and recs[0]["family"] in SWEPT else name
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {retr} | {t:.1f} |")
    tail = [f"Seeds {seeds}" + (" (one per start)" if problem.per_seed_table else
                                "; mean ± sd over seeds") + f"; budget {budget} steps.",
            "Adam and SGD (momentum 0.9), constant or with warm-up and cosine decay: the best "
            "(peak) learning rate of each sweep in **bold**."]
    if problem.target:
        tail.append(f"Iterations: steps until {problem.target[0]} < {problem.target[1]:g} "
                    f"(every call of `step` counts, ELRA's retraces included).")
    return "\n".join(rows) + "\n\n" + " ".join(tail) + "".join(f"\n\n{n}" for n in notes)


def headline_table(results: dict[str, list[dict]]) -> str:
    """One row per optimizer family (Adam/SGD at their best learning rate), one column per
    problem's headline metric."""
    cols, cells = [], {}
    for pname, runs in results.items():
        problem = PROBLEMS[pname]
        m = problem.metrics[0]
        cols.append(f"{pname}: {m.label}")
        for fam, name in best_of_sweeps(problem, runs).items():
            recs = group(runs)[name]
            budget = max(r["budget"] for r in runs)
            if problem.per_seed_table:
                txt = " / ".join(_cells(m, [r], budget) for r in recs)
            else:
                txt = _cells(m, recs, budget)
            if fam in SWEPT:
                txt += f" ({'peak ' if fam.endswith('cosine') else ''}lr {recs[0]['lr']:g})"
            cells[(fam, pname)] = txt
    fams = [f for f in FAMILY_ORDER if any(k[0] == f for k in cells)]
    rows = ["| optimizer | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for fam in fams:
        rows.append(f"| {fam} | " + " | ".join(cells.get((fam, p), "-") for p in results) + " |")
    return "\n".join(rows)


# --- plots ---------------------------------------------------------------------------------------
def _style(fam: str, best: bool) -> dict:
    colors = {"ELRA": "C3", REFERENCE: "C1", "ElraAdam": "C6", "Adam": "C0", "Adam cosine": "C9",
              "SGD": "C2", "SGD cosine": "C8", "Prodigy": "C4", "Schedule-Free AdamW": "C5",
              "D-Adapt Adam": "C7"}
    st = {"color": colors.get(fam, "k"), "lw": 2.2 if fam in ("ELRA", "ElraAdam") else 1.5}
    if fam in (REFERENCE, "Adam cosine", "SGD cosine"):
        st.update(ls="--", lw=1.5)
    if fam in SWEPT and not best:
        st.update(lw=0.8, alpha=0.45, ls=":")
    return st


def _curve(recs: list[dict], key: str, x: str, running_min: bool = False, floor: float = 0.0):
    """Mean (and min/max) over seeds of ``key`` at the evaluations all seeds share; with
    ``running_min`` of the lowest value seen so far."""
    n = min(len(r["evals"]) for r in recs)
    xs = [statistics.fmean(r["evals"][i][x] for r in recs) for i in range(n)]
    series = []
    for r in recs:
        vals = [max(e[key], floor) if e[key] is not None else math.nan for e in r["evals"][:n]]
        if running_min:
            best, out = math.inf, []
            for v in vals:
                best = min(best, v) if math.isfinite(v) else best
                out.append(best if math.isfinite(best) else v)
            vals = out
        series.append(vals)
    cols = [list(c) for c in zip(*series)]
    ok = [all(v is not None and math.isfinite(v) for v in c) for c in cols]
    xs = [v for v, k in zip(xs, ok) if k]
    cols = [c for c, k in zip(cols, ok) if k]
    return xs, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _panel(ax, problem: Problem, runs: list[dict], x: str, seeds: Optional[list[int]] = None,
           title: str = "", legend: bool = True) -> None:
    best = set(best_of_sweeps(problem, runs).values())
    highest = 0.0
    for name, recs in sorted(group(runs).items(), key=lambda kv: FAMILY_ORDER.index(kv[1][0]["family"])):
        recs = [r for r in recs if (seeds is None or r["seed"] in seeds) and not _crashed(r)]
        if not recs:
            continue
        fam = recs[0]["family"]
        xs, mean, lo, hi = _curve(recs, problem.curve, x, problem.regime == "deterministic",
                                  problem.plot_floor)
        if x == "step" and problem.regime == "deterministic":
            xs = [v + 1 for v in xs]  # log axis: step 0 drawn at 1
        st = _style(fam, name in best)
        label = name + (" (diverged)" if any(r["status"] == "diverged" for r in recs) else "")
        ax.plot(xs, mean, label=label, **st)
        highest = max([highest, *hi])
        if len(recs) > 1 and (fam not in SWEPT or name in best):
            ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.12, lw=0)
    if problem.log_y:
        ax.set_yscale("log")
        # a diverging run leaves the plot instead of squashing the others
        ax.set_ylim(top=min(highest, 30 * max(r["evals"][0][problem.curve] for r in runs
                                              if r["evals"])) * 1.5)
    if problem.target and problem.target[0] == problem.curve:
        ax.axhline(problem.target[1], color="gray", ls=":", lw=1)
    if problem.regime == "deterministic" and x == "step":
        ax.set_xscale("log")
        ax.set_xlabel("step + 1 (log scale)")
    elif x == "step":
        ax.set_xlabel("step")
    else:
        ax.set_xlabel("training wall time, s" + (" (log scale)" if problem.regime == "deterministic" else ""))
        if problem.regime == "deterministic":
            ax.set_xscale("log")
    ax.set_ylabel(problem.curve_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def plot_problem(problem: Problem, runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in runs})
    if problem.per_seed_table:  # one column per start: the starts behave very differently
        fig, axes = plt.subplots(2, len(seeds), figsize=(max(5 * len(seeds), 9), 8.5),
                                 squeeze=False)
        for j, s in enumerate(seeds):
            for i, x in enumerate(("step", "time")):
                _panel(axes[i][j], problem, runs, x, [s], f"from {problem.seed_label(s)}",
                       legend=(j == 0))
    else:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5), squeeze=False)
        band = "; band: min-max over seeds" if len(seeds) > 1 else ""
        _panel(axes[0][0], problem, runs, "step", None, f"against steps (mean of {len(seeds)} "
               f"seed{'s' if len(seeds) > 1 else ''}{band})")
        _panel(axes[0][1], problem, runs, "time", None, "against training wall time", legend=False)
    fig.suptitle(problem.title + "\n(dotted: the Adam/SGD learning rates that lost the sweep)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_headline(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.6 * rows), squeeze=False)
    for k, (pname, runs) in enumerate(results.items()):
        problem = PROBLEMS[pname]
        best = best_of_sweeps(problem, runs)
        keep = [r for r in runs if r["optimizer"] in best.values()]
        seeds = [min(r["seed"] for r in runs)] if problem.per_seed_table else None
        title = problem.title + (f", from {problem.seed_label(seeds[0])}" if seeds else "")
        _panel(axes[k // cols][k % cols], problem, keep, "step", seeds, title)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle("ELRA and ElraAdam vs Adam and SGD (constant lr and warm-up + cosine, best of 3 "
                 "learning rates) vs self-tuning optimizers")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- driver --------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    vers = []
    for mod in ("elra", "prodigyopt", "schedulefree", "dadaptation", "mnist1d", "sklearn"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            vers.append(f"{mod} {version(mod if mod != 'sklearn' else 'scikit-learn')}")
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch "
            f"{torch.__version__}; " + ", ".join(vers))


def write_report(runs: list[dict], notes: dict[str, list[str]], out: str, header: dict) -> str:
    """Tables, figures and JSON of ``runs`` into ``out``; returns the markdown report."""
    results = {p: [r for r in runs if r["problem"] == p] for p in PROBLEMS}
    results = {p: rs for p, rs in results.items() if rs}
    os.makedirs(out, exist_ok=True)
    sections = []
    for pname, rs in results.items():
        problem = PROBLEMS[pname]
        plot_problem(problem, rs, os.path.join(out, f"{pname}.png"))
        budget = max(r["budget"] for r in rs)
        sections.append(f"## {problem.title}, {budget} steps\n\n"
                        f"{problem_table(problem, rs, notes.get(pname, []))}\n\n"
                        f"![{pname}]({pname}.png)\n")
    plot_headline(results, os.path.join(out, "convergence.png"))
    total = f", total {header['total'] / 60:.1f} min" if header.get("total") else ""
    setting = f" ({header['setting']})" if header.get("setting") else ""
    report = (f"# Convergence benchmark{' (--quick)' if header.get('quick') else ''}\n\n"
              f"`{header['command']}`, {header['date']}{total}{setting}.\n\n"
              f"Machine: {header['machine']}.\n\n"
              f"## Headline\n\n{headline_table(results)}\n\n![headline](convergence.png)\n\n"
              + "\n".join(sections))
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(report)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump({**header, "notes": notes, "runs": runs}, fh)
    return report


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short budgets, one seed, Adam/SGD at their best learning rate only")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/out/quick or benchmarks/out/full)")
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS), default=list(PROBLEMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="override the seeds of every problem")
    parser.add_argument("--optimizers", nargs="+", default=None,
                        help="families to run (default all), e.g. ELRA Adam")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--reference-python", default=None,
                        help="a Python whose environment has the reference package elra 0.0.5")
    parser.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                        help="no runs: write the tables and figures of a results.json again")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs an interrupted call saved in OUT/runs.partial.jsonl")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        header = {k: v for k, v in saved.items() if k not in ("runs", "notes")}
        report = write_report(saved["runs"], saved.get("notes", {}),
                              args.out or os.path.dirname(args.from_json), header)
        print(report)
        return
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    out = args.out or os.path.join("benchmarks", "out", "quick" if args.quick else "full")
    threads = max(1, torch.get_num_threads() // args.jobs)
    torch.set_num_threads(threads)

    jobs, notes = [], {}
    for pname in args.problems:
        problem = PROBLEMS[pname]
        specs, notes[pname] = optimizer_specs(problem, args.quick, bool(args.reference_python))
        if args.optimizers:
            specs = [s for s in specs if s.family in args.optimizers or s.name in args.optimizers]
        seeds = args.seeds or (problem.quick_seeds if args.quick else problem.seeds)
        jobs += [(pname, s, seed) for s in specs for seed in seeds if seed in problem.seeds]
    # the longest runs first, so that parallel workers finish together
    jobs.sort(key=lambda j: list(PROBLEMS).index(j[0]), reverse=True)

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, "runs.partial.jsonl")  # each finished run, for --resume
    runs: list[dict] = []
    if args.resume and os.path.exists(partial):
        with open(partial) as fh:
            runs = [json.loads(line) for line in fh if line.strip()]
        done = {(r["problem"], r["optimizer"], r["seed"]) for r in runs}
        jobs = [j for j in jobs if (j[0], j[1].name, j[2]) not in done]
    elif os.path.exists(partial):
        os.remove(partial)

    def finished(rec: dict) -> None:
        runs.append(rec)
        with open(partial, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    if args.jobs == 1:
        for job in tqdm(jobs, desc="runs", unit="run"):
            finished(_run_any(job, args.quick, args.reference_python, threads))
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx,
                                                    initializer=_pool_init,
                                                    initargs=(threads,)) as pool:
            futs = [pool.submit(_run_any, job, args.quick, args.reference_python, threads)
                    for job in jobs]
            for fut in tqdm(concurrent.futures.as_completed(futs), total=len(futs), desc="runs",
                            unit="run"):
                finished(fut.result())
    total = time.perf_counter() - start
    argv_used = argv if argv is not None else sys.argv[1:]
    header = {"command": "python " + shlex.join(["benchmarks/convergence.py", *argv_used]),
              "date": datetime.date.today().isoformat(), "machine": machine(),
              "quick": args.quick, "total": total,
              "setting": f"{args.jobs} run{'s' if args.jobs > 1 else ''} in parallel, {threads} "
                         f"torch thread{'s' if threads > 1 else ''} each"}
    print(write_report(runs, notes, out, header))
    os.remove(partial)
    print(f"wrote {out}/results.md, results.json, convergence.png and one PNG per problem "
          f"({total:.0f} s)")


if __name__ == "__main__":
    main()
