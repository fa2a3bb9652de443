"""``ElraGradScaler``: loss scaling for mixed precision, shaped for ELRA.

It is used like ``torch.amp.GradScaler`` (``scale(loss).backward()``, ``step(optimizer)``,
``update()``), with three differences that ELRA needs: it hands the loss value to the optimizer,
the division by the scale is folded into the optimizer's step (the gradients are not rewritten),
and an overflowing gradient turns the step into a retrace instead of silently skipping it. As
usual the scale backs off after an overflow and grows after ``growth_interval`` clean steps.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ._args import loss_to_float
from .optimizer import ElraOptimizer


class ElraGradScaler:
    """Dynamic loss scaling for :class:`ElraOptimizer`.

    Args:
        device: accepted for signature compatibility with ``torch.amp.GradScaler``; the scale is a
            host number, so it does not matter.
        init_scale: initial scale factor (default 2**16). Must be finite and > 0.
        growth_factor: factor (> 1) applied after ``growth_interval`` steps without overflow.
        backoff_factor: factor in (0, 1) applied after an overflow.
        growth_interval: number of clean steps between growths (int > 0).
        enabled: if False, ``scale`` returns the loss unchanged and ``step`` is a plain
            ``optimizer.step(loss)``.
    """

    def __init__(self, device: Any = None, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True):
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be finite and > 0, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an int > 0, got {growth_interval!r}")
        self._enabled = bool(enabled)
        self._scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0
        self._loss: Optional[torch.Tensor] = None
        self._unscaled = False
        self._found_inf = False

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """The current scale factor (1.0 when disabled)."""
        return self._scale if self._enabled else 1.0

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        """Remember the loss for the next :meth:`step` and return ``loss * scale``."""
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"scale() expects the loss tensor, got {type(outputs).__name__}")
        self._loss = outputs.detach()
        return outputs * self._scale if self._enabled else outputs

    def unscale_(self, optimizer: ElraOptimizer) -> None:
        """Divide the gradients by the scale now (e.g. before clipping them).

        The following :meth:`step` then passes no scale. Calling it twice per step raises.
        """
        self._check_optimizer(optimizer)
        if not self._enabled:
            return
        if self._unscaled:
            raise RuntimeError("unscale_() has already been called since the last update()")
        inv = 1.0 / self._scale
        with torch.no_grad():
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inv)
        self._unscaled = True

    def step(self, optimizer: ElraOptimizer, loss: Any = None) -> Any:
        """Take the optimizer step with the remembered (or given) loss.

        An overflowing gradient makes the step a retrace and the next :meth:`update` backs the
        scale off. Raises ``TypeError`` when no loss is known (call :meth:`scale` first).
        """
        self._check_optimizer(optimizer)
        if loss is None:
            loss = self._loss
        if loss is None:
            raise TypeError("ElraGradScaler.step() needs the loss: call scaler.scale(loss) "
                            "before backward(), or pass step(optimizer, loss)")
        f = loss_to_float(loss)
        scale = self._scale if (self._enabled and not self._unscaled) else None
        result = optimizer.step(f, scale=scale)
        self._found_inf = optimizer.last_outcome == "retrace_gradient"
        self._loss = None
        return result

    def update(self, new_scale: Optional[float] = None) -> None:
        """Back the scale off after an overflow, or grow it after enough clean steps."""
        if not self._enabled:
            return
        if new_scale is not None:
            s = float(new_scale)
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"new_scale must be finite and > 0, got {new_scale!r}")
            self._scale = s
        elif self._found_inf:
            self._scale *= self._backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker >= self._growth_interval:
                self._scale *= self._growth_factor
                self._growth_tracker = 0
        self._found_inf = False
        self._unscaled = False

    def state_dict(self) -> dict:
        """Scale and growth state (same keys as ``torch.amp.GradScaler``)."""
        if not self._enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from :meth:`state_dict`; raises ``ValueError`` if it is empty or invalid."""
        if not self._enabled:
            return
        if not state_dict:
            raise ValueError("the scaler state is empty: it was saved from a disabled scaler")
        try:
            scale = float(state_dict["scale"])
            vals = (float(state_dict["growth_factor"]), float(state_dict["backoff_factor"]),
                    int(state_dict["growth_interval"]), int(state_dict["_growth_tracker"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid ElraGradScaler state: {e!r}") from None
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"invalid scale {scale!r} in the scaler state")
        self._scale = scale
        self._growth_factor, self._backoff_factor, self._growth_interval, self._growth_tracker = vals

    @staticmethod
    def _check_optimizer(optimizer: Any) -> None:
        if not isinstance(optimizer, ElraOptimizer):
            raise TypeError("ElraGradScaler works with ElraOptimizer only; for other optimizers "
                            "use torch.amp.GradScaler")
