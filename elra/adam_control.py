"""ElraAdam's host-side law: the step size from the step's two reductions, the growth cap, the
loss guard and the bookkeeping of a retrace. Python floats only, no tensors; the vector work is
in :mod:`elra.adam_engine`.

The rule is the research prototype's final one (``benchmarks/elra_adam_proto.py`` with its
defaults; the measurements are in ``benchmarks/results/elra_adam_research.md``):

* Adam's direction ``u = m_hat / (sqrt(v_hat) + eps)`` and one global step ``alpha``;
* the drift ``D = beta_a D - alpha u`` of the applied steps (horizon ``H = 1000``), with the sums
  ``A``, ``Z`` of the applied steps and of 1 under the same weights;
* per accepted step ``c = -<g, D> Z / A`` (``D`` before this step) and ``n = <g, s g>``, smoothed
  into ``C``, ``N``; ``alpha <- alpha exp(kappa clip(C / N, -1, 1))``, while growing at most
  ``GROWTH_CAP`` x the largest step of the first half of the run, in ``[STEP_MIN, STEP_MAX]``;
* one pass: a step applies last step's ``alpha``; the ``alpha`` from this step's reductions
  takes effect from the next step on;
* the loss guard (:class:`LossGuard`) and a non-finite gradient turn a call into a retrace: back
  to the last accepted point, ``alpha`` quartered.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

ALPHA0 = 1e-3  # the first step (Adam's default learning rate); ElraAdam's one keyword
KAPPA = 0.02  # alpha changes by at most exp(KAPPA) per step
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's moments
BETA_S = 0.9  # smoothing of the reductions into C and N
HORIZON = 1000.0  # steps of memory of the drift
BETA_A = 1.0 - 1.0 / HORIZON
RATIO_CLIP = 1.0
GROWTH_CAP = 2.0  # growing, alpha stays below 2x the largest step of the first half of the run
STEP_MIN, STEP_MAX = 1e-9, 1e4
RETRACE_FACTOR = 0.25
GUARD_BETA = 0.95  # the guard's moving mean and variance of the accepted losses
GUARD_WARM = 20  # losses before the guard judges
GUARD_MEAN, GUARD_SD, GUARD_FIRST = 2.0, 6.0, 1.0  # bad: above all of 2 mean, mean + 6 sd, f_first
STATE_VERSION = 1


@dataclass
class LossGuard:
    """Moving mean and variance of the accepted losses. A loss is bad if it is not finite, or
    (after ``GUARD_WARM`` losses) above all of ``GUARD_MEAN mean``, ``mean + GUARD_SD sd`` and
    ``GUARD_FIRST`` times the first loss."""

    count: int = 0
    mean: float = 0.0
    var: float = 0.0
    first: float = 0.0

    def bad(self, f: float) -> bool:
        if not math.isfinite(f):
            return True
        if self.count < GUARD_WARM:
            return False
        sd = math.sqrt(max(self.var, 0.0))
        return f > max(GUARD_MEAN * self.mean, self.mean + GUARD_SD * sd, GUARD_FIRST * self.first)

    def update(self, f: float) -> None:
        self.count += 1
        if self.count == 1:
            self.mean, self.var, self.first = f, 0.0, f
            return
        d = f - self.mean
        self.mean += (1 - GUARD_BETA) * d
        self.var = GUARD_BETA * (self.var + (1 - GUARD_BETA) * d * d)


class PeakHistory:
    """The running peak of the applied steps, ``peak(k) = max(alpha0, alpha_1 .. alpha_k)``, as
    the growth cap asks for it: at step ``t`` for ``k = t // 2``, which never decreases.

    [note: the cap's history]
    The prototype keeps one float per step. The cap only ever asks for ``peak(t // 2)``, and
    ``t // 2`` never decreases, so only the peak's change points from the last asked ``k`` on are
    needed: the same numbers exactly, in memory that grows only with the number of new peaks
    in the second half of the run (none once the step has stopped growing)."""

    def __init__(self, points: Optional[list] = None):
        self.points: deque = deque(tuple(p) for p in (points or []))  # (step, peak), ascending

    def append(self, step: int, peak: float) -> None:
        if not self.points or peak != self.points[-1][1]:
            self.points.append((step, peak))

    def peak(self, k: int) -> float:
        """``peak(k)``; ``k`` at least 1 and at least the last ``k`` asked for."""
        pts = self.points
        while len(pts) > 1 and pts[1][0] <= k:
            pts.popleft()
        return pts[0][1]


@dataclass
class AdamControl:
    """The scalars of the rule (see the module docstring) and the loss guard."""

    alpha: float = ALPHA0  # the step the next accepted step applies
    t: int = 0  # accepted steps
    C: float = 0.0
    N: float = 0.0
    A: float = 0.0
    Z: float = 0.0
    alpha_prev: float = ALPHA0  # the step the last accepted step applied
    beta_a_prev: float = 1.0
    peak: float = ALPHA0
    prev_retrace: bool = False
    retraces: int = 0
    guard: LossGuard = field(default_factory=LossGuard)
    history: PeakHistory = field(default_factory=PeakHistory)

    @staticmethod
    def bias(t: int) -> tuple[float, float]:
        """Adam's bias corrections ``(1 - beta1^t, 1 - beta2^t)`` of step ``t``."""
        return 1 - BETA1 ** t, 1 - BETA2 ** t

    def accept(self, gd: float, gn: float, f: Optional[float]) -> None:
        """Book accepted step ``t + 1`` (which applied ``alpha``) from its reductions
        ``gd = <g, D>`` and ``gn = <g, s g>``, and set the step of the next one."""
        if f is not None:
            self.guard.update(f)
        self.prev_retrace = False
        self.t += 1
        t, used = self.t, self.alpha
        c = -gd if t > 1 else 0.0
        if self.A > 0:
            c *= self.Z / self.A  # in units of the mean step stored in D
        self.C = BETA_S * self.C + (1 - BETA_S) * c
        self.N = BETA_S * self.N + (1 - BETA_S) * gn
        if t > 1 and self.N > 0:
            ratio = max(-RATIO_CLIP, min(RATIO_CLIP, self.C / self.N))
            new = self.alpha * math.exp(KAPPA * ratio)
            if ratio > 0:  # stop late growth
                new = min(new, max(self.alpha, GROWTH_CAP * self.history.peak(t // 2)))
            self.alpha = min(max(new, STEP_MIN), STEP_MAX)
        self.peak = max(self.peak, used)
        self.history.append(t, self.peak)
        self.A = BETA_A * self.A + used
        self.Z = BETA_A * self.Z + 1
        self.alpha_prev, self.beta_a_prev = used, BETA_A

    def retrace(self) -> Optional[tuple[float, float]]:
        """Book a retrace; ``(alpha, beta_a)`` of the last accepted step when the parameters go
        back over it (not after another retrace, nor before any step), else ``None``."""
        self.retraces += 1
        undo = None
        if not self.prev_retrace and self.t > 0:
            a, b = self.alpha_prev, self.beta_a_prev
            self.A, self.Z = (self.A - a) / b, (self.Z - 1) / b
            undo = (a, b)
        self.alpha = max(self.alpha * RETRACE_FACTOR, STEP_MIN)
        self.prev_retrace = True
        return undo

    def to_dict(self) -> dict:
        """The state as plain numbers and lists (``torch.load(weights_only=True)`` reads it)."""
        d = {k: getattr(self, k) for k in ("alpha", "t", "C", "N", "A", "Z", "alpha_prev",
                                           "beta_a_prev", "peak", "prev_retrace", "retraces")}
        d["guard"] = dict(vars(self.guard))
        d["history"] = [list(p) for p in self.history.points]
        d["version"] = STATE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdamControl":
        """The inverse of :meth:`to_dict`; ``ValueError`` for a state it cannot read."""
        try:
            if int(d.get("version", 0)) > STATE_VERSION:
                raise ValueError(f"version {d['version']} is newer than this elra's "
                                 f"{STATE_VERSION}; upgrade elra")
            floats = {k: float(d[k]) for k in ("alpha", "C", "N", "A", "Z", "alpha_prev",
                                               "beta_a_prev", "peak")}
            g = d["guard"]
            guard = LossGuard(int(g["count"]), float(g["mean"]), float(g["var"]),
                              float(g["first"]))
            history = PeakHistory([(int(s), float(p)) for s, p in d["history"]])
            return cls(**floats, t=int(d["t"]), prev_retrace=bool(d["prev_retrace"]),
                       retraces=int(d["retraces"]), guard=guard, history=history)
        except (KeyError, TypeError) as e:
            raise ValueError(f"the ElraAdam state is incomplete or invalid: {e!r}") from None
