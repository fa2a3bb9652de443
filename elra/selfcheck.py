"""A short self-check of a kernel table against the pure-torch kernels, on a real device.

:func:`check_kernels` runs every ``elra::`` op once per floating dtype on a small layout built to
catch the mistakes a kernel can make on a device (segments that start off the vector alignment,
an empty segment, a segment of one element, sizes that span several blocks and end in a ragged
tail) with the given kernels and with :data:`elra._ops.TORCH_KERNELS`, on the same inputs, and
compares everything the op writes. It takes well under a second on a CPU.

The engine runs it (:func:`checked`, from :func:`elra.engine.make_engine`) the first time native
kernels are used on a CUDA device, once per device: on a mismatch the engine falls back to the
pure-torch kernels there with one warning, and :func:`elra.native_status` says why
(``self_check``). ``ELRA_SELF_CHECK=0`` switches that off.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from ._contract import (ALPHA, APPLIED, DIR_SCALE, GNA, HAS_POINT, KIND_ACCEPT, LR, MODE,
                        MODE_REDO, MODE_RETRACE_ALGEBRAIC, MODE_RETRACE_COPY, MODE_SHIFT,
                        MODE_STEP, MODE_UNDO_RETRACE, MOVE_S, MOVE_T, INV, NUM_SLOTS, RED_WIDTH,
                        STEP, XX_CACHE)
from ._ops import TORCH_KERNELS, Kernels

# segment sizes: a ragged tail after several 1024-element blocks, odd starts, an empty segment
SEGMENTS = (1, 37, 0, 9001, 3, 4099)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# allowed deviation per dtype, relative to max(1, |value|)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
             torch.bfloat16: 6e-2}


class SelfCheck(NamedTuple):
    """The result of :func:`check_kernels`."""

    ok: bool
    detail: str  # "" when ok, else the first mismatch: op, dtype, what, deviation
    seconds: float  # wall time of the check
    max_deviation: float  # the largest deviation seen, in units of its tolerance (ok: <= 1)


def _bounds() -> list[int]:
    out = [0]
    for size in SEGMENTS:
        out.append(out[-1] + size)
    return out


def _scalars(device, values: dict) -> torch.Tensor:
    """The scalar tensor with ``values`` ({slot: value}) set, the other slots 0."""
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
    for slot, v in values.items():
        scal[slot] = v
    return scal.to(device)


def _cases(device: torch.device, dtype: torch.dtype) -> list[tuple[str, Callable, list, tuple]]:
    """(name, call(kernels, *args), args, indices of the written arguments) per case."""
    gen = torch.Generator().manual_seed(0)
    bounds, n, nseg = _bounds(), sum(SEGMENTS), len(SEGMENTS)

    def vec(nan_at: Optional[int] = None) -> torch.Tensor:
        t = torch.randn(n, generator=gen, dtype=torch.float64)
        if nan_at is not None:
            t[nan_at] = math.nan
        return t.to(device, dtype)

    def f64(*shape) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    wd = [0.01 * (k % 3) for k in range(nseg)]
    coef = f64(nseg).abs() * 0.01
    red = torch.randn(2 * nseg * RED_WIDTH, generator=gen, dtype=torch.float64).abs().to(device)
    base = {ALPHA: 0.1, LR: 0.05, STEP: 0.05, DIR_SCALE: 1.0, GNA: 1.5, HAS_POINT: 1.0,
            APPLIED: 0.05, XX_CACHE: 2.0 + n}
    cases = [("reduce", lambda k, *a: k.reduce(*a),
              [vec(), vec(), vec(), bounds, True, torch.zeros(nseg * RED_WIDTH, dtype=torch.float64,
                                                               device=device)], (5,)),
             ("collect", lambda k, *a: k.collect(*a),
              [vec(), vec(), 0.25, 0.5, False, dtype in (torch.float16, torch.bfloat16),
               _scalars(device, {})], (0, 6))]
    fin = [red[:nseg * RED_WIDTH], _scalars(device, base), torch.zeros_like(coef), KIND_ACCEPT,
           wd, 1.0, 0.4, 3.0, 1.0, 0.5, 1.0, 1.1, 0.0, True, False, False]
    cases.append(("finalize", lambda k, *a: k.finalize(*a), fin, (1, 2)))
    for mode in (MODE_STEP, MODE_RETRACE_COPY, MODE_RETRACE_ALGEBRAIC):
        scal = _scalars(device, {**base, MODE: mode, MOVE_S: 0.3, MOVE_T: 0.5, INV: 0.75})
        cases.append((f"update (mode {mode})", lambda k, *a: k.update(*a),
                      [vec(), vec(), vec(), vec(), scal, coef, bounds, 0.5], (0, 1, 3)))
    cases.append(("step_fused", lambda k, *a: k.step_fused(*a),
                  [vec(), vec(), vec(), vec(nan_at=40), _scalars(device, base), bounds, 1.0,
                   0.5, 0.3, wd, torch.zeros(nseg * RED_WIDTH, dtype=torch.float64,
                                             device=device)], (0, 2)))
    for mode in (MODE_SHIFT, MODE_UNDO_RETRACE, MODE_REDO):
        scal = _scalars(device, {**base, MODE: mode, MOVE_S: 0.3, MOVE_T: -0.2})
        cases.append((f"fixup (mode {mode})", lambda k, *a: k.fixup(*a),
                      [vec(), vec(), vec(), vec(nan_at=38), scal, coef - 0.005, bounds, 0.5],
                      (0, 2)))
    return cases


def _deviation(got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """max |got - want| / (tol * max(1, |want|)); infinite where only one side is NaN."""
    got, want = got.double().cpu(), want.double().cpu()
    both_nan = torch.isnan(got) & torch.isnan(want)
    if bool((torch.isnan(got) ^ torch.isnan(want)).any()):
        return math.inf
    err = ((got - want).abs() / want.abs().clamp_min(1.0)).masked_fill(both_nan, 0.0)
    return float(err.max()) / tol if err.numel() else 0.0


def check_kernels(kernels: Kernels, device, dtypes=DTYPES) -> SelfCheck:
    """Run every op of ``kernels`` once per dtype on ``device`` and compare what it writes with
    the pure-torch kernels on the same inputs.

    Args:
        kernels: the kernel table to check (e.g. the native one, ``elra._ops.kernels_for``).
        device: where to run (``torch.device`` or its name).
        dtypes: the buffer dtypes to check (default: float32, float64, float16, bfloat16).

    Returns a :class:`SelfCheck`. Never raises for a kernel that fails or raises: that is
    reported as a mismatch (``ok`` False, ``detail`` says which op and why).
    """
    device, t0, worst = torch.device(device), time.perf_counter(), 0.0
    for dtype in dtypes:
        for name, call, args, written in _cases(device, dtype):
            ours = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            try:
                call(TORCH_KERNELS, *args)
                call(kernels, *ours)
            except Exception as e:  # a kernel that raises is a failed check, not a crash
                return SelfCheck(False, f"{name} [{dtype}]: raised {type(e).__name__}: {e}",
                                 time.perf_counter() - t0, math.inf)
            for i in written:  # finalize is float64 scalar math whatever the buffers' dtype
                tol = TOLERANCE[torch.float64 if name == "finalize" else dtype]
                dev = _deviation(ours[i], args[i], tol)
                worst = max(worst, dev)
                if not dev <= 1.0:
                    return SelfCheck(False, f"{name} [{dtype}]: argument {i} deviates "
                                     f"{dev:.3g}x the tolerance from the pure-torch kernel",
                                     time.perf_counter() - t0, worst)
    return SelfCheck(True, "", time.perf_counter() - t0, worst)


CHECKED_DEVICE_TYPES = ("cuda",)  # where make_engine runs the self-check
ENV_SWITCH = "ELRA_SELF_CHECK"
RESULTS: dict[str, SelfCheck] = {}  # by device, as make_engine ran them
_CHECKED: dict[str, set] = {}  # the dtypes checked so far, by device


def checked(kernels: Kernels, device: torch.device,
            dtypes=(torch.float32,)) -> tuple[Kernels, Optional[str]]:
    """The kernels to use for buffers of ``dtypes`` on ``device``: ``kernels`` unless their
    self-check there failed (then the pure-torch kernels and why). The check runs once per
    device and dtype (only for the dtypes not checked there yet), for other kernels than the
    pure-torch ones on the device types of ``CHECKED_DEVICE_TYPES``, unless
    ``ELRA_SELF_CHECK=0``; a failure warns once (``RuntimeWarning``)."""
    if (kernels is TORCH_KERNELS or device.type not in CHECKED_DEVICE_TYPES
            or os.environ.get(ENV_SWITCH, "1") == "0"):
        return kernels, None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    done = _CHECKED.setdefault(key, set())
    todo = tuple(d for d in DTYPES if d in set(dtypes) - done)
    if todo and (key not in RESULTS or RESULTS[key].ok):
        res, done_before = check_kernels(kernels, device, dtypes=todo), RESULTS.get(key)
        done.update(todo)
        if done_before is not None:  # one entry per device: the time and deviation of all runs
            res = res._replace(seconds=res.seconds + done_before.seconds,
                               max_deviation=max(res.max_deviation, done_before.max_deviation))
        RESULTS[key] = res
        if not res.ok:
            warnings.warn(f"elra: the native kernels failed their self-check on {key} "
                          f"({res.detail}); using the pure-torch kernels there "
                          f"(see elra.native_status())", RuntimeWarning, stacklevel=4)
    res = RESULTS[key]
    return (kernels, None) if res.ok else (TORCH_KERNELS, f"the self-check failed: {res.detail}")


def status() -> dict:
    """What :func:`elra.native_status` reports of the self-checks make_engine ran."""
    return {"enabled": os.environ.get(ENV_SWITCH, "1") != "0",
            "devices": {k: {"ok": r.ok, "detail": r.detail, "seconds": round(r.seconds, 4),
                            "max_deviation": round(r.max_deviation, 4)}
                        for k, r in RESULTS.items()}}

