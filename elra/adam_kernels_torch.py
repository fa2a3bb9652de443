"""The pure-torch kernels of the ``elra_adam::`` ops (schemas: :mod:`elra.adam_ops`): work on every
device, need no compiler, and are the ground truth of the native kernels' tests.

``step`` is ElraAdam's one pass: Adam's moments, the reductions ``<g, D>`` and ``<g, s g>``, the
move of the parameters (with decoupled weight decay) and the drift update, all with a step
``alpha`` known before the pass. ``undo`` moves back over a step. Both leave an element alone
where its gradient is not finite, so that a non-finite value never reaches the parameters or
the state. The operations and their order are those of the research prototype
(``benchmarks/elra_adam_proto.py``), so that in float64 these kernels give its numbers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .kernels_torch import check_bounds, check_buffers, check_doubles


def _segments(bounds: Sequence[int]):
    return zip(bounds[:-1], bounds[1:])


def check_step(x, m, v, drift, g, bounds, wd, alpha, bc1, bc2, beta1, beta2, eps, beta_a,
               out) -> int:
    check_buffers(x=x, m=m, v=v, drift=drift, g=g)
    nseg = check_bounds(bounds, x.numel())
    if len(wd) != nseg:
        raise RuntimeError(f"elra_adam: wd needs one entry per segment ({nseg}), got {len(wd)}")
    check_doubles(out, "out", 2, x.device)
    return nseg


def check_undo(x, m, v, drift, g, bounds, wd, *_) -> int:
    check_buffers(x=x, m=m, v=v, drift=drift, **({} if g is None else {"g": g}))
    nseg = check_bounds(bounds, x.numel())
    if len(wd) != nseg:
        raise RuntimeError(f"elra_adam: wd needs one entry per segment ({nseg}), got {len(wd)}")
    return nseg


def _direction(m: torch.Tensor, v: torch.Tensor, bc1: float, bc2: float, eps: float):
    """``(u, den)``: ``u = (m / den) / bc1`` with ``den = sqrt(v) / sqrt(bc2) + eps``."""
    den = v.sqrt().div_(math.sqrt(bc2)).add_(eps)
    return torch.div(m, den).div_(bc1), den


def _decay(x: torch.Tensor, bounds: Sequence[int], wd: Sequence[float], alpha: float,
           undo: bool) -> None:
    for (a, b), w in zip(_segments(bounds), wd):
        if w:
            x[a:b].div_(1 - alpha * w) if undo else x[a:b].mul_(1 - alpha * w)


def step(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, drift: torch.Tensor, g: torch.Tensor,
         bounds: Sequence[int], wd: Sequence[float], alpha: float, bc1: float, bc2: float,
         beta1: float, beta2: float, eps: float, beta_a: float, out: torch.Tensor) -> None:
    """One ElraAdam step where ``g`` is finite: ``out = [<g, D>, <g, s g>]`` (``D`` before the
    step, ``s = 1 / (sqrt(v / bc2) + eps)`` with the new ``v``), ``m <- lerp(m, g, 1 - beta1)``,
    ``v <- beta2 v + (1 - beta2) g^2``, ``x <- x (1 - alpha wd_k) - alpha u``,
    ``D <- beta_a D - alpha u`` with ``u = m s / bc1``."""
    check_step(x, m, v, drift, g, bounds, wd, alpha, bc1, bc2, beta1, beta2, eps, beta_a, out)
    _step(x, m, v, drift, g, bounds, wd, alpha, bc1, bc2, beta1, beta2, eps, beta_a, out)


def _step(x, m, v, drift, g, bounds, wd, alpha, bc1, bc2, beta1, beta2, eps, beta_a, out) -> None:
    gd = float(torch.vdot(g, drift))
    kept = None
    if not math.isfinite(gd):  # some g is not finite (or a product overflowed): keep those
        kept = (torch.isfinite(g), [t.clone() for t in (x, m, v, drift)])
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    u, den = _direction(m, v, bc1, bc2, eps)
    gn = float(torch.vdot(torch.div(g, den, out=den), g))
    _decay(x, bounds, wd, alpha, False)
    x.add_(u, alpha=-alpha)
    drift.mul_(beta_a).add_(u, alpha=-alpha)
    if kept is not None:
        ok, old = kept
        for t, o in zip((x, m, v, drift), old):
            t.copy_(torch.where(ok, t, o))
    out[0], out[1] = gd, gn


def undo(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, drift: torch.Tensor,
         g: Optional[torch.Tensor], bounds: Sequence[int], wd: Sequence[float], alpha: float,
         bc1: float, bc2: float, beta1: float, beta2: float, eps: float, beta_a: float) -> None:
    """Move back over a step of ``alpha`` (bias corrections ``bc1``, ``bc2`` of that step):
    ``x <- (x + alpha u) / (1 - alpha wd_k)``, ``D <- (D + alpha u) / beta_a`` with ``u`` from
    the current ``m``, ``v``. With ``g`` (the step's gradient), where ``g`` is finite only,
    and ``m``, ``v`` go back too: ``m <- (m - (1 - beta1) g) / beta1``,
    ``v <- max((v - (1 - beta2) g^2) / beta2, 0)``."""
    check_undo(x, m, v, drift, g, bounds, wd)
    _undo(x, m, v, drift, g, bounds, wd, alpha, bc1, bc2, beta1, beta2, eps, beta_a)


def _undo(x, m, v, drift, g, bounds, wd, alpha, bc1, bc2, beta1, beta2, eps, beta_a) -> None:
    old = None if g is None else [t.clone() for t in (x, m, v, drift)]
    u, _ = _direction(m, v, bc1, bc2, eps)
    x.add_(u, alpha=alpha)
    _decay(x, bounds, wd, alpha, True)
    drift.add_(u, alpha=alpha).div_(beta_a)
    if g is None:
        return
    m.sub_(g, alpha=1 - beta1).div_(beta1)
    v.addcmul_(g, g, value=-(1 - beta2)).div_(beta2).clamp_(min=0.0)
    ok = torch.isfinite(g)
    for t, o in zip((x, m, v, drift), old):
        t.copy_(torch.where(ok, t, o))


# The same without the argument checks, for the engine, which builds the arguments itself.
UNCHECKED = {"step": _step, "undo": _undo}
