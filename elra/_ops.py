"""The ``elra::`` operators: their schemas (declared once, here), fake kernels, and the kernels.

Each op has one kernel per backend: C++ for CPU tensors and CUDA for CUDA tensors (``elra._C``,
built from ``csrc/``, registered for these schemas when it is imported), and a pure-torch kernel
(:mod:`elra.kernels_torch`) that is the default for every other device and stands in on all of
them when ``elra._C`` is missing. The engine (:mod:`elra.engine`) calls the ops through a
:class:`Kernels` table, so that it can also drive the pure-torch kernels on a device that has
native ones (``engine="torch"``, and the tests).

All ops mutate arguments in place and return nothing. The fake kernels check the arguments'
shapes and dtypes (the checks of the pure-torch kernels, which only read metadata), so the ops
trace under ``torch.compile`` and pass ``torch.library.opcheck``.

A missing or broken ``elra._C`` never breaks ``import elra``: :func:`native_status` says why.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Callable, NamedTuple, Optional

import torch

from . import kernels_torch as kt
from ._contract import MAX_SEGMENTS

logger = logging.getLogger("elra")

SCHEMAS = {
    "reduce": "(Tensor g, Tensor d, Tensor x, int[] bounds, bool with_x, Tensor(a!) out) -> ()",
    "collect": "(Tensor(a!) coll, Tensor g, float weight, float inv, bool first, bool half, "
               "Tensor(b!) scal) -> ()",
    "finalize": "(Tensor red, Tensor(a!) scal, Tensor(b!) coef, int kind, float[] wd, "
                "float growth, float lr_schedule, float lr_warmup, float inv, float momentum, "
                "float f, float f_last, float spec, bool stochastic, bool half, "
                "bool keep_copy) -> ()",
    "update": "(Tensor(a!) x, Tensor(b!) d, Tensor g, Tensor(c!)? xg, Tensor scal, Tensor coef, "
              "int[] bounds, float momentum) -> ()",
    "step_fused": "(Tensor(a!) x, Tensor d_prev, Tensor(b!) d_new, Tensor g, Tensor scal, "
                  "int[] bounds, float inv, float momentum, float step, float[] wd, "
                  "Tensor(c!) out) -> ()",
    "fixup": "(Tensor(a!) x, Tensor d_prev, Tensor(b!) d_new, Tensor g, Tensor scal, "
             "Tensor coef, int[] bounds, float momentum) -> ()",
}
OPS = tuple(SCHEMAS)

_CHECKS = {"reduce": kt.check_reduce, "collect": kt.check_collect, "finalize": kt.check_finalize,
           "update": kt.check_update, "step_fused": kt.check_step_fused, "fixup": kt.check_fixup}


def _fake(check: Callable) -> Callable:
    def fake(*args) -> None:
        check(*args)

    return fake


def define(namespace: str, default_kernels: bool = True, *, schemas: Optional[dict] = None,
           checks: Optional[dict] = None, kernels=kt) -> torch.library.Library:
    """Declare the ops in ``namespace`` with their fake kernels (and, by default, the
    pure-torch kernels as the kernels of every device). Keep the returned library alive.
    ``schemas``, ``checks`` (the fake kernels, by op) and ``kernels`` (a module with a
    pure-torch kernel per op) default to ELRA's; :mod:`elra.adam_ops` passes ElraAdam's."""
    schemas = SCHEMAS if schemas is None else schemas
    checks = _CHECKS if checks is None else checks
    lib = torch.library.Library(namespace, "DEF")
    for name, schema in schemas.items():
        lib.define(name + schema)
        torch.library.register_fake(f"{namespace}::{name}", _fake(checks[name]), lib=lib)
        if default_kernels:
            lib.impl(name, getattr(kernels, name), "CompositeExplicitAutograd")
    return lib


class Kernels(NamedTuple):
    """The kernels the engine calls, one per op, and what suits them."""

    name: str  # "native" or "torch"
    reduce: Callable
    collect: Callable
    finalize: Callable
    update: Callable
    step_fused: Callable
    fixup: Callable
    one_pass: bool  # the one-pass stochastic step (step_fused) pays off


TORCH_KERNELS = Kernels("torch", *(kt.UNCHECKED[op] for op in SCHEMAS), one_pass=False)


def dispatched(namespace: str, name: str = "native") -> Kernels:
    """The ops of ``namespace`` as dispatched by torch (the resolved overloads skip the schema
    matching of every call)."""
    ns = getattr(torch.ops, namespace)
    return Kernels(name, *(getattr(ns, op).default for op in OPS), one_pass=True)


_LIB = define("elra")
_native: Optional[Kernels] = None
_error: Optional[str] = None

if os.environ.get("ELRA_DISABLE_NATIVE", "") not in ("", "0"):
    _error = "disabled by ELRA_DISABLE_NATIVE"
elif importlib.util.find_spec(f"{__package__}._C") is None:
    _error = ("the extension elra._C is not built (installed with ELRA_NATIVE=0, or its build "
              "failed: reinstall with ELRA_NATIVE=cpu to see why)")
    logger.info("elra: %s; using the pure-torch kernels", _error)
else:
    try:
        from . import _C  # noqa: F401  (registers the CPU and CUDA kernels of the ops)

        _native = dispatched("elra")
    except Exception as e:  # a missing or broken build must never break import elra
        _error = f"{type(e).__name__}: {e}"
        logger.info("elra: native kernels not available (%s); using the pure-torch kernels",
                    _error)


def has_kernels_for(device: torch.device, op: str = "elra::update") -> bool:
    """True if native kernels (of ``op``) can run on tensors of ``device``."""
    if _native is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and bool(
        torch._C._dispatch_has_kernel_for_dispatch_key(op, key))


def kernels_for(device: torch.device, choice: str) -> tuple[Kernels, Optional[str]]:
    """The kernels for buffers on ``device`` (``choice``: "auto", "torch" or "native") and,
    when the native ones were wanted but cannot run there, why."""
    if choice == "torch":
        return TORCH_KERNELS, None
    if _native is None:
        return TORCH_KERNELS, f"the native kernels are not available ({_error})"
    if not has_kernels_for(device):
        return TORCH_KERNELS, f"no native kernels for {device.type} tensors in this build"
    return _native, None


def choose(devices: set, rows: int, choice: str, kernels_for_device: Callable,
           fallback, what: str = "") -> object:
    """The kernel table for buffers on ``devices`` with ``rows`` segment rows: ``fallback``
    (the pure-torch table) for several devices or too many rows, else ``kernels_for_device``'s
    (a function like :func:`kernels_for`). ``choice="native"`` raises ``RuntimeError`` where
    the native kernels cannot run; ``"auto"`` logs why it falls back. ``what``: the optimizer's
    name in the log."""
    if len(devices) > 1:
        kernels, reason = fallback, "the parameters live on several devices"
    elif rows > MAX_SEGMENTS:
        kernels, reason = fallback, f"more than {MAX_SEGMENTS} parameter-group segments"
    else:
        kernels, reason = kernels_for_device(next(iter(devices)), choice)
    if reason is not None and choice == "native":
        raise RuntimeError(f"engine='native' was asked for, but {reason}; use engine='auto' or "
                           f"'torch'")
    if reason is not None and choice == "auto":
        logger.info("elra: %susing the pure-torch kernels: %s", what, reason)
    return kernels


def native_status() -> dict:
    """What native support this installation has.

    Returns a dict with ``built`` (the extension loaded), ``cpu`` and ``cuda`` (kernels present
    for that device type), ``error`` (why the extension did not load, or ``None``) and ``build``
    (what the extension reports of itself: ``cpu_isa``, the instruction set its CPU kernels use
    here; ``cuda_archs``, the CUDA architectures compiled for, empty in a CPU build;
    ``compiler``; ``built_against_torch``; ``None`` without the extension) and ``self_check``
    (``enabled``: not switched off by ``ELRA_SELF_CHECK=0``; ``devices``: per device where the
    native kernels were checked, ``ok``, ``detail`` and ``seconds``; see :mod:`elra.selfcheck`).
    """
    from . import selfcheck

    build = None
    if _native is not None:
        from . import _C

        build = {k: getattr(_C, k, "") for k in ("cpu_isa", "cuda_archs", "compiler",
                                                  "built_against_torch")}
    return {"built": _native is not None, "cpu": has_kernels_for(torch.device("cpu")),
            "cuda": _native is not None and has_kernels_for(torch.device("cuda")),
            "error": _error, "build": build, "self_check": selfcheck.status()}
