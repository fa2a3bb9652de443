"""The kernel tables the CUDA tests run on: the real CUDA kernels when a GPU is there, and always
the same kernels (``csrc/cuda/elra_cuda.cu`` and its glue ``elra_cuda_glue.cpp``, unchanged) built
by the host compiler against the CPU emulation of ``csrc/cuda/emulation`` (see its
``cuda_runtime.h``): blocks run one after another, the threads of a block as fibers with real
barriers and warp shuffles. The emulated ops are registered as ``elra_emu::`` ops for CPU tensors.

The emulated build lowers the cap on blocks per segment to ``EMU_MAX_BLOCKS`` so that the
sizes of the tests take many grid-stride passes. It is built once per source state (with
``torch.utils.cpp_extension.load``, cached in a build folder keyed by the sources) and loaded
once per session.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from collections import defaultdict
from typing import NamedTuple, Optional

import numpy as np

import pytest
import torch

from elra import _ops

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = CUDA_DIR / "emulation"
HERE = Path(__file__).resolve().parent / "cuda_emulation"
EMU_NAMESPACE = "elra_emu"
EMU_MAX_BLOCKS = 3  # blocks per segment in the emulated build (1024 on a GPU)
# elements one block covers per grid pass: THREADS * MIN_PACKS_PER_THREAD packs (elra_cuda.cu;
# tests/test_cuda_emulation.py checks that they agree) of 16 bytes
THREADS, MIN_PACKS_PER_THREAD, GPU_MAX_BLOCKS = 256, 4, 1024
EMU_FLAGS = ["-O2", "-std=c++17", "-fvisibility=hidden", "-Wno-unknown-pragmas",
             "-DELRA_CUDA_EMULATION", f"-DELRA_CUDA_MAX_BLOCKS_PER_SEGMENT={EMU_MAX_BLOCKS}"]


class Target(NamedTuple):
    """Where the CUDA kernels run in a test."""

    name: str  # "cuda" or "emulated"
    device: torch.device
    ops: object  # torch.ops.elra or torch.ops.elra_emu
    kernels: _ops.Kernels
    max_blocks: int  # blocks per segment

    def put(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """A copy of the 1-d tensor t on the target, starting ``offset`` elements into its
        storage (never sharing memory with t)."""
        import math

        base = torch.full((t.numel() + offset,), math.nan, dtype=t.dtype, device=self.device)
        view = base[offset:]
        view.copy_(t)
        assert view.is_contiguous() and view.storage_offset() == offset
        return view

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, copy=True)

    def grid_pass(self, dtype: torch.dtype) -> int:
        """Elements of a segment that one grid pass covers (more take several passes)."""
        pack = 16 // torch.empty(0, dtype=dtype).element_size()
        return THREADS * MIN_PACKS_PER_THREAD * pack * self.max_blocks


def _sources() -> list[Path]:
    return [HERE / "emu_kernels.cpp", HERE / "emu_glue.cpp", EMU_DIR / "emu_runtime.cpp"]


def _digest() -> str:
    h = hashlib.sha1(torch.__version__.encode() + " ".join(EMU_FLAGS).encode())
    files = sorted(EMU_DIR.glob("*")) + sorted(CUDA_DIR.glob("*.*")) + _sources() + \
        sorted((ROOT / "csrc").glob("*.h"))
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def emulated() -> Target:
    """The emulated CUDA kernels (built at the first call, then cached). Raises if the build
    fails."""
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("ELRA_EMU_BUILD_DIR", "") or
                 Path(tempfile.gettempdir()) / f"elra_cuda_emu_{_digest()}")
    build.mkdir(parents=True, exist_ok=True)
    load(name="elra_cuda_emu", sources=[str(s) for s in _sources()],
         extra_include_paths=[str(EMU_DIR), str(CUDA_DIR)], extra_cflags=EMU_FLAGS,
         build_directory=str(build), is_python_module=False, verbose=False)
    _LIBS.append(_ops.define(EMU_NAMESPACE, default_kernels=False))
    kernels = _ops.dispatched(EMU_NAMESPACE, "cuda-emulated")
    return Target("emulated", torch.device("cpu"), getattr(torch.ops, EMU_NAMESPACE), kernels,
                  EMU_MAX_BLOCKS)


_LIBS: list = []  # the libraries that declare the emulated ops (kept alive)


def cuda_reason() -> Optional[str]:
    """Why the real CUDA kernels cannot run here (None: they can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    if not _ops.has_kernels_for(torch.device("cuda")):
        return "this build of elra has no CUDA kernels"
    return None


def real_cuda() -> Target:
    return Target("cuda", torch.device("cuda"), torch.ops.elra, _ops.dispatched("elra"),
                  GPU_MAX_BLOCKS)


def target_params() -> list:
    """pytest parameters: the emulated target always, the real one where it can run."""
    reason = cuda_reason()
    return [pytest.param("emulated", id="emulated"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
                reason is not None, reason=reason or ""))]


def get(name: str) -> Target:
    return emulated() if name == "emulated" else real_cuda()


# (target, what, dtype) -> (largest |device - cpu|, largest fraction of its tolerance), printed
# at the end of the run (conftest.pytest_terminal_summary)
DEVIATIONS: dict = defaultdict(lambda: (0.0, 0.0))


def record(target, what, dtype, got, exp, tol_abs):
    """Keeps the largest deviation of (target, what, dtype); tol_abs: the allowed deviation."""
    got, exp = (np.asarray(v, dtype=np.float64) for v in (got, exp))
    tol = np.broadcast_to(np.asarray(tol_abs, dtype=np.float64), got.shape)
    both = np.isfinite(got) & np.isfinite(exp)
    if not both.any():
        return
    err = np.abs(got[both] - exp[both])
    frac = err / np.maximum(tol[both], 1e-300)
    old = DEVIATIONS[(target.name, what, dtype)]
    DEVIATIONS[(target.name, what, dtype)] = (max(old[0], float(err.max())),
                                              max(old[1], float(frac.max())))


def deviation_report() -> list[str]:
    """The deviation table, per target, op and dtype (no lines when no CUDA test ran)."""
    if not DEVIATIONS:
        return []
    worst: dict = defaultdict(lambda: (0.0, 0.0))
    for (tname, what, dtype), (dev, frac) in DEVIATIONS.items():
        key = (tname, what.split()[0], str(dtype).replace("torch.", ""))
        worst[key] = (max(worst[key][0], dev), max(worst[key][1], frac))
    dtypes = ("float32", "float64", "float16", "bfloat16")
    lines = ["CUDA kernels against the CPU kernels: largest |device - cpu| (fraction of the "
             "tolerance)", f"  {'target':9s} {'op':11s}" + "".join(f"{d:>21s}" for d in dtypes)]
    for tname, op in sorted({k[:2] for k in worst}):
        cells = [worst.get((tname, op, d)) for d in dtypes]
        lines.append(f"  {tname:9s} {op:11s}" + "".join(
            f"{'-':>21s}" if c is None else f"{c[0]:>12.3g} ({c[1]:.3f})" for c in cells))
    return lines
