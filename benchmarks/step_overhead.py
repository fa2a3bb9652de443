"""Per-step cost of ElraOptimizer and ElraAdam against torch's Adam and SGD, side by side in one
process.

Every optimizer steps its own copy of the same parameters with fixed gradients. The timings are
interleaved (one step of each optimizer in turn, repeated), so that drift of the machine hits all
alike; the table reports medians and each median's ratio to ``Adam(fused=True)``. ELRA and
ElraAdam get a constant loss, so every timed step is a normal (accepted) step, which the script
checks.

Columns:
* ``ratio``: median step time / median step time of ``Adam(fused=True)`` in this process.
* ``MB moved``: bytes each step must read and write at least (the passes of the implementation
  times the buffer size; see ``STREAMS``), and ``x floor``: the median time over the time that
  traffic takes at the best bandwidth measured in this process for simple streaming passes
  (``x.add_(g)``: two reads and a write; ``g.sum()``: one read), so 1.0 is the memory-bound
  optimum of that implementation.
* ``extra mem``: the optimizer's state and working buffers in units of the parameters' size.

The reference package (``pip install elra==0.0.5``, GPL research code that also imports as
``elra``) must live in its own virtual environment; pass its interpreter with
``--reference-python`` (or set ``ELRA_REFERENCE_PYTHON``). It is then timed in a subprocess
against ``Adam(fused=True)`` in that process, and its ratio is reported next to ours.

    python benchmarks/step_overhead.py                       # 100k/50, 1M, 8M, 32M fp32
    python benchmarks/step_overhead.py --sizes 32M:4 --repeats 31
    python benchmarks/step_overhead.py --sizes 32M:4 --weight-decay 1e-4 --momentum 0.9
    python benchmarks/step_overhead.py --device cuda --sizes 32M:4 100k:50   # on a GPU

It also prints the cost of the self-check that the engine runs once per CUDA device before it
uses the native kernels there (elra/selfcheck.py; goal: under 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# passes over a buffer of the parameters' size per step (reads + writes), normal steps, fp32
STREAMS = {
    "Adam(fused=True)": 7,  # x, g, m, v read; x, m, v written
    "Adam(foreach=True)": 7,  # at least as fused; in practice several more passes
    "SGD(foreach=True)": 3,  # x, g read; x written
    "elra native": 5,  # one pass: x, g, d_prev read; x, d_new written
    "elra torch": 8,  # 2 dots (g, d; g), d <- g (read, write), x <- x - s d (2 reads, write)
    "ElraAdam native": 9,  # one pass: x, g, m, v, D read; x, m, v, D written
    "ElraAdam torch": 34,  # one torch op per term (elra/adam_kernels_torch.py): 14 passes
}
# with weight decay the pure-torch engine also reads x for |x| and forms g' = g + c x (3 streams)
# into a buffer that then becomes the direction (no copy)
STREAMS_WITH_DECAY = {**STREAMS, "elra torch": 10}
DEFAULT_SIZES = ["100k:50", "1M:4", "8M:4", "32M:4"]


def parse_size(text: str) -> tuple[int, int]:
    n, _, k = text.partition(":")
    mult = {"k": 10**3, "M": 2**20}.get(n[-1], 1)
    return int(float(n[:-1] if n[-1] in "kM" else n) * mult), int(k or 1)


def make_params(numel: int, tensors: int, seed: int = 0,
                device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    sizes = [numel // tensors] * tensors
    sizes[-1] += numel - sum(sizes)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(device)) for s in sizes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
    return params


def state_bytes(opt) -> int:
    """Bytes of the optimizer's state tensors (ELRA: its vectors and working buffers)."""
    if "buffer_bytes" in getattr(opt, "stats", {}):
        return opt.stats["buffer_bytes"]
    tensors = [v for entry in opt.state.values() for v in entry.values()
               if isinstance(v, torch.Tensor) and v.numel() > 1]
    seen, total = set(), 0
    for v in tensors:
        st = v.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def sync_of(device: str):
    """What makes the device's queued work finish (nothing on the CPU)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def interleaved(steps: dict, repeats: int, warmup: int = 3, device: str = "cpu") -> dict:
    """Median seconds per call of each function, timed in turn (device work included)."""
    sync = sync_of(device)
    for _ in range(warmup):
        for f in steps.values():
            f()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, f in steps.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def stream_bandwidth(numel: int, device: str = "cpu") -> float:
    """The best bytes per second of simple streaming passes at this size: ``x.add_(g)`` (two
    read streams, one write stream to memory that was just read) and ``g.sum()`` (one read)."""
    x, g = torch.randn(numel, device=device), torch.randn(numel, device=device)
    t = interleaved({"add": lambda: x.add_(g, alpha=1e-9), "sum": lambda: g.sum()}, 11,
                    device=device)
    return max(3 * numel * 4 / t["add"], numel * 4 / t["sum"])


def our_candidates(numel: int, tensors: int, device: str = "cpu", **elra_kw) -> dict:
    from elra import ElraAdam, ElraOptimizer, _ops

    out = {}
    for name, cls, kw in (("Adam(fused=True)", torch.optim.Adam, dict(lr=1e-3, fused=True)),
                          ("Adam(foreach=True)", torch.optim.Adam, dict(lr=1e-3, foreach=True)),
                          ("SGD(foreach=True)", torch.optim.SGD, dict(lr=1e-3, foreach=True))):
        opt = cls(make_params(numel, tensors, device=device), **kw)
        out[name] = (opt, opt.step)
    engines = (["native"] if _ops.has_kernels_for(torch.device(device)) else []) + ["torch"]
    for engine in engines:
        opt = ElraOptimizer(make_params(numel, tensors, device=device), lr=1e-4,
                            regime="stochastic", engine=engine, **elra_kw)

        def step(opt=opt):
            opt.step(1.0)
            if opt.last_outcome not in ("first", "accepted"):
                raise RuntimeError(f"not a normal step: {opt.last_outcome}")

        out[f"elra {engine}"] = (opt, step)
    for engine in engines:
        opt = ElraAdam(make_params(numel, tensors, device=device), engine=engine,
                       weight_decay=elra_kw.get("weight_decay") or 0.0)

        def step(opt=opt):
            opt.step(1.0)
            if opt.last_outcome != "accepted":
                raise RuntimeError(f"not a normal step: {opt.last_outcome}")

        out[f"ElraAdam {engine}"] = (opt, step)
    return out


def reference_ratio(python: str, numel: int, tensors: int, repeats: int) -> float | None:
    """Median step time of the reference package over fused Adam's, in its own process."""
    script = Path(__file__).with_name("_reference_step.py")
    with tempfile.TemporaryDirectory() as tmp:  # it writes state_lgs.txt into the cwd
        res = Path(tmp) / "result.json"
        cmd = [python, str(script), str(numel), str(tensors), str(repeats), str(res)]
        proc = subprocess.run(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=1800)
        if proc.returncode != 0 or not res.exists():
            print(f"  (reference failed: {proc.stderr.strip().splitlines()[-1:]})")
            return None
        return json.loads(res.read_text())["ratio"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                    help="NUMEL:TENSORS, e.g. 32M:4 (M = 2**20, k = 1000)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--reference-python", default=os.environ.get("ELRA_REFERENCE_PYTHON"),
                    help="python of a venv with the reference elra==0.0.5 installed")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="ELRA's weight_decay")
    ap.add_argument("--momentum", type=float, default=None, help="ELRA's momentum")
    ap.add_argument("--out", default="benchmarks/out/step_overhead")
    ap.add_argument("--device", default="cpu", help="where the parameters live (cpu, cuda)")
    args = ap.parse_args()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from elra import native_status

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native: "
          f"{native_status()}, medians of {args.repeats} interleaved steps; ELRA: stochastic, "
          f"weight_decay={args.weight_decay}, momentum={args.momentum}, device {args.device}")
    print_self_check(args.device)
    rows = []
    for spec in args.sizes:
        numel, tensors = parse_size(spec)
        bw = stream_bandwidth(numel, args.device)
        cands = our_candidates(numel, tensors, args.device, weight_decay=args.weight_decay,
                               momentum=args.momentum)
        med = interleaved({k: f for k, (_, f) in cands.items()}, args.repeats,
                          device=args.device)
        base = med["Adam(fused=True)"]
        for name, (opt, _) in cands.items():
            streams = STREAMS_WITH_DECAY if args.weight_decay else STREAMS
            moved = streams[name] * numel * 4
            rows.append({"size": spec, "numel": numel, "tensors": tensors, "optimizer": name,
                         "ms": med[name] * 1e3, "ratio": med[name] / base,
                         "mb_moved": moved / 2**20, "x_floor": med[name] / (moved / bw),
                         "extra_mem": state_bytes(opt) / (numel * 4)})
        del cands
        if args.reference_python and args.device == "cpu":
            r = reference_ratio(args.reference_python, numel, tensors, args.repeats)
            if r is not None:
                rows.append({"size": spec, "numel": numel, "tensors": tensors,
                             "optimizer": "reference elra 0.0.5", "ms": r * base * 1e3,
                             "ratio": r, "mb_moved": float("nan"), "x_floor": float("nan"),
                             "extra_mem": float("nan")})
    lines = ["| parameters | optimizer | median ms | ratio to Adam(fused) | MB moved | x floor "
             "| extra mem |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['numel']:,} in {r['tensors']} | {r['optimizer']} | {r['ms']:.3f} | "
                     f"{r['ratio']:.2f} | {r['mb_moved']:.0f} | {r['x_floor']:.2f} | "
                     f"{r['extra_mem']:.2f} |")
    table = "\n".join(lines)
    print(table)
    for spec in args.sizes:
        ours = {r["optimizer"]: r for r in rows if r["size"] == spec}
        if "reference elra 0.0.5" in ours and "elra native" in ours:
            print(f"{spec}: reference / elra native = "
                  f"{ours['reference elra 0.0.5']['ratio'] / ours['elra native']['ratio']:.1f}x")
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out_dir / "step_overhead.png")
    print(f"wrote {out_dir}/results.md and step_overhead.png")


def print_self_check(device: str) -> None:
    """The self-check of the native kernels on the device, timed (a fresh run: the engine's
    own runs once per device, before the first native engine there)."""
    from elra import _ops, selfcheck

    dev = torch.device(device)
    if not _ops.has_kernels_for(dev):
        print(f"self-check: no native kernels for {device} here")
        return
    for dtypes in ((torch.float32,), selfcheck.DTYPES):
        res = selfcheck.check_kernels(_ops.dispatched("elra"), dev, dtypes=dtypes)
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        print(f"self-check of the native kernels on {device} ({names}): "
              f"{'ok' if res.ok else 'FAILED: ' + res.detail} in {res.seconds * 1e3:.1f} ms "
              f"(goal: under 50 ms, once per device and dtype; largest deviation "
              f"{res.max_deviation:.3f} of the tolerance)")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    for name in names:
        pts = sorted((r["numel"], r["ratio"]) for r in rows if r["optimizer"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("parameters (fp32)")
    ax.set_ylabel("step time / Adam(fused=True) step time (log)")
    ax.set_title("Optimizer step cost, median of interleaved steps (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
