"""ElraAdam's vector half: the moments ``m``, ``v`` and the drift ``D`` over the flat parameter
buffers (:mod:`elra.flat_buffer`), moved by the ``elra_adam::`` ops, and one call's sequence.

[note: one pass, last step's alpha]
A step applies the step size of the previous one, so the two reductions that set the next step
size (``<g, D>``, ``<g, s g>``) come out of the same pass over memory as the moments, the move
and the drift update: ``step`` reads ``x, m, v, D, g`` and writes ``x, m, v, D`` (9 streams;
fused Adam: 7). Two passes (this step's reductions first, then the move with the new step size)
would read ``m, v, D, x`` again and write them (12+ streams, about 1.7x fused Adam). The research
log (``benchmarks/results/elra_adam_research.md``, section 3) measured both rules on digits,
MNIST-1D and the byte LM: the differences of the means were 5-30x smaller than their seed spread.

[note: a non-finite gradient]
The pass leaves every element with a non-finite gradient alone and writes the others; a
non-finite gradient makes the reductions non-finite, which the host sees at once. It then moves
those elements back over the step (``undo`` with the gradient, which also takes the moments
back: exact up to rounding, never non-finite) and retraces as for a bad loss.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ._ops import choose
from .adam_control import BETA1, BETA2, BETA_A, EPS, AdamControl
from .adam_ops import TORCH_KERNELS, AdamKernels, kernels_for
from .flat_buffer import FlatBuffer

logger = logging.getLogger("elra")
VECTORS = ("exp_avg", "exp_avg_sq", "drift")  # the state per parameter, as in optimizer.state


class AdamEngine:
    """``m``, ``v``, ``D`` for each flat buffer, and the kernels that move them."""

    def __init__(self, buffers: list[FlatBuffer], kernels: AdamKernels):
        self.buffers, self.kernels = buffers, kernels
        self.vectors = {name: [b.new_zeros() for b in buffers] for name in VECTORS}
        self._bounds = [[s.start for s in b.segments] + [b.segments[-1].end] for b in buffers]
        self._out = [torch.zeros(2, dtype=torch.float64, device=b.device) for b in buffers]

    @property
    def name(self) -> str:
        return self.kernels.name

    def _wd(self, buf: FlatBuffer, decays: list[float]) -> list[float]:
        return [decays[s.group] for s in buf.segments]

    def _args(self):
        v = self.vectors
        return zip(self.buffers, v["exp_avg"], v["exp_avg_sq"], v["drift"], self._bounds)

    def step(self, alpha: float, t: int, decays: list[float], beta_a: float) -> tuple[float, float]:
        """The one pass of step ``t`` with step ``alpha``: ``(<g, D>, <g, s g>)``."""
        bc1, bc2 = AdamControl.bias(t)
        for (buf, m, v, d, bounds), out in zip(self._args(), self._out):
            self.kernels.step(buf.data, m, v, d, buf.grad, bounds, self._wd(buf, decays), alpha,
                              bc1, bc2, BETA1, BETA2, EPS, beta_a, out)
        if len(self._out) == 1:  # one read of the device's two sums
            gd, gn = self._out[0].tolist()
            return gd, gn
        sums = [o.tolist() for o in self._out]  # buffers of several dtypes or devices
        return sum(v[0] for v in sums), sum(v[1] for v in sums)

    def undo(self, alpha: float, t: int, decays: list[float], beta_a: float,
             with_grad: bool) -> None:
        """Move back over step ``t`` of ``alpha`` (with its gradient: the one just taken)."""
        bc1, bc2 = AdamControl.bias(t)
        for buf, m, v, d, bounds in self._args():
            self.kernels.undo(buf.data, m, v, d, buf.grad if with_grad else None, bounds,
                              self._wd(buf, decays), alpha, bc1, bc2, BETA1, BETA2, EPS, beta_a)


def make_engine(buffers: list[FlatBuffer], choice: str) -> AdamEngine:
    """The engine with the kernels ``choice`` asks for ("auto": native where they can run, else
    pure torch; "native": ``RuntimeError`` where they cannot; "torch")."""
    rows = max(len(b.segments) for b in buffers)
    kernels = choose({b.device for b in buffers}, rows, choice, kernels_for, TORCH_KERNELS,
                     "ElraAdam: ")
    return AdamEngine(buffers, kernels)


def take_step(control: AdamControl, engine: AdamEngine, f: Optional[float],
              decays: list[float], no_gradient: bool) -> str:
    """One call: a retrace for a bad loss, else the pass, a retrace if the gradient was not
    finite, else the booking of the step. Returns what the call did (``last_outcome``)."""
    if no_gradient:
        return "no_gradient"
    if f is not None and control.guard.bad(f):
        _retrace(control, engine, decays)
        return "retrace_loss"
    gd, gn = engine.step(control.alpha, control.t + 1, decays, BETA_A)
    if not (math.isfinite(gd) and math.isfinite(gn)):
        engine.undo(control.alpha, control.t + 1, decays, BETA_A, with_grad=True)
        _retrace(control, engine, decays)
        return "retrace_gradient"
    control.accept(gd, gn, f)
    return "accepted"


def _retrace(control: AdamControl, engine: AdamEngine, decays: list[float]) -> None:
    undo = control.retrace()
    if undo is not None:
        engine.undo(undo[0], control.t, decays, undo[1], with_grad=False)
