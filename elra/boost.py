"""Boosting: an equal-weight running average of the accepted points (SWA / Polyak-Ruppert style).

ELRA's large steps make the path oscillate; the average of recent accepted points is often a
much better model long before training ends. The average is for evaluation only: it reads the
parameters and never writes them, so enabling boosting never changes the optimizer's path.

The average restarts each time :meth:`Booster.take` hands out a model (so calling
``get_boost_model`` once per epoch averages each epoch), and it never spans much more than
``cycle`` accepted points: when the count reaches ``cycle`` it is halved, so older points fade
instead of the average ever being reset to a single point.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from .flat_buffer import FlatBuffer

DEFAULT_CYCLE = 240


class Booster:
    """Running average of the accepted points over the optimizer's flat buffers."""

    def __init__(self, buffers: list[FlatBuffer], cycle: int = DEFAULT_CYCLE):
        self.cycle = cycle
        # the average is kept in at least float32 so that half-precision models average well
        self.average = [b.new_zeros(torch.promote_types(b.dtype, torch.float32)) for b in buffers]
        self.count = 0
        self.loss_sum = 0.0

    def update(self, buffers: list[FlatBuffer], loss: float) -> None:
        """Add the current point (an accepted point with loss ``loss``) to the average."""
        if self.count >= self.cycle:
            self.loss_sum *= (self.cycle // 2) / self.count
            self.count = self.cycle // 2
        self.count += 1
        w = 1.0 / self.count
        for avg, b in zip(self.average, buffers):
            if avg.dtype == b.dtype:
                avg.lerp_(b.data, w)
            else:
                avg.lerp_(b.data.to(avg.dtype), w)
        self.loss_sum += loss

    @property
    def avg_loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    def model_copy(self, buffers: list[FlatBuffer], model: torch.nn.Module,
                   device: Optional[torch.device]) -> torch.nn.Module:
        """A deep copy of ``model`` whose optimized parameters hold the average."""
        memo: dict = {}
        for buf, avg in zip(buffers, self.average):
            for p, v in zip(buf.params, buf.views(avg)):
                memo[id(p)] = torch.nn.Parameter(v.detach().to(buf.dtype).clone(),
                                                 requires_grad=p.requires_grad)
        out = copy.deepcopy(model, memo)
        if device is not None:
            out = out.to(device)
        return out

    def restart(self) -> None:
        self.count = 0
        self.loss_sum = 0.0

    def state(self) -> dict:
        return {"count": self.count, "loss_sum": self.loss_sum, "cycle": self.cycle}

    def load_state(self, d: dict) -> None:
        self.count = int(d["count"])
        self.loss_sum = float(d["loss_sum"])
        self.cycle = int(d.get("cycle", DEFAULT_CYCLE))


def boost_call(booster: Optional[Booster], buffers: list[FlatBuffer], enable: bool,
               model: Optional[torch.nn.Module], device) -> tuple[Optional[Booster], tuple]:
    """``get_boost_model``: the booster to keep, and ``(count, avg_loss, model_copy)``.

    Turning boosting on starts an average (nothing to hand out yet); a call while it is on
    hands out a copy of ``model`` at the average (if there is one) and restarts the average;
    ``enable=False`` drops it.
    """
    nan = float("nan")
    if not enable or booster is None:
        return (Booster(buffers) if enable else None), (0, nan, None)
    if booster.count == 0 or model is None:
        return booster, (booster.count, booster.avg_loss, None)
    out = (booster.count, booster.avg_loss,
           booster.model_copy(buffers, model, torch.device(device) if device else None))
    booster.restart()
    return booster, out
