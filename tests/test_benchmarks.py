"""The convergence benchmark (benchmarks/convergence.py): its runs, its tables, its files."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence as cv  # noqa: E402
from convergence_problems import PROBLEMS  # noqa: E402


def _rec(optimizer, family, lr, seed, **metrics):
    return {"optimizer": optimizer, "family": family, "lr": lr, "seed": seed, "status": "ok",
            "budget": 100, "time": 1.0, "retraces": None, "metrics": metrics,
            "evals": [{"step": 0, "time": 0.0, "loss": 1.0}]}


@pytest.mark.slow
def test_quick_run_writes_tables_and_plots(tmp_path):
    """A small --quick run in a fresh interpreter: ELRA's Rosenbrock count is the anchor's, every
    optimizer asked for has a row, the figures are PNG files."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--problems",
         "rosenbrock", "polyfit", "--optimizers", "ELRA", "Adam", "Prodigy", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    runs = {(r["problem"], r["optimizer"]): r for r in data["runs"]}
    assert set(runs) == {(p, o) for p in ("rosenbrock", "polyfit")
                         for o in ("ELRA", f"Adam lr={cv.QUICK_LR[p]['Adam']:g}", "Prodigy")}
    assert runs[("rosenbrock", "ELRA")]["metrics"]["iterations"] == 31  # the anchor: 31 steps
    assert runs[("polyfit", "ELRA")]["metrics"]["rel_excess"] < 0.01
    report = (out / "results.md").read_text()
    assert report == proc.stdout[:len(report)]  # printed as written
    assert "| ELRA | 31 |" in report
    for name in ("convergence.png", "rosenbrock.png", "polyfit.png"):
        head = (out / name).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 20_000


def test_missing_optimizer_package_is_skipped_with_a_note(monkeypatch):
    real = cv.importlib.util.find_spec
    monkeypatch.setattr(cv.importlib.util, "find_spec",
                        lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    specs, notes = cv.optimizer_specs(PROBLEMS["digits"], quick=False, reference=False)
    families = [s.family for s in specs]
    assert "Prodigy" not in families and "D-Adapt Adam" in families
    assert notes == ["Prodigy skipped: package `prodigyopt` is not installed"]
    # Adam and SGD: the three learning rates of the sweep
    assert [s.lr for s in specs if s.family == "Adam"] == list(PROBLEMS["digits"].sweeps["Adam"])


def test_best_of_sweep_counts_a_missed_target_as_worst():
    problem = PROBLEMS["rosenbrock"]
    runs = [_rec("Adam lr=0.1", "Adam", 0.1, 0, iterations=math.nan, loss=1e-9),
            _rec("Adam lr=0.01", "Adam", 0.01, 0, iterations=900.0, loss=1e-3),
            _rec("Adam lr=0.001", "Adam", 0.001, 0, iterations=2000.0, loss=1e-5),
            _rec("SGD lr=0.001", "SGD", 0.001, 0, iterations=math.nan, loss=0.5),
            _rec("SGD lr=0.0001", "SGD", 0.0001, 0, iterations=math.nan, loss=0.1)]
    assert cv.best_of_sweeps(problem, runs) == {"Adam": "Adam lr=0.01", "SGD": "SGD lr=0.0001"}
    table = cv.problem_table(problem, runs, ["a note"])
    assert "| **Adam lr=0.01** | 900 |" in table and "| Adam lr=0.1 | > 100 |" in table
    assert table.endswith("a note")


def test_accuracy_is_maximised_and_reported_over_seeds():
    problem = PROBLEMS["digits"]
    runs = [_rec("SGD lr=0.1", "SGD", 0.1, s, test_acc=a, train_loss=0.1)
            for s, a in enumerate((0.90, 0.92))]
    runs += [_rec("SGD lr=0.01", "SGD", 0.01, s, test_acc=a, train_loss=0.01)
             for s, a in enumerate((0.95, 0.97))]
    assert cv.best_of_sweeps(problem, runs) == {"SGD": "SGD lr=0.01"}
    assert "| **SGD lr=0.01** | 0.9600 ± 0.0141 |" in cv.problem_table(problem, runs, [])


@pytest.mark.slow
def test_worker_refuses_this_package(tmp_path):
    """--worker exists for the reference package's venv; with this package's elra it stops."""
    job = json.dumps({"problem": "rosenbrock", "spec": {"name": "x", "family": cv.REFERENCE,
                                                        "lr": None},
                      "seed": 0, "quick": True, "threads": 1, "out": str(tmp_path / "o.json")})
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"),
                           "--worker", job], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode != 0 and "not the reference" in proc.stderr
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_problems_build_and_evaluate(name):
    """Every problem builds offline, its loss has a gradient and its evaluation has the metrics
    its table shows."""
    problem = PROBLEMS[name]
    task = problem.build(problem.seeds[0], True)
    loss = task.loss(0)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in task.params)
    m = task.evaluate()
    assert problem.curve in m
    assert all(k.key in m or k.key == "iterations" for k in problem.metrics)
