"""Does elra behave like the reference package? Same scenarios, both implementations, one table.

The scenarios of ``tests/reference/scenarios.py`` (fixed-gradient probes of the accept/retrace
rules, noisy quadratics with spikes, NaN losses, weight decay, momentum, warm-up, long windows
and batch growth, Rosenbrock and the digits anchor) run

* in the reference's own virtual environment (``--reference-python``, a venv with
  ``pip install elra==0.0.5``; it imports as ``elra`` too, so it never shares a process with
  this package), in a scratch directory because it writes ``state_lgs.txt``;
* here, with each of this package's engines;

and the table gives, per scenario group, the largest deviation of our parameters from the
reference's (relative to |x|). ``--record`` stores the reference's outputs as the golden file
that ``tests/test_reference_conformance.py`` checks on every test run.

    python benchmarks/reference_conformance.py --reference-python /tmp/refvenv/bin/python
    python benchmarks/reference_conformance.py --reference-python ... --record
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "reference" / "scenarios.py"
GOLDEN = ROOT / "tests" / "reference" / "elra_0.0.5.json"


def record_reference(python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reference.json"
        proc = subprocess.run([python, str(SCENARIOS), str(out)], cwd=tmp, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600)
        if proc.returncode != 0:
            sys.exit(f"the reference run failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def deviation(a: list, b: list) -> float:
    """Largest |a_k - b_k| / max(1, |b_k|) over the points of two trajectories."""
    worst = 0.0
    for p, q in zip(a, b):
        scale = max(1.0, math.sqrt(sum(v * v for v in q)))
        worst = max(worst, math.sqrt(sum((u - v) ** 2 for u, v in zip(p, q))) / scale)
    return worst if len(a) == len(b) else math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-python", default=os.environ.get("ELRA_REFERENCE_PYTHON"),
                    help="python of a venv with elra==0.0.5 (default: the golden file)")
    ap.add_argument("--record", action="store_true",
                    help=f"write the reference's outputs to {GOLDEN.relative_to(ROOT)}")
    args = ap.parse_args()

    if args.reference_python:
        ref = record_reference(args.reference_python)
        source = f"reference run ({args.reference_python}: elra {ref['recorded_with']['elra']}, " \
                 f"torch {ref['recorded_with']['torch']})"
        if args.record:
            GOLDEN.write_text(json.dumps(ref))
            print(f"recorded {GOLDEN.relative_to(ROOT)}")
    else:
        if args.record:
            sys.exit("--record needs --reference-python")
        ref = json.loads(GOLDEN.read_text())
        source = f"golden file {GOLDEN.relative_to(ROOT)} (elra {ref['recorded_with']['elra']})"

    sys.path.insert(0, str(SCENARIOS.parent))
    import scenarios
    from elra import native_status

    engines = (["native"] if native_status()["cpu"] else []) + ["torch"]
    print(f"reference: {source}")
    lines = ["| scenarios | engine | count | largest deviation (relative to abs x) | note |",
             "|---|---|---:|---:|---|"]
    for engine in engines:
        ours = scenarios.run_all(engine)
        for group in ("probes", "quadratics"):
            dev = max(deviation(a, b) for a, b in zip(ours[group], ref[group]))
            lines.append(f"| {group} | {engine} | {len(ref[group])} | {dev:.1e} | |")
        dev = max(deviation(a["points"], b["points"])
                  for a, b in zip(ours["rosenbrock"], ref["rosenbrock"]))
        calls = [(a["calls"], b["calls"]) for a, b in zip(ours["rosenbrock"], ref["rosenbrock"])]
        lines.append(f"| rosenbrock float64 | {engine} | {len(calls)} | {dev:.1e} | calls to "
                     f"1e-4 (ours, reference): {calls} |")
        if "digits" in ref:
            d_loss = max(abs(a - b) / b for x, y in zip(ours["digits"], ref["digits"])
                         for a, b in zip(x["epoch_losses"] + [x["train_loss"]],
                                         y["epoch_losses"] + [y["train_loss"]]))
            acc = [(round(x["accuracy"], 4), round(y["accuracy"], 4))
                   for x, y in zip(ours["digits"], ref["digits"])]
            lines.append(f"| digits float32, 880 steps | {engine} | {len(acc)} | {d_loss:.1e} "
                         f"(losses) | test accuracy (ours, reference): {acc} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
