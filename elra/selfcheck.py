"""A self-check of a kernel table on a device: each op once, against the pure-torch kernels.

The native kernels of a device are only as good as the build and the device they run on (a
driver, a GPU architecture, a compiler that none of the tests ran on). The first time the engine
is built with native kernels on a CUDA device (:func:`elra.engine.make_engine`), it runs
:func:`check_kernels` there once; on a mismatch it falls back to the pure-torch kernels with one
warning, and :func:`elra.native_status` says why. ``ELRA_SELF_CHECK=0`` switches it off.

The layout spans several blocks of the CUDA kernels (4096 float32 elements each) in one
segment, has segments of 0, 1 and odd sizes, and segment starts that break the 16-byte vector
alignment; every op runs once on it, on fixed inputs, and its outputs are compared with those
of :data:`elra._ops.TORCH_KERNELS` on the CPU (a reference that does not depend on the device,
and costs it no start-up of libraries the native kernels do not use).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import NamedTuple, Optional

import torch

from ._contract import (ALPHA, DIR_SCALE, DIR_SQ, GNA, INV, KIND_ACCEPT, LR, MODE, MODE_REDO,
                        MODE_STEP, MOVE_S, MOVE_T, NUM_SLOTS, STEP, XX_CACHE)
from ._ops import TORCH_KERNELS, Kernels

SIZES = (3, 12301, 0, 1, 517, 4099)  # segment sizes: several blocks, misaligned starts
DTYPES = (torch.float32, torch.bfloat16)
# allowed deviation: sums relative to the sum of the absolute values of their terms, elements
# relative to 1 + |value| in units of the storage type's epsilon, finalize's float64 relative
SUM_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
ELEM_ULPS = 16
FINALIZE_TOL = 1e-9
CHECKED_DEVICE_TYPES = ("cuda",)  # where make_engine runs the self-check
ENV_SWITCH = "ELRA_SELF_CHECK"


class SelfCheck(NamedTuple):
    """The result of :func:`check_kernels`."""

    ok: bool
    detail: str  # "all ops agree (largest ...)" or the first mismatch: op, dtype, deviation
    seconds: float  # wall time of the check, including the device's work


class _Mismatch(Exception):
    pass


def _compare(what: str, got: torch.Tensor, exp: torch.Tensor, tol: torch.Tensor,
             worst: list) -> None:
    """Raise _Mismatch unless |got - exp| <= tol everywhere (NaN where both are NaN)."""
    got, exp, tol = got.double().cpu(), exp.double().cpu(), tol.double().cpu()
    nan = torch.isnan(got) & torch.isnan(exp)
    dev = torch.where(nan, torch.zeros_like(got), (got - exp).abs())
    dev = torch.where(torch.isnan(dev), torch.full_like(dev, math.inf), dev)
    frac = float((dev / tol.clamp_min(1e-300)).max()) if dev.numel() else 0.0
    if frac > worst[0]:
        worst[0], worst[1] = frac, what
    if frac > 1.0:
        i = int((dev - tol).argmax())
        raise _Mismatch(f"{what}: max deviation {float(dev.max()):.3g} at element {i} (device "
                        f"{float(got.view(-1)[i]):.9g}, pure torch {float(exp.view(-1)[i]):.9g}, "
                        f"allowed {float(tol.view(-1)[i]):.3g})")


def _elem(what: str, got: torch.Tensor, exp: torch.Tensor, worst: list) -> None:
    eps = torch.finfo(exp.dtype).eps
    _compare(what, got, exp, ELEM_ULPS * eps * (1 + exp.double().abs()), worst)


def _inputs(device: torch.device, dtype: torch.dtype, n: int) -> list[torch.Tensor]:
    """x, d, g, collected (fixed random values), each starting one element into its storage
    (all offsets equal: the vector path with a scalar head)."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(4):
        base = torch.randn(n + 1, generator=gen, dtype=torch.float64).to(dtype).to(device)
        out.append(base[1:])
    return out


def _zeros_like(t: torch.Tensor) -> torch.Tensor:
    """Zeros like t at the same offset from the storage's start (else the kernels would take
    their scalar path: buffers at different offsets modulo 16 bytes cannot use vectors)."""
    return torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]


def _scalars(device: torch.device, n: int, nseg: int) -> tuple[torch.Tensor, torch.Tensor]:
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
    scal[ALPHA], scal[LR], scal[STEP], scal[DIR_SCALE] = 0.05, 0.02, 0.01, 1.0
    scal[DIR_SQ], scal[GNA], scal[XX_CACHE] = float(n), 1.5, float(n)
    coef = torch.linspace(0.0, 0.02, nseg, dtype=torch.float64)
    return scal.to(device), coef.to(device)


def _bounds() -> list[int]:
    bounds = [0]
    for s in SIZES:
        bounds.append(bounds[-1] + s)
    return bounds


def _run_ops(kernels: Kernels, device: torch.device, dtype: torch.dtype) -> dict:
    """Every op once on the layout, each on fixed inputs (not on another op's results, so that
    a deviation is the op's own); their outputs by name."""
    bounds = _bounds()
    n, nseg = bounds[-1], len(SIZES)
    x, d, g, coll = _inputs(device, dtype, n)
    half = dtype in (torch.float16, torch.bfloat16)
    wd, out = [1e-3] * nseg, {}
    red = torch.zeros(5 * nseg, dtype=torch.float64, device=device)
    kernels.reduce(g, d, x, bounds, True, red)
    out["reduce"] = red.clone()
    scal, coef = _scalars(device, n, nseg)
    kernels.collect(coll, g, 0.3, 0.5, False, half, scal)
    out["collect"], out["collect |g|^2"] = coll.clone(), scal.clone()
    scal, coef = _scalars(device, n, nseg)
    red = torch.linspace(-1.0, 2.0, 5 * nseg, dtype=torch.float64).abs().to(device)
    kernels.finalize(red, scal, coef, KIND_ACCEPT, wd, 3.0, 0.4, 0.3, 1.0, 0.5, 1.0, 1.2, 0.0,
                     True, half, True)
    out["finalize"], out["finalize coef"] = scal, coef
    scal, coef = _scalars(device, n, nseg)
    scal[MODE], scal[MOVE_S], scal[INV] = MODE_STEP, 0.01, 1.0
    xg = _zeros_like(x)
    kernels.update(x, d, g, xg, scal, coef, bounds, 0.5)
    out["update x"], out["update d"], out["update xg"] = x.clone(), d.clone(), xg
    x, d, g, _ = _inputs(device, dtype, n)
    dn = _zeros_like(d)
    kernels.step_fused(x, d, dn, g, scal, bounds, 1.0, 0.5, 0.01, wd, red)
    out["step_fused sums"], out["step_fused x"], out["step_fused d_new"] = red, x.clone(), dn
    x, d, g, dn = _inputs(device, dtype, n)
    scal[MODE], scal[MOVE_S], scal[MOVE_T] = MODE_REDO, 0.01, 0.008
    kernels.fixup(x, d, dn, g, scal, coef, bounds, 0.5)
    out["fixup x"], out["fixup d_new"] = x, dn
    return out


def _sum_scale(g: torch.Tensor, d: torch.Tensor, x: torch.Tensor, bounds: list) -> torch.Tensor:
    """Per segment, the sums of the absolute values of the terms of the five reductions."""
    G, D, X = (t.double().abs().cpu() for t in (g, d, x))
    rows = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = slice(a, b)
        rows += [G[s] @ D[s], G[s] @ G[s], X[s] @ D[s], G[s] @ X[s], X[s] @ X[s]]
    return torch.stack(rows)


def _check_dtype(kernels: Kernels, device: torch.device, dtype: torch.dtype,
                 worst: list) -> None:
    got = _run_ops(kernels, device, dtype)
    exp = _run_ops(TORCH_KERNELS, torch.device("cpu"), dtype)
    name = str(dtype).replace("torch.", "")
    x, d, g, _ = _inputs(torch.device("cpu"), dtype, sum(SIZES))
    scale = SUM_TOL[dtype] * _sum_scale(g, d, x, _bounds())
    for key in ("reduce", "step_fused sums"):
        _compare(f"{key} ({name})", got[key], exp[key], scale + 1e-300, worst)
    gg = SUM_TOL[dtype] * 0.25 * float(g.double().cpu() @ g.double().cpu())
    _compare(f"collect |g|^2 ({name})", got["collect |g|^2"], exp["collect |g|^2"],
             torch.full((NUM_SLOTS,), gg + 1e-300), worst)
    for key in ("finalize", "finalize coef"):
        _compare(f"{key} ({name})", got[key], exp[key],
                 FINALIZE_TOL * (1e-3 + exp[key].double().abs()), worst)
    for key in ("collect", "update x", "update d", "update xg", "step_fused x",
                "step_fused d_new", "fixup x", "fixup d_new"):
        _elem(f"{key} ({name})", got[key], exp[key], worst)


def check_kernels(kernels: Kernels, device, dtypes=DTYPES) -> SelfCheck:
    """Run every op of ``kernels`` once on ``device`` (a ``torch.device`` or its name) in each
    of ``dtypes`` and compare with the pure-torch kernels (on the CPU). Never raises for a mismatch or
    a kernel that fails: the result says what went wrong (``ok`` False, ``detail`` the first
    mismatch: op, dtype, largest deviation); ``seconds`` is the wall time, device work included.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    worst = [0.0, ""]
    try:
        for dtype in dtypes:
            _check_dtype(kernels, device, dtype, worst)
        ok, detail = True, (f"all ops agree with the pure-torch kernels (largest deviation "
                            f"{worst[0]:.3f} of the tolerance, {worst[1]})")
    except _Mismatch as e:
        ok, detail = False, str(e)
    except Exception as e:  # a kernel that raises is a failed check, not a crash
        ok, detail = False, f"{type(e).__name__}: {e}"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return SelfCheck(ok, detail, time.perf_counter() - t0)


RESULTS: dict[str, SelfCheck] = {}  # by device, as make_engine ran them


def checked(kernels: Kernels, device: torch.device) -> tuple[Kernels, Optional[str]]:
    """The kernels to use on ``device``: ``kernels`` unless their self-check there failed
    (then the pure-torch kernels and why). The check runs once per device, for native kernels
    on the device types of ``CHECKED_DEVICE_TYPES``, unless ``ELRA_SELF_CHECK=0``; a failure
    warns once (``RuntimeWarning``)."""
    if (kernels is TORCH_KERNELS or device.type not in CHECKED_DEVICE_TYPES
            or os.environ.get(ENV_SWITCH, "1") == "0"):
        return kernels, None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in RESULTS:
        RESULTS[key] = check_kernels(kernels, device)
        if not RESULTS[key].ok:
            warnings.warn(f"elra: the native kernels failed their self-check on {key} "
                          f"({RESULTS[key].detail}); using the pure-torch kernels there "
                          f"(see elra.native_status())", RuntimeWarning, stacklevel=4)
    res = RESULTS[key]
    return (kernels, None) if res.ok else (TORCH_KERNELS, f"the self-check failed: {res.detail}")


def status() -> dict:
    """What :func:`elra.native_status` reports of the self-checks."""
    return {"enabled": os.environ.get(ENV_SWITCH, "1") != "0",
            "devices": {k: {"ok": r.ok, "detail": r.detail, "seconds": round(r.seconds, 4)}
                        for k, r in RESULTS.items()}}
