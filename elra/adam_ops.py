"""The ``elra_adam::`` operators of ElraAdam: their schemas (declared once, here), fake kernels
and kernel tables, on the op contract of :mod:`elra._ops` (a namespace of their own).

``step`` is the one pass of an accepted step, ``undo`` moves back over a step (a retrace).
Each has a C++ kernel for CPU tensors (``csrc/elra_adam_ops.cpp``, registered by importing
``elra._C``) and a pure-torch kernel (:mod:`elra.adam_kernels_torch`), the default for every
other device and for all of them without ``elra._C``. Both mutate in place and return nothing;
the fake kernels check shapes and dtypes, so the ops trace and pass ``torch.library.opcheck``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from . import _ops
from . import adam_kernels_torch as akt

NAMESPACE = "elra_adam"
_MOMENTS = "float alpha, float bc1, float bc2, float beta1, float beta2, float eps, float beta_a"
SCHEMAS = {
    "step": "(Tensor(a!) x, Tensor(b!) m, Tensor(c!) v, Tensor(d!) drift, Tensor g, "
            f"int[] bounds, float[] wd, {_MOMENTS}, Tensor(e!) out) -> ()",
    "undo": "(Tensor(a!) x, Tensor(b!) m, Tensor(c!) v, Tensor(d!) drift, Tensor? g, "
            f"int[] bounds, float[] wd, {_MOMENTS}) -> ()",
}
_CHECKS = {"step": akt.check_step, "undo": akt.check_undo}


class AdamKernels(NamedTuple):
    """The kernels ElraAdam's engine calls, one per op."""

    name: str  # "native" or "torch"
    step: Callable
    undo: Callable


TORCH_KERNELS = AdamKernels("torch", akt.UNCHECKED["step"], akt.UNCHECKED["undo"])
_LIB = _ops.define(NAMESPACE, schemas=SCHEMAS, checks=_CHECKS, kernels=akt)


def dispatched(namespace: str = NAMESPACE, name: str = "native") -> AdamKernels:
    """The ops of ``namespace`` as dispatched by torch (resolved overloads)."""
    ns = getattr(torch.ops, namespace)
    return AdamKernels(name, ns.step.default, ns.undo.default)


def kernels_for(device: torch.device, choice: str) -> tuple[AdamKernels, Optional[str]]:
    """The kernels for buffers on ``device`` (``choice``: "auto", "torch" or "native") and,
    when the native ones were wanted but cannot run there, why."""
    if choice == "torch":
        return TORCH_KERNELS, None
    if _ops._native is None:
        return TORCH_KERNELS, f"the native kernels are not available ({_ops._error})"
    if not _ops.has_kernels_for(device, f"{NAMESPACE}::step"):
        return TORCH_KERNELS, f"no native ElraAdam kernels for {device.type} tensors in this build"
    return dispatched(), None
