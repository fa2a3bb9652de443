"""The host half of ELRA's control law: everything that follows from loss values and counters.

ELRA/P2M splits naturally in two. What needs the parameter vectors (dot products, norms, the
per-step step-size update that uses them) lives in an engine (see :mod:`elra.engine`), so that a
GPU engine can keep it on the device. What follows from the loss values the user passes and from
step counters lives here, in plain Python floats:

* the loss statistics and the accept/retrace decision (point 5 of ``ELRA_ALGORITHM.md``),
* the 100-step control window: long-window loss averages, stagnation and batch growth,
  the schedule, the dynamic weight-decay factor (point 2),
* the scalar bookkeeping of an accepted step and of a retrace (points 6 and 7),
* steps taken without a loss (a bare ``step()`` with no loss known): accepted when the engine
  finds the gradient finite, left out of the loss statistics (``no_loss_steps``).

[note: plans]
Whether a step the loss test accepts is really taken is decided on the parameters' device (a
non-finite gradient turns it into a retrace there), and a GPU tells the host a call later. So the
host never commits a step it has not seen: :meth:`LossControl.plan_first` and
:meth:`LossControl.plan_accept` return a :class:`Plan` that holds what the engine needs and both
states the control can end in (``taken``; ``failed``: the gradient was not finite), and the
engine's outcome, whenever it is read, selects one of them.

Nothing here touches a tensor, so every rule can be tested on its own with made-up numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from ._contract import CLIP, LR_MIN

# --- constants of the algorithm (names follow ELRA_ALGORITHM.md) -------------------------------
INITIAL_LR = 0.1  # first value of the applied (stochastic) step before any update
INITIAL_GROWTH_DAMPER = 855_000.0
GROWTH_DAMPER_DIVISOR = 3.9  # per accepted step
GROWTH_NUMERATOR = 1e6  # G = GROWTH_NUMERATOR / (1 + growth_damper)
RETRACE_DAMPER_FACTOR = 16.0  # growth_damper *= 16 after a retrace ...
RETRACE_DAMPER_RESET_ABOVE = 62_500.0  # ... reset to the initial value above this ...
RETRACE_DAMPER_ADD_BELOW = 1.0  # ... and += 16 when <= 1
WINDOW = 100  # steps of the short control window
LONG_WINDOW_SAMPLES = 768  # long window = max(1, 768 // (collects * batch_size)) short windows
MAX_COLLECTS = 6250
ACCEPT_DEVIATIONS = 5.0  # accept while f_best < mean_ref + 5 * dev_ref * dev_correction
EXPLOSION_FACTOR = 1.1  # stochastic: retrace when f >= 1.1 * f_init
DEV_CORRECTION_FACTOR = 1.05
FIRST_MEAN_FACTOR = 1.1
FIRST_DEV_FACTOR = 0.33
SCHEDULE_BASE = 2.0 / 3.0  # lr = lr_damp * (2/3) ** (schedule + increase)
SCHEDULE_MAX = 28.3943679363
RETRACE_SCHEDULE_STEP = 0.4
SCHEDULE_DECAY = 0.33  # schedule -= 0.33 per quiet window
SCHEDULE_LIMIT_BASE = 1.5  # limit = log(grad_norm_avg / clip) / log(1.5)
MIN_ANGLE_RAISE = -0.2  # a window whose smallest angle term is below this raises the schedule
MEAN_ANGLE_QUIET = -1.0
LR_DAMP_MIN = 1e-3
RETRACES_TO_GROW_BATCH = 25
STALL_WINDOWS_TO_GROW = 6
STALL_WINDOWS_TO_CHECK = 5
REBASE_AFTER_INCREASE = 2  # windows after a batch increase until mean_ref is re-based
WD_KAPPA = 0.005  # kappa = 0.005 * grad_norm_avg / |x|
WD_MULT = 2.0
WD_MULT_INCREASE = 4.0
WD_DYNAMIC_CAP = 3.0
WD_DYNAMIC_EXPONENT = 0.666
WD_MAX = 0.1  # weight decay must end in [0, 0.1)


def normalize_weight_decay(value: float) -> float:
    """Map a user weight decay to its effective value.

    A value above 0.5 is read as a keep factor, so ``0.9999`` means ``1e-4``. The result must lie
    in ``[0, 0.1)``; anything else raises :class:`ValueError`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"weight_decay must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"weight_decay must be finite, got {value!r}")
    # 1 - 0.99999 is 9.99999999995449e-06 in binary floating point; round the artefact away
    eff = round(1.0 - v, 12) if v > 0.5 else v
    if not (0.0 <= eff < WD_MAX):
        raise ValueError(
            f"weight_decay={value!r} is out of range: give a decay in [0, {WD_MAX}) "
            f"(e.g. 1e-4) or a keep factor in (0.9, 1] (e.g. 0.9999, read as 1 - value)"
        )
    return eff


@dataclass(slots=True)
class StepInputs:
    """What the host hands the engine for the step-size update of an accepted step."""

    growth: float  # G, the cap on alpha's growth this step
    lr_schedule: float  # lr_damp * (2/3) ** (schedule + increase)
    lr_warmup: float  # lr_damp * warmup_factor * steps

    @property
    def expected_step(self) -> float:
        """The stochastic step the engine will apply unless the clip shortens it."""
        lr = self.lr_schedule if self.lr_schedule < self.lr_warmup else self.lr_warmup
        return LR_MIN if lr < LR_MIN else lr


@dataclass(slots=True)
class Tentative:
    """Loss statistics as they would be after accepting the current step."""

    sum_f: float
    sum_var: float
    mean_ref: float
    dev_ref: float
    threshold: float


@dataclass(slots=True)
class Plan:
    """A step the host has decided to try, and the two states the control can end in."""

    first: bool  # the very first step (else an accepted one)
    wd: Optional[list[float]]  # per-group weight-decay factors of kappa * x, or None
    inputs: Optional[StepInputs]  # of the step-size update (None for the first step)
    f_last: float  # loss of the last accepted point (the deterministic retrace's parabola)
    taken: "LossControl"  # the control after the step, if the engine takes it
    before: "LossControl"  # the control before the step (never changed afterwards)

    @property
    def failed(self) -> "LossControl":
        """The control if the gradient was not finite: a retrace (the first step: no step).
        Formed when asked for (rarely: the gradient is nearly always finite)."""
        out = self.before.copy()
        if not self.first:
            out.retrace()
        return out


@dataclass
class LossControl:
    """Loss statistics, counters, schedule and batch/weight-decay control (host scalars).

    ``stochastic`` selects the regime; ``batch_size`` and ``classes`` only shape the long window
    and ``f_init``. All fields are numbers, booleans or lists of numbers, so :meth:`to_dict`
    gives a checkpoint that ``torch.load(weights_only=True)`` accepts.
    """

    stochastic: bool
    batch_size: int = 8
    classes: int = 0
    warmup: int = 1
    collects: int = 1

    started: bool = False
    f0: float = 0.0
    f_init: float = 0.0
    f_last: float = 0.0  # loss of the last accepted point (the retrace point)
    mean_ref: float = 0.0
    dev_ref: float = 0.0
    dev_correction: float = 1.0
    sum_f: float = 0.0
    sum_var: float = 0.0
    steps: int = 0
    window_steps: int = 0
    retraces_window: int = 0
    retraces_total: int = 0
    no_loss_steps: int = 0  # accepted steps without a loss since the long window last closed
    long_windows: int = 0
    stall: int = 0
    increase: bool = False
    rebase_countdown: int = 0
    window_history: list = field(default_factory=list)
    schedule: float = 1.0
    lr_damp: float = 1.0
    growth_damper: float = INITIAL_GROWTH_DAMPER
    grad_norm_avg: float = 0.0
    wd_dynamic: Optional[float] = None  # replaces the groups' weight decay once set
    valid_loss: Optional[float] = None
    train_loss: Optional[float] = None

    # --- derived -----------------------------------------------------------------------------
    @property
    def warmup_factor(self) -> float:
        return 1.0 / self.warmup if self.warmup > 1 else 1.0

    @property
    def long_window_steps(self) -> int:
        per = max(1, int(LONG_WINDOW_SAMPLES / (self.collects * max(1, self.batch_size))))
        return per * WINDOW

    def threshold(self) -> float:
        return self.mean_ref + ACCEPT_DEVIATIONS * self.dev_ref * self.dev_correction

    # --- per call ----------------------------------------------------------------------------
    def begin_step(self, with_gradient: bool) -> bool:
        """Count a real step (collection complete, or a retrace). True if the window is due."""
        self.steps += 1
        # the reference counts a retrace without gradient twice in the long window
        self.window_steps += 1 if with_gradient else 2
        return self.steps % WINDOW == 0

    def first_step(self, f: float) -> None:
        """Statistics of the very first step (point 4)."""
        self.started = True
        self.f0 = f
        floor = math.log(self.classes) if (self.stochastic and self.classes > 1) else math.log(2.0)
        self.f_init = max(f, floor)
        self.f_last = f
        self.mean_ref = FIRST_MEAN_FACTOR * f
        self.dev_ref = FIRST_DEV_FACTOR * abs(f)
        self.sum_f = f
        self.sum_var = 0.0

    def first_step_without_loss(self) -> None:
        """The first step when no loss is known: no loss bounds until losses come in."""
        self.started = True
        self.f0 = self.f_last = math.nan
        self.f_init = math.inf
        self.mean_ref = math.inf
        self.dev_ref = 0.0
        self.sum_f = self.sum_var = 0.0
        self.no_loss_steps += 1

    def accept_test(self, f_best: float, f: float) -> Optional[Tentative]:
        """The accept decision of point 5; ``None`` means retrace.

        The threshold is the one the statistics give before this call: a loss never raises the
        bar it is measured against (a single exploding loss would otherwise lift the mean and
        the deviation enough to pass, early in a run). This is the reference's behaviour, checked
        against it by black-box bisection. The statistics updated with ``f`` are returned and
        committed by :meth:`accept` only if the step really is accepted.
        """
        if not (math.isfinite(f) and math.isfinite(f_best)):
            return None
        threshold = self.threshold()
        if not f_best < threshold:
            return None
        if self.stochastic and not f < EXPLOSION_FACTOR * self.f_init:
            return None
        m = self.window_steps - self.retraces_window - self.no_loss_steps + 1
        sum_f = self.sum_f + f
        if self.window_steps > 0:
            sum_var = self.sum_var + (sum_f - m * f) ** 2 / self.window_steps**2
        else:
            sum_var = 0.0
        mean_ref, dev_ref = self.mean_ref, self.dev_ref
        if self.steps <= self.window_steps and m > 0:  # the long window has never closed
            mean_ref = sum_f / m
            dev_ref = math.sqrt(max(sum_var, 0.0) / m) * DEV_CORRECTION_FACTOR**self.retraces_window
        return Tentative(sum_f, sum_var, mean_ref, dev_ref, threshold)

    def accept(self, t: Tentative, f: float) -> StepInputs:
        """Commit an accepted step (point 6) and return the inputs of the step-size update."""
        self.dev_correction = max(1.0, self.dev_correction / DEV_CORRECTION_FACTOR)
        self.sum_f, self.sum_var, self.mean_ref, self.dev_ref = t.sum_f, t.sum_var, t.mean_ref, t.dev_ref
        self.f_last = f
        return self._step_inputs()

    def accept_without_loss(self) -> StepInputs:
        """Commit an accepted step that had no loss: as :meth:`accept`, without statistics."""
        self.dev_correction = max(1.0, self.dev_correction / DEV_CORRECTION_FACTOR)
        self.no_loss_steps += 1
        return self._step_inputs()

    def _step_inputs(self) -> StepInputs:
        self.growth_damper /= GROWTH_DAMPER_DIVISOR
        self.lr_damp = math.sqrt(self.lr_damp)
        return StepInputs(
            growth=GROWTH_NUMERATOR / (1.0 + self.growth_damper),
            lr_schedule=self.lr_damp * SCHEDULE_BASE ** (self.schedule + float(self.increase)),
            lr_warmup=self.lr_damp * self.warmup_factor * self.steps,
        )

    def copy(self) -> "LossControl":
        """A copy (lists are replaced, never changed in place, so they may be shared)."""
        new = object.__new__(LossControl)
        new.__dict__.update(self.__dict__)
        return new

    def take_losses(self, valid: Optional[float], train: Optional[float]) -> None:
        """Validation and training losses for the dynamic weight decay (``None``: keep)."""
        if valid is not None:
            self.valid_loss = valid
        if train is not None:
            self.train_loss = train

    # --- plans (see [note: plans]) ---------------------------------------------------------------
    def plan_first(self, f: Optional[float], decays: list[float]) -> Plan:
        """The very first step (point 4) with loss ``f`` (``None``: no loss known). A failed
        first step leaves everything as it was."""
        wd = self.weight_decay_coefficients(decays)
        taken = self.copy()
        taken.begin_step(with_gradient=True)
        if f is None:
            taken.first_step_without_loss()
        else:
            taken.first_step(f)
        return Plan(True, wd, None, math.nan, taken, self)

    def plan_accept(self, f_best: Optional[float], f: Optional[float],
                    decays: list[float]) -> Optional[Plan]:
        """An accepted step (after :meth:`begin_step` and the window), or ``None`` when the
        loss fails the accept test (a retrace). ``f is None``: a step without a loss."""
        tentative = None
        if f is not None:
            tentative = self.accept_test(f_best, f)
            if tentative is None:
                return None
        wd = self.weight_decay_coefficients(decays)
        taken = self.copy()
        inputs = taken.accept_without_loss() if f is None else taken.accept(tentative, f)
        return Plan(False, wd, inputs, self.f_last, taken, self)

    def retrace(self) -> None:
        """Scalar bookkeeping of a retrace (point 7); the engine moves the vectors."""
        self.dev_correction *= DEV_CORRECTION_FACTOR
        self.retraces_window += 1
        self.retraces_total += 1
        if self.stochastic and self.retraces_window == RETRACES_TO_GROW_BATCH:
            self.collects = min(2 * self.collects, MAX_COLLECTS)
        d = self.growth_damper
        if d <= RETRACE_DAMPER_ADD_BELOW:
            self.growth_damper = d + RETRACE_DAMPER_FACTOR
        elif d < RETRACE_DAMPER_RESET_ABOVE:
            self.growth_damper = d * RETRACE_DAMPER_FACTOR
        else:
            self.growth_damper = INITIAL_GROWTH_DAMPER
        self.schedule = min(self.schedule + RETRACE_SCHEDULE_STEP, SCHEDULE_MAX)
        self.lr_damp = max(LR_DAMP_MIN, self.lr_damp / 2.0)

    # --- the 100-step window -------------------------------------------------------------------
    def close_window(self, norm_sum: float, mean_angle: float, min_angle: float,
                     weight_decay_on: bool) -> None:
        """Run the control window (point 2) from the engine's window sums."""
        retraces_in_window = self.retraces_window
        if self.window_steps >= self.long_window_steps:
            self._close_long_window()
        self.grad_norm_avg = norm_sum / WINDOW
        if weight_decay_on and self.valid_loss is not None and self.train_loss is not None:
            v, t = self.valid_loss, self.train_loss
            if v <= t or t <= 0.0:
                b = 1.0
            else:
                b = math.sqrt(max(2.0 * v / t - 1.0, 0.0))
            self.wd_dynamic = min(WD_DYNAMIC_CAP * self.collects**WD_DYNAMIC_EXPONENT, b)
        if self.grad_norm_avg > 0.0:
            limit = math.log(self.grad_norm_avg / CLIP) / math.log(SCHEDULE_LIMIT_BASE)
        else:
            limit = -math.inf
        if mean_angle > MEAN_ANGLE_QUIET and retraces_in_window > 0:
            self.schedule = max(limit, self.schedule - 1.0)
        if min_angle < MIN_ANGLE_RAISE:
            self.schedule += 1.0
        else:
            self.schedule = max(limit, self.schedule - SCHEDULE_DECAY)
        self.schedule = min(self.schedule, SCHEDULE_MAX)
        self.retraces_window = 0

    def _close_long_window(self) -> None:
        n = self.window_steps - self.retraces_window - self.no_loss_steps
        if n > 0:
            avg = self.sum_f / n
            sd = math.sqrt(max(self.sum_var, 0.0) / n)
        else:  # nothing but retraces: keep the reference values
            avg, sd = self.mean_ref, self.dev_ref
        self.sum_f = self.sum_var = 0.0
        self.window_steps = self.retraces_window = self.no_loss_steps = 0
        self.long_windows += 1
        self.increase = False
        hist = deque(self.window_history, maxlen=6)
        hist.append(avg)
        self.window_history = list(hist)
        if avg > self.mean_ref:
            self.stall += 1
            if self.stall >= STALL_WINDOWS_TO_GROW:
                self.increase = True
                self.stall = 0
                self.mean_ref = avg
                self.rebase_countdown = REBASE_AFTER_INCREASE
            elif self.stall == STALL_WINDOWS_TO_CHECK and len(hist) == 6:
                h = list(hist)
                if h[0] + h[1] > h[-2] + h[-1] or sum(h[:3]) > sum(h[-3:]):
                    self.stall = 0
                    self.mean_ref = min((h[-2] + h[-1]) / 2.0, sum(h[-3:]) / 3.0)
        else:
            self.stall = 0
            self.mean_ref = avg
        if self.rebase_countdown > 0 and not self.increase:
            self.rebase_countdown -= 1
            if self.rebase_countdown == 0:
                self.mean_ref = avg
        self.dev_ref = sd
        self.dev_correction = 1.0
        if self.increase and self.stochastic:
            self.collects = min(max(2 * self.collects, 1), MAX_COLLECTS)

    # --- weight decay ----------------------------------------------------------------------------
    def weight_decay_coefficients(self, group_decays: list[float]) -> Optional[list[float]]:
        """Per-group factors of ``kappa * x`` added to the gradient, or ``None`` for no decay.

        ``kappa = 0.005 * grad_norm_avg / |x|`` needs |x| and is applied by the engine.
        The very first step (called before :meth:`first_step`) decays only in the deterministic
        regime: that is what the reference does (measured: its first deterministic step moves
        along ``g + 2 * wd * 0.005 * |g| / |x| * x``, its first stochastic step along ``g``).
        """
        if (self.stochastic and not self.started) or not any(d > 0.0 for d in group_decays):
            return None
        mult = WD_MULT_INCREASE if self.increase else WD_MULT
        out = []
        for d in group_decays:
            if d > 0.0:
                factor = self.wd_dynamic if self.wd_dynamic is not None else d
                out.append(WD_KAPPA * mult * factor)
            else:
                out.append(0.0)
        return out

    # --- checkpoint ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "LossControl":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ELRA control fields in state: {sorted(unknown)}")
        obj = cls(stochastic=bool(d["stochastic"]))
        for k, v in d.items():  # fields missing from an older checkpoint keep their defaults
            setattr(obj, k, list(v) if isinstance(v, (list, tuple)) else v)
        return obj
