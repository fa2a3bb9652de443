"""Per-step cost of ElraOptimizer against torch's Adam and SGD, side by side in one process.

Every optimizer steps the same parameters with fixed gradients; the timings of the optimizers
are interleaved (one step each, in turn) so that drift of the machine hits all of them alike, and
the table reports medians over the repeats and each median's ratio to ``Adam(fused=True)``.
ELRA gets a constant loss, so every timed step is a normal (accepted) step; the script checks
that. It also reports the optimizer's extra memory in units of the parameters' size.

    python benchmarks/step_overhead.py                 # 32M fp32 in 4 tensors and 100k in 50
    python benchmarks/step_overhead.py --sizes 32M:4 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from elra import ElraOptimizer, native_status


def parse_size(text: str) -> tuple[int, int]:
    n, _, k = text.partition(":")
    mult = {"k": 10**3, "M": 2**20}.get(n[-1], 1)
    return int(float(n[:-1] if n[-1] in "kM" else n) * mult), int(k or 1)


def make_params(numel: int, tensors: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    sizes = [numel // tensors] * tensors
    sizes[-1] += numel - sum(sizes)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for entry in opt.state.values():
        for v in entry.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                st = v.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


def candidates(numel: int, tensors: int):
    """name -> (optimizer, step function)."""
    out = {}

    def torch_opt(name, cls, **kw):
        ps = make_params(numel, tensors)
        opt = cls(ps, **kw)
        out[name] = (opt, ps, opt.step)

    torch_opt("Adam(fused=True)", torch.optim.Adam, lr=1e-3, fused=True)
    torch_opt("Adam(foreach=True)", torch.optim.Adam, lr=1e-3, foreach=True)
    torch_opt("SGD(foreach=True)", torch.optim.SGD, lr=1e-3, foreach=True)
    variants = (("stochastic", dict(regime="stochastic")),
                ("deterministic", dict(regime="deterministic")),
                ("stochastic, wd", dict(regime="stochastic", weight_decay=1e-4)))
    engines = ["native", "torch"] if native_status()["cpu"] else ["torch"]
    for engine in engines:
        for variant, kw in variants:
            label = f"elra {engine}, {variant}"
            ps = make_params(numel, tensors)
            opt = ElraOptimizer(ps, lr=1e-4, engine=engine, **kw)

            def step(opt=opt):
                opt.step(1.0)
                if opt.last_outcome not in ("first", "accepted"):
                    raise RuntimeError(f"not a normal step: {opt.last_outcome}")

            out[label] = (opt, ps, step)
    return out


def measure(numel: int, tensors: int, repeats: int, warmup: int = 3) -> list[dict]:
    cands = candidates(numel, tensors)
    times = {k: [] for k in cands}
    for _ in range(warmup):
        for _, _, step in cands.values():
            step()
    for _ in range(repeats):
        for name, (_, _, step) in cands.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["Adam(fused=True)"])
    param_bytes = numel * 4
    rows = []
    for name, (opt, _, _) in cands.items():
        med = statistics.median(times[name])
        rows.append({"size": f"{numel:,} in {tensors}", "optimizer": name, "median_ms": med * 1e3,
                     "ratio": med / base, "extra_buffers": state_bytes(opt) / param_bytes})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["32M:4", "100k:50"],
                    help="NUMEL:TENSORS, e.g. 32M:4 (M = 2**20)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved steps\n")
    print("| parameters | optimizer | median ms | ratio to Adam(fused) | extra memory (x params) |")
    print("|---|---|---:|---:|---:|")
    for spec in args.sizes:
        numel, tensors = parse_size(spec)
        for r in measure(numel, tensors, args.repeats):
            print(f"| {r['size']} | {r['optimizer']} | {r['median_ms']:.3f} | {r['ratio']:.2f} | "
                  f"{r['extra_buffers']:.2f} |")


if __name__ == "__main__":
    main()
