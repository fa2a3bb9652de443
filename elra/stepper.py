"""One ELRA call, from the host's side: collection, the plan, the engine's passes, the outcome.

The :class:`Stepper` joins the control law (:mod:`elra.control`, loss statistics and counters in
Python floats) and the engine (:mod:`elra.engine`, the vectors and the step-size update on the
parameters' device). Per call it

1. collects the gradient when the batch is grown by collection, and returns until it is complete;
2. counts the step and runs the 100-step control window when it is due;
3. asks the control law for a plan (or a retrace, when the loss fails the accept test);
4. has the engine decide (reductions, step-size update), updates the boosting average if the
   step was taken, and has the engine move;
5. selects the plan's next control state from the engine's outcome, at once on a CPU, at the
   start of the next call on a GPU (:meth:`Stepper.resolve`).

A call whose gradient cannot be used (a non-finite loss, no gradient, a failed collection, a
requested retrace) is a retrace (:meth:`Stepper.fail`).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from .boost import Booster
from .control import LossControl, Plan
from .engine import Engine

logger = logging.getLogger("elra")
_NAN = float("nan")
_NO_LOSS = (
    "elra: step() got no loss: running without loss-based decisions (every step with a finite "
    "gradient is accepted, a non-finite gradient retraces; no loss statistics, no accept test, "
    "no batch growth from stalled losses). ELRA decides better with the loss: call "
    "optimizer.set_loss(loss) before a bare step() (accelerate, Trainer-style loops), or pass "
    "optimizer.step(loss) or optimizer.step(closure), or use ElraGradScaler. Said once."
)


class Stepper:
    """The sequence of one ELRA call over a control law and an engine."""

    def __init__(self, control: LossControl, engine: Engine):
        self.control = control
        self.engine = engine
        self.booster: Optional[Booster] = None
        self.losses: list[float] = []  # losses of the calls collected so far
        self.last_outcome = "none"
        self._no_loss_said = False
        self._pending: Optional[Plan] = None  # a plan whose outcome the engine tells later

    def vectors(self) -> dict[str, list]:
        """The engine's vectors and the boosting average by name (one flat tensor per buffer)."""
        out = self.engine.vectors()
        if self.booster is not None:
            out["boost_average"] = self.booster.average
        return out

    def move_to(self, buffers: list, engine: Engine) -> None:
        """Continue on new flat buffers with ``engine``: the scalars, the collection in progress
        and boosting come along (the vectors are the caller's to copy)."""
        self.resolve()
        old = self.engine
        engine.load_scalar_state(old.scalar_state())
        if old.collected is not None:
            engine.ensure_collection()
            engine.collected_count = old.collected_count
        if self.booster is not None:
            booster = Booster(buffers, self.booster.cycle)
            booster.load_state(self.booster.state())
            self.booster = booster
        self.engine = engine

    def stats(self) -> dict:
        """See ``ElraOptimizer.stats``."""
        self.resolve()
        c, e = self.control, self.engine.scalar_state()
        flats = [t for ts in self.vectors().values() for t in ts if t is not None]
        flats += self.engine.scratch_buffers()
        return {"steps": c.steps, "retraces": c.retraces_total, "collects": c.collects,
                "alpha": e["alpha"], "lr": e["lr"], "step_size": e["step_size"],
                "threshold": c.threshold(), "schedule": c.schedule,
                "grad_norm_avg": c.grad_norm_avg, "no_loss_steps": c.no_loss_steps,
                "buffer_bytes": sum(t.numel() * t.element_size() for t in flats)}

    def resolve(self) -> None:
        """Select the next state of a step whose outcome the engine tells late (a GPU); before
        any new decision."""
        if self._pending is not None:
            plan, self._pending = self._pending, None
            self._settle(plan, self.engine.resolve())

    def step(self, f: Optional[float], inv: float, no_gradient: bool,
             decays: list[float]) -> None:
        """One call with loss ``f`` (``None``: no loss known) and gradients scaled by ``1/inv``."""
        ctl, eng = self.control, self.engine
        if f is not None and not math.isfinite(f):
            return self.fail(f, False, "retrace_loss", decays)
        if no_gradient:
            return self.fail(f, False, "retrace_no_gradient", decays)
        if f is None and not self._no_loss_said:
            self._no_loss_said = True
            logger.warning(_NO_LOSS)
        use_collected = ctl.collects > 1
        f_best = f
        if use_collected:
            eng.ensure_collection()
            if not eng.collect(1.0 / ctl.collects, inv):
                return self.fail(f, True, "retrace_gradient", decays)
            if f is not None:
                self.losses.append(f)
            if eng.collected_count < ctl.collects:
                self.last_outcome = "collected"
                return
            f_best = min(self.losses) if self.losses and f is not None else None
            self.losses = []
            inv = 1.0
        fv = _NAN if f is None else f  # what the engine and boosting see of a missing loss
        if not ctl.started:
            plan = ctl.plan_first(f, decays)
            eng.first(use_collected, inv, plan.wd)
        else:
            if ctl.begin_step(with_gradient=True):
                self.close_window(decays)
            plan = ctl.plan_accept(f_best, f, decays)
            if plan is None:
                return self.retrace(f, "retrace_loss")
            inp = plan.inputs
            expected = inp.expected_step
            fused = self.booster is None and eng.can_fuse(plan.wd, expected)
            eng.accept(use_collected, inv, plan.wd, inp.growth, inp.lr_schedule, inp.lr_warmup,
                       fv, plan.f_last, expected if fused else None)
        ok = None
        if self.booster is not None:  # boosting needs the outcome now
            ok = eng.outcome(wait=True)
            if ok:
                self.booster.update(eng.buffers, fv)  # the accepted point, before the move
        eng.move()
        eng.drop_collection()
        if ok is None:
            ok = eng.outcome(wait=False)
        if ok is None:  # a device engine: provisionally taken, selected at the next call
            self._pending = plan
            self.control = plan.taken
            self.last_outcome = "first" if plan.first else "accepted"
        else:
            self._settle(plan, ok)

    def _settle(self, plan: Plan, ok: bool) -> None:
        self.control = plan.taken if ok else plan.failed
        if ok:
            self.last_outcome = "first" if plan.first else "accepted"
            return
        self.last_outcome = "retrace_gradient"
        if plan.first:
            logger.warning("elra: the first step failed (non-finite gradient); parameters "
                           "unchanged")
        else:
            logger.debug("elra: retrace (non-finite gradient) at step %d", self.control.steps)

    def fail(self, f: Optional[float], with_gradient: bool, reason: str,
             decays: list[float]) -> None:
        """A call whose gradient cannot be used: a retrace (before the first step: nothing)."""
        f = _NAN if f is None else f
        self.engine.drop_collection()
        self.losses = []
        if not self.control.started:
            logger.warning("elra: the first step failed (%s, loss %r); parameters unchanged",
                           reason, f)
            self.last_outcome = reason
            return
        if self.control.begin_step(with_gradient):
            self.close_window(decays)
        self.retrace(f, reason)

    def retrace(self, f: float, reason: str) -> None:
        """Point 7: the engine goes back, the control law counts the retrace."""
        ctl = self.control
        self.engine.retrace(f, ctl.f_last)
        ctl.retrace()
        self.engine.drop_collection()
        self.losses = []
        self.last_outcome = reason
        logger.debug("elra: retrace (%s) at step %d, loss %r", reason, ctl.steps, f)

    def close_window(self, decays: list[float]) -> None:
        """The 100-step control window (point 2), from the engine's window sums."""
        norm_sum, mean_angle, min_angle = self.engine.window_sums()
        ctl = self.control
        ctl.close_window(norm_sum, mean_angle, min_angle, any(d > 0.0 for d in decays))
        self.engine.set_grad_norm_avg(ctl.grad_norm_avg)
        logger.debug("elra: window at step %d: schedule %.3f, collects %d, grad_norm_avg %.4g",
                     ctl.steps, ctl.schedule, ctl.collects, ctl.grad_norm_avg)
