"""Helper of step_overhead.py, run with the interpreter of a venv holding the reference package.

Times the reference ``elra.ElraOptimizer`` (stochastic regime, constant loss) against
``torch.optim.Adam(fused=True)`` in this process, interleaved, and writes the ratio of the medians
as JSON. It imports only the reference and torch (never this repository's code).

    python _reference_step.py NUMEL TENSORS REPEATS RESULT.json
"""

import json
import statistics
import sys
import time

import torch
from elra import ElraOptimizer  # the reference package of this interpreter


def params(numel, tensors):
    g = torch.Generator().manual_seed(0)
    sizes = [numel // tensors] * tensors
    sizes[-1] += numel - sum(sizes)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in sizes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def main():
    numel, tensors, repeats, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    adam = torch.optim.Adam(params(numel, tensors), lr=1e-3, fused=True)
    ref = ElraOptimizer(params(numel, tensors), None, 32, 10, lr=1e-4)
    steps = {"adam": adam.step, "ref": lambda: ref.step(1.0)}
    for _ in range(3):
        for f in steps.values():
            f()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    with open(out, "w") as fh:
        json.dump({"ratio": med["ref"] / med["adam"], "adam_s": med["adam"], "ref_s": med["ref"]}, fh)


if __name__ == "__main__":
    main()
