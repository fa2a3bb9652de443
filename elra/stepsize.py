"""The step-size half of ELRA's control law: the update of ``alpha`` and ``lr`` from the reductions.

These functions take the reductions an engine computed over the parameter vectors (the angle
term ``S = <g, p> / |p|^2`` and ``|g|``) and the host's loss-derived inputs, and return the new
scalars. They are written once, on plain floats, as the ground truth: the pure-torch engine
calls them directly, a native engine computes the same function on the device and is tested
against these. Points 6 and 7 of ``ELRA_ALGORITHM.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .control import CLIP, LR_MIN, StepInputs

ALPHA_MIN = 1e-8
ALPHA_MAX = 1e6
RETRACE_ALPHA_MIN = 1e-12
ANGLE_CAP = -0.1  # alpha * S is kept >= -0.1
RETRACE_FALLBACK_SHRINK = 0.01  # when the retrace parabola is not usable


@dataclass
class Scalars:
    """The engine's scalar state: the step sizes and the window sums of the angle terms."""

    alpha: float
    lr: float
    step_size: float = 0.0  # the step size last applied (alpha or lr): what param_groups show
    applied: float = 0.0  # x = x_good - applied * d: the multiple of the stored direction d
    has_point: bool = False  # a point to retrace to exists (see TorchEngine.retrace)
    mean_angle: float = 0.0  # sum over the window of min(0, alpha * S)
    min_angle: float = 0.0
    norm_sum: float = 0.0  # sum over the window of |p| after each step
    gna: float = 0.0  # grad_norm_avg: |g| of the first step, then the window average of |p|

    def reset_window(self) -> None:
        self.mean_angle = 0.0
        self.min_angle = 0.0
        self.norm_sum = 0.0


def accepted_update(sc: Scalars, S: float, grad_norm: float, inputs: StepInputs,
                    stochastic: bool) -> float:
    """Update ``alpha`` and ``lr`` after an accepted step; return the step size to apply.

    ``S`` is ``<g, p> / |p|^2`` (0 when ``p`` is zero) and ``grad_norm`` is ``|g|`` of the
    direction about to be applied. The step size is ``lr`` (stochastic) or ``alpha``.
    """
    h = 1.0 - S
    if inputs.growth * h < 1.0:
        sc.alpha *= inputs.growth
    else:
        sc.alpha = (sc.lr if stochastic else sc.alpha) / h
    lr = max(LR_MIN, min(inputs.lr_schedule, inputs.lr_warmup))
    if lr * grad_norm > CLIP:
        lr = CLIP / grad_norm
    sc.lr = lr
    if stochastic and S > 0.0:
        sc.alpha = min(sc.alpha, lr / S)
    a = sc.alpha * S
    sc.mean_angle += min(0.0, a)
    sc.min_angle = min(sc.min_angle, a)
    if a < ANGLE_CAP:
        sc.alpha = ANGLE_CAP / S
    sc.alpha = min(max(sc.alpha, ALPHA_MIN), ALPHA_MAX)
    sc.step_size = sc.lr if stochastic else sc.alpha
    return sc.step_size


def retrace_update(sc: Scalars, f: float, f_last: float, p_sqnorm: float,
                   stochastic: bool) -> float:
    """Shrink the step sizes after a failed step; return the step size to re-apply.

    Deterministic: ``alpha`` moves to the minimum of the parabola through the last good loss
    ``f_last`` (slope ``-|p|^2``) and the failed loss ``f``, clamped to [1e-12, 1e6]. As in the
    reference, only a factor that is not finite (a NaN loss) falls back to a 100x shrink; an
    infinite loss or a parabola without a minimum (factor <= 0) sends alpha to its floor.
    """
    sc.lr = max(LR_MIN, sc.lr / 2.0)
    if not stochastic:
        d = (f - f_last) + sc.alpha * p_sqnorm
        factor = 0.5 * sc.alpha * p_sqnorm / d if d != 0.0 else math.nan
        if not math.isfinite(factor):  # a NaN loss; an infinite one gives 0: alpha drops to its floor
            factor = RETRACE_FALLBACK_SHRINK
        sc.alpha = min(max(sc.alpha * factor, RETRACE_ALPHA_MIN), ALPHA_MAX)
    sc.step_size = sc.lr if stochastic else sc.alpha
    return sc.step_size
