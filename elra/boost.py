"""Boosting: an equal-weight running average of the accepted points (SWA / Polyak-Ruppert style).

ELRA's large steps make the path oscillate; the average of recent accepted points is often a
much better model long before training ends. The average is for evaluation only: it reads the
parameters and never writes them, so enabling boosting never changes the optimizer's path.

The average restarts each time ``get_boost_model`` hands out a model (so calling it once per
epoch averages each epoch), and it never spans much more than ``cycle`` accepted points: when
the count reaches ``cycle`` it is halved, so older points fade instead of the average ever being
reset to a single point.

:class:`Boosting` holds the optimizer's boosting methods: ``get_boost_model`` (a copy of the
model at the average) and ``eval()`` / ``train()`` (the average put into the model in place,
and the training point back: the convention of Schedule-Free optimizers, which the Hugging Face
Trainer and accelerate follow by themselves).

[note: evaluation mode]
``eval()`` keeps a copy of the training point (one buffer of the parameters' size) and writes
the average into the parameters; ``train()`` writes the copy back and frees it. A step in
evaluation mode raises (its gradient would belong to the average, not to the path). While in
evaluation mode, ``state_dict()`` holds the training point as the per-parameter state
``"train_point"`` (the model's own state dict then holds the average), so that a checkpoint
saved in either mode resumes the same path: loading one saved in evaluation mode enters
evaluation mode, and ``train()`` puts the saved training point into the parameters.
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


class Boosting:
    """The boosting methods of ``ElraOptimizer`` (a mixin; see the module's note)."""

    def get_boost_model(self, enable: bool = True, model: Optional[torch.nn.Module] = None,
                        device=None):
        """Turn boosting (an equal-weight average of the accepted points; it never changes
        the path) on or off and get the averaged model.

        Returns ``(count, avg_loss, model_copy)``: points averaged, their mean loss (NaN if
        none), and a deep copy of ``model`` (or the constructor's) at the average, on
        ``device`` if given; ``None`` when boosting was just turned on, nothing was averaged or
        no model is known. Handing out a model restarts the average (once per epoch: each
        epoch's average). ``enable=False`` frees it. ``NotImplementedError`` for sharded
        parameters (ZeRO, FSDP2), where no rank holds the whole model.
        """
        st = self._stepper
        if enable and self.sharded:
            raise NotImplementedError("boosting needs the whole model on this process; it is not "
                                      "available for sharded parameters (ZeRO, FSDP2)")
        st.resolve()
        if not enable and self._train_point is not None:
            self.train()
        booster, out = boost_call(st.booster, self._layout.buffers, enable,
                                  model if model is not None else self._model, device)
        if booster is not st.booster:
            st.booster = booster
            self._views.publish(self._vectors())
        return out

    def _vectors(self) -> dict:
        """The vectors the state views show: the engine's, boosting's, the training point."""
        out = self._stepper.vectors()
        if self._train_point is not None:
            out["train_point"] = self._train_point
        return out

    def eval(self) -> None:
        """Put the boosted average into the model's parameters, in place, for evaluation
        (Schedule-Free's convention: the Hugging Face Trainer and accelerate call it). Does
        nothing when boosting is off or has no point yet, and when already in evaluation
        mode. Buffers such as BatchNorm's running statistics are not averaged. A step raises
        until :meth:`train` (see [note: evaluation mode] in ``elra/boost.py``)."""
        st = self._stepper
        st.resolve()
        if self._train_point is not None or st.booster is None or st.booster.count == 0:
            return
        with torch.no_grad():
            self._train_point = [b.data.clone() for b in self._layout.buffers]
            for b, avg in zip(self._layout.buffers, st.booster.average):
                b.data.copy_(avg)
            self._layout.push()
        self._views.publish(self._vectors())

    def train(self) -> None:
        """Put the training point back into the parameters after :meth:`eval` (nothing to do
        otherwise, also before the first step)."""
        if self._train_point is None:
            return
        with torch.no_grad():
            for b, x in zip(self._layout.buffers, self._train_point):
                b.data.copy_(x)
            self._layout.push()
        self._train_point = None
        self._views.publish(self._vectors())
