"""``python -m elra``: what this installation of elra has, and whether its native kernels work.

Prints the versions (elra, Python, torch, NumPy), what the native module ``elra._C`` was built
with (compiler, the torch it was built against, the CPU instruction set its kernels use here, the
CUDA architectures compiled for), which kernels a CPU and a CUDA tensor would get, and the result
of a short self-check of the native kernels against the pure-torch ones (each op on a small
layout of several misaligned segments, in every floating dtype; about a second at most) on the
CPU and on every visible CUDA device.

The exit status is 0 when every self-check that ran passed (or none could run: no native
kernels), 1 when one failed. ``--no-self-check`` skips the self-check.
"""

from __future__ import annotations

import argparse
import platform
import sys

import numpy as np
import torch

from . import __version__, native_status
from ._ops import kernels_for


def _engine_line(device: torch.device) -> str:
    kernels, why = kernels_for(device, "auto")
    if kernels.name == "native":
        return "native kernels"
    return f"pure-torch kernels ({why})" if why else "pure-torch kernels"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _self_check(out) -> bool:
    from .selfcheck import check_kernels

    ok = True
    for device in _devices():
        kernels, why = kernels_for(device, "auto")
        if kernels.name != "native":
            print(f"  {device}: not run ({why or 'no native kernels'})", file=out)
            continue
        result = check_kernels(kernels, device)
        ok = ok and result.ok
        verdict = "ok" if result.ok else f"FAILED: {result.detail}"
        print(f"  {device}: {verdict} ({result.seconds * 1e3:.0f} ms)", file=out)
    return ok


def main(argv: list[str] | None = None, out=None) -> int:
    """Print the diagnosis to ``out`` (default: standard output); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m elra", description=__doc__.split("\n")[0])
    parser.add_argument("--no-self-check", action="store_true",
                        help="skip the self-check of the native kernels")
    opts = parser.parse_args(argv)
    out = sys.stdout if out is None else out
    status = native_status()
    print(f"elra {__version__} (Python {platform.python_version()}, torch {torch.__version__}, "
          f"NumPy {np.__version__})", file=out)
    build = status["build"]
    if build is None:
        print(f"native module: not loaded ({status['error']})", file=out)
    else:
        print(f"native module: built with {build['compiler']} against torch "
              f"{build['built_against_torch']}", file=out)
        print(f"  CPU kernels: {build['cpu_isa']} instructions", file=out)
        print(f"  CUDA kernels: {build['cuda_archs'] or 'none (a CPU build)'}", file=out)
    cuda_here = (f"{torch.cuda.device_count()} device(s) visible" if torch.cuda.is_available()
                 else "no CUDA device visible")
    print(f"a CPU tensor gets: {_engine_line(torch.device('cpu'))}", file=out)
    print(f"a CUDA tensor gets: {_engine_line(torch.device('cuda'))} [{cuda_here}]", file=out)
    if opts.no_self_check:
        return 0
    print("self-check (native kernels against the pure-torch ones, every op and dtype):",
          file=out)
    return 0 if _self_check(out) else 1


if __name__ == "__main__":
    sys.exit(main())
