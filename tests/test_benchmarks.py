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


def test_cosine_schedule_warms_up_then_decays_to_zero():
    steps = 200  # warm-up: the first 5% = 10 steps
    lrs = [cv.cosine_lr(0.5, it, steps) for it in range(steps)]
    assert lrs[0] == pytest.approx(0.05) and lrs[9] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(0.5) and max(lrs) == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-3 * 0.5 and cv.cosine_lr(0.5, 105, steps) == pytest.approx(0.25)


def test_new_families_on_every_problem():
    """ElraAdam runs on every problem with one configuration; the cosine baselines sweep three
    peak learning rates and --quick runs the QUICK_LR one, which is in the sweep."""
    for name, problem in PROBLEMS.items():
        specs, _ = cv.optimizer_specs(problem, quick=False, reference=False)
        assert [s.name for s in specs if s.family == "ElraAdam"] == ["ElraAdam"]
        for fam in ("Adam cosine", "SGD cosine"):
            lrs = [s.lr for s in specs if s.family == fam]
            assert lrs == list(problem.sweeps[fam]) and len(lrs) == 3
            quick, _ = cv.optimizer_specs(problem, quick=True, reference=False)
            assert [s.lr for s in quick if s.family == fam] == [cv.QUICK_LR[name][fam]]
            assert cv.QUICK_LR[name][fam] in problem.sweeps[fam]


def test_elra_adam_and_cosine_runs_train_digits():
    """In-process quick digits runs: ElraAdam (no learning rate) and the cosine baselines learn."""
    for spec in (cv.OptSpec("ElraAdam", "ElraAdam"),
                 cv.OptSpec("Adam cosine lr=0.003", "Adam cosine", 3e-3),
                 cv.OptSpec("SGD cosine lr=0.1", "SGD cosine", 0.1)):
        rec = cv.run_job("digits", spec, 0, True)
        assert rec["status"] == "ok" and rec["metrics"]["test_acc"] > 0.93, (spec, rec["metrics"])
        if spec.family == "ElraAdam":
            lrs = [e["lr"] for e in rec["evals"][1:]]
            assert len(set(lrs)) > 1 and all(1e-6 < v < 1 for v in lrs)  # its own step size moves


def test_elra_adam_never_writes_a_non_finite_value():
    """A NaN loss, an inf loss and an inf gradient retrace to the last good point; the step size
    shrinks; a bare step() works; the run goes on afterwards."""
    opt_cls = cv.elra_adam_class()
    torch = cv.torch
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20))
    opt = opt_cls([w])
    X = torch.randn(64, 20)
    y = X @ torch.randn(20)

    def loss_fn():
        return ((X @ w - y) ** 2).mean()

    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss)
    good = w.detach().clone()
    opt.zero_grad()
    loss_fn().backward()
    opt.step(loss_fn())            # moves to a new point...
    moved = w.detach().clone()
    assert not torch.equal(moved, good)
    lr = opt.param_groups[0]["lr"]
    opt.zero_grad()
    loss_fn().backward()
    opt.step(float("nan"))         # ...whose loss is NaN: back to the last good point
    assert torch.allclose(w.detach(), good, atol=1e-6) and opt.param_groups[0]["lr"] < lr
    w.grad = torch.full_like(w, float("inf"))
    opt.step()                     # bare step, inf gradient: no move, no inf written
    assert torch.isfinite(w).all() and torch.allclose(w.detach(), good, atol=1e-6)
    before = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()                 # bare steps train
    assert torch.isfinite(w).all() and loss_fn().item() < before
    assert str(opt.last_outcome) == "accepted"
