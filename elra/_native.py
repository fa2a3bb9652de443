"""Loading the native kernels (``elra._C``) without ever breaking ``import elra``.

``elra._C`` registers the ``torch.ops.elra.*`` operators (C++ kernels for CPU tensors, CUDA
kernels for CUDA tensors when built with CUDA). If it is missing or fails to load, the pure-torch
engine is used and :func:`native_status` says why.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger("elra")

_ops = None
_error: str | None = None


def _register_fakes() -> None:
    """Shape-only ("fake"/meta) versions of the ops, for torch.compile and FakeTensor tracing.

    Every op only mutates its arguments in place and returns nothing, so there is nothing to
    compute for shapes.
    """
    for name in ("reduce", "collect", "finalize", "update", "step_fused", "fixup"):
        torch.library.register_fake(f"elra::{name}")(lambda *args, **kwargs: None)

if os.environ.get("ELRA_DISABLE_NATIVE", "") not in ("", "0"):
    _error = "disabled by ELRA_DISABLE_NATIVE"
elif importlib.util.find_spec(f"{__package__}._C") is None:
    _error = ("the extension elra._C is not built (installed with ELRA_NATIVE=0, or its build "
              "failed: reinstall with ELRA_NATIVE=cpu to see why)")
    logger.info("elra: %s; using the pure-torch engine", _error)
else:
    try:
        from . import _C  # noqa: F401  (registers the operators)

        _ops = torch.ops.elra
        _register_fakes()
    except Exception as e:  # a missing or broken build must never break import elra
        _error = f"{type(e).__name__}: {e}"
        logger.info("elra: native kernels not available (%s); using the pure-torch engine", _error)


def ops():
    """The ``torch.ops.elra`` namespace, or ``None`` when the kernels are not available."""
    return _ops


def has_kernels_for(device: torch.device) -> bool:
    """True if the native kernels can run on tensors of ``device``."""
    if _ops is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("elra::update", key))


def native_status() -> dict:
    """What native support this installation has.

    Returns a dict with ``built`` (the extension loaded), ``cpu`` and ``cuda`` (kernels present
    for that device type) and ``error`` (why the extension did not load, or ``None``).
    """
    return {"built": _ops is not None, "cpu": has_kernels_for(torch.device("cpu")),
            "cuda": _ops is not None and has_kernels_for(torch.device("cuda")), "error": _error}
