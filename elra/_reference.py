"""ELRA/P2M written straight from the algorithm, slowly and obviously: the oracle of the tests.

This is ``ELRA_ALGORITHM.md`` (our own words for the published algorithm) as code, point by point,
in float64 on one flat copy of all parameters, with plain Python floats for the scalars. It has
no flat buffers, no kernels, no plans and no algebraic retrace (it keeps an exact copy of the
last accepted point), so that every fast path of the package can be tested against it on whole
trajectories (``tests/test_reference.py``). Where the package follows the measured behaviour of
the reference package rather than the text (each such rule says so), this file does too.

It is not meant for training: it is slow (a concatenation of all parameters per call) and
supports one process only. Use :class:`elra.ElraOptimizer`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch

# the constants of ELRA_ALGORITHM.md, as numbers (on purpose not imported from the package)
_G_NUM, _DAMPER0, _DAMPER_DIV = 1e6, 855000.0, 3.9
_CLIP, _LR_MIN, _LR_DAMP_MIN = 10.0, 1e-5, 1e-3
_ALPHA_RANGE, _RETRACE_ALPHA_MIN = (1e-8, 1e6), 1e-12
_SCHEDULE_MAX = 28.3943679363
_HALF_LIMIT = 65e3


class ReferenceElra:
    """The algorithm on a list of parameter groups (dicts with ``params`` and optionally
    ``weight_decay``, already normalised to [0, 0.1)); ``step(f)`` reads ``p.grad``.

    ``f`` may be ``None`` (no loss: the step is accepted when the gradient is finite and makes
    no loss statistics), NaN or inf (a retrace). ``scale`` divides the gradients (loss scaling).
    After each call ``outcome`` says what it did, with the names of ``last_outcome``.
    """

    def __init__(self, groups: list[dict], *, lr: float, stochastic: bool, batch_size: int = 8,
                 classes: int = 0, warmup: int = 1, momentum: float = 0.0, collects: int = 1):
        self.groups = groups = [dict(g, params=list(g["params"])) for g in groups]
        self.params = [p for g in groups for p in g["params"] if p.requires_grad]
        self.decay = torch.cat([torch.full((p.numel(),), float(g.get("weight_decay", 0.0)),
                                           dtype=torch.float64)
                                for g in groups for p in g["params"] if p.requires_grad])
        self.half = any(p.dtype in (torch.float16, torch.bfloat16) for p in self.params)
        self.stochastic, self.batch_size, self.classes = stochastic, batch_size, classes
        self.warmup_factor = 1.0 / warmup if warmup > 1 else 1.0
        self.beta, self.collects = momentum, collects
        self.alpha, self.lr, self.lr_damp, self.schedule = lr, 0.1, 1.0, 1.0
        self.growth_damper = _DAMPER0
        self.steps = self.window_steps = self.retraces_window = self.retraces = 0
        self.no_loss_steps = 0
        self.started = False
        self.stall, self.increase, self.rebase_in, self.history = 0, False, 0, deque(maxlen=6)
        self.mean_angle = self.min_angle = self.norm_sum = 0.0
        self.grad_norm_avg = 0.0
        self.wd_factor: Optional[float] = None  # replaces the groups' decay once computed
        self.valid_loss: Optional[float] = None
        self.train_loss: Optional[float] = None
        self.coll, self.coll_n, self.coll_losses = None, 0, []
        self.p = self.m = self.x_good = None  # p: direction; m: momentum buffer
        self.p_scale = 1.0  # the direction re-applied by a retrace is p_scale * p
        self.outcome = "none"

    # --- the parameters as one flat float64 vector -------------------------------------------
    def _x(self) -> torch.Tensor:
        return torch.cat([p.detach().double().reshape(-1) for p in self.params])

    def _g(self) -> torch.Tensor:
        return torch.cat([(p.grad.detach().double().reshape(-1) if p.grad is not None
                           else torch.zeros(p.numel(), dtype=torch.float64))
                          for p in self.params])

    def _set_x(self, x: torch.Tensor) -> None:
        k = 0
        for p in self.params:
            p.data.copy_(x[k:k + p.numel()].view(p.shape))
            k += p.numel()

    def set_valid_loss(self, v: float) -> None:
        self.valid_loss = float(v)

    def set_train_loss(self, v: float) -> None:
        self.train_loss = float(v)

    # --- the calls ---------------------------------------------------------------------------------
    def step(self, f: Optional[float], scale: float = 1.0) -> str:
        """One call of ``step(f)`` (point 1 onwards)."""
        if f is not None and not math.isfinite(f):
            return self._failed(f, counts=2, why="retrace_loss")
        if all(p.grad is None for p in self.params):
            return self._failed(f, counts=2, why="retrace_no_gradient")
        g = self._g() / scale
        f_best = f
        if self.collects > 1:  # point 1: average the gradients of `collects` calls
            if not self._gradient_ok(g):
                return self._failed(f, counts=1, why="retrace_gradient")
            self.coll = g / self.collects if self.coll_n == 0 else self.coll + g / self.collects
            self.coll_n += 1
            if f is not None:
                self.coll_losses.append(f)
            if self.coll_n < self.collects:
                self.outcome = "collected"
                return self.outcome
            g, self.coll_n = self.coll, 0
            f_best = min(self.coll_losses) if (self.coll_losses and f is not None) else None
            self.coll_losses = []
        if not self.started:
            return self._first_step(f, g)
        self._count(1)
        if f is not None and not self._loss_passes(f_best, f):
            return self._retrace(f, "retrace_loss")
        x = self._x()
        gd = self._decayed(g, x)
        if not (self._gradient_ok(g) and math.isfinite(float(gd.norm())) and
                math.isfinite(float(gd @ self.p))):
            return self._retrace(math.nan if f is None else f, "retrace_gradient")
        if f is not None:
            self._take_loss(f)
        self._accepted_step(f, x, gd)
        return self.outcome

    def step_retrace(self, f: float) -> str:
        return self._failed(f, counts=2, why="retrace_requested")

    def _gradient_ok(self, g: torch.Tensor) -> bool:
        n = float(g.norm())
        return math.isfinite(n) and not (self.half and n >= _HALF_LIMIT)

    def _failed(self, f: Optional[float], counts: int, why: str) -> str:
        """A call whose gradient is not used: a retrace (nothing before the first step).
        ``counts``: how often it counts in the long window (a retrace without a gradient twice,
        as the reference does)."""
        self.coll_n, self.coll_losses = 0, []
        f = math.nan if f is None else f
        if not self.started:
            self.outcome = why
            return why
        self._count(counts)
        return self._retrace(f, why)

    # --- point 2: counters and the control window ------------------------------------------------
    def _count(self, window_steps: int) -> None:
        self.steps += 1
        self.window_steps += window_steps
        if self.steps % 100 == 0:
            self._window()

    def _window(self) -> None:
        retraces_in_window = self.retraces_window
        per = max(1, int(768 / (self.collects * max(1, self.batch_size))))
        if self.window_steps >= per * 100:
            self._long_window()
        self.grad_norm_avg = self.norm_sum / 100
        if any(float(g.get("weight_decay", 0.0)) > 0 for g in self.groups) and \
                self.valid_loss is not None and self.train_loss is not None:
            v, t = self.valid_loss, self.train_loss
            b = 1.0 if (v <= t or t <= 0) else math.sqrt(max(2 * v / t - 1, 0.0))
            self.wd_factor = min(3 * self.collects ** 0.666, b)
        limit = (math.log(self.grad_norm_avg / _CLIP) / math.log(1.5)
                 if self.grad_norm_avg > 0 else -math.inf)
        if self.mean_angle > -1 and retraces_in_window > 0:
            self.schedule = max(limit, self.schedule - 1)
        if self.min_angle < -0.2:
            self.schedule += 1
        else:
            self.schedule = max(limit, self.schedule - 0.33)
        self.schedule = min(self.schedule, _SCHEDULE_MAX)
        self.retraces_window = 0
        self.mean_angle = self.min_angle = self.norm_sum = 0.0

    def _long_window(self) -> None:
        n = self.window_steps - self.retraces_window - self.no_loss_steps
        avg, sd = ((self.sum_f / n, math.sqrt(max(self.sum_var, 0.0) / n)) if n > 0
                   else (self.mean_ref, self.dev_ref))
        self.sum_f = self.sum_var = 0.0
        self.window_steps = self.retraces_window = self.no_loss_steps = 0
        self.increase = False
        self.history.append(avg)
        h = list(self.history)
        if avg > self.mean_ref:
            self.stall += 1
            if self.stall >= 6:
                self.increase, self.stall, self.mean_ref = True, 0, avg
                self.rebase_in = 2
            elif self.stall == 5 and len(h) == 6 and (
                    h[0] + h[1] > h[-2] + h[-1] or sum(h[:3]) > sum(h[-3:])):
                self.stall, self.mean_ref = 0, min((h[-2] + h[-1]) / 2, sum(h[-3:]) / 3)
        else:
            self.stall, self.mean_ref = 0, avg
        if self.rebase_in > 0 and not self.increase:
            self.rebase_in -= 1
            if self.rebase_in == 0:
                self.mean_ref = avg
        self.dev_ref, self.dev_correction = sd, 1.0
        if self.increase and self.stochastic:
            self.collects = min(2 * self.collects, 6250)

    # --- point 3: weight decay ------------------------------------------------------------------------
    def _decayed(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """g + wd * kappa * (2 or 4) * x per parameter (kappa = 0.005 grad_norm_avg / |x|). Not
        on the very first stochastic step (the reference's behaviour, measured)."""
        if (self.stochastic and not self.started) or not bool((self.decay > 0).any()):
            return g
        gna = self.grad_norm_avg if self.grad_norm_avg > 0 else float(g.norm())
        xn = float(x.norm())
        kappa = 0.005 * gna / xn if xn > 0 else 0.0
        factor = self.decay if self.wd_factor is None else (self.decay > 0).double() * self.wd_factor
        return g + factor * kappa * (4.0 if self.increase else 2.0) * x

    # --- point 4: the first step ----------------------------------------------------------------------
    def _first_step(self, f: Optional[float], g: torch.Tensor) -> str:
        x = self._x()
        gd = self._decayed(g, x)
        if not (self._gradient_ok(g) and math.isfinite(float(gd.norm()))):
            self.outcome = "retrace_gradient"  # nothing changes
            return self.outcome
        g = gd
        self.started = True
        self.steps, self.window_steps = 1, 1
        if f is None:  # no loss known: no loss bounds until losses come in
            self.f_last, self.f_init, self.mean_ref, self.dev_ref = math.nan, math.inf, math.inf, 0.0
            self.no_loss_steps = 1
        else:
            floor = math.log(self.classes) if (self.stochastic and self.classes > 1) else math.log(2)
            self.f_last, self.f_init = f, max(f, floor)
            self.mean_ref, self.dev_ref = 1.1 * f, 0.33 * abs(f)
        self.sum_f, self.sum_var, self.dev_correction = (0.0 if f is None else f), 0.0, 1.0
        self.p, self.p_scale = g.clone(), 1.0
        self.m = g.clone() if self.beta else None
        self.grad_norm_avg = float(g.norm())  # until the first window closes
        self.x_good = x.clone() if not self.stochastic else None  # no point before (measured)
        self._set_x(x - self.alpha * g)
        self.outcome = "first"
        return self.outcome

    # --- point 5: accept or retrace ---------------------------------------------------------------------
    def _loss_passes(self, f_best: Optional[float], f: float) -> bool:
        """The test against the statistics before this loss (a loss never raises its own bar)."""
        if f_best is None or not (math.isfinite(f) and math.isfinite(f_best)):
            return False
        if not f_best < self.mean_ref + 5 * self.dev_ref * self.dev_correction:
            return False
        return not (self.stochastic and not f < 1.1 * self.f_init)

    def _take_loss(self, f: float) -> None:
        """The loss statistics of an accepted step."""
        m = self.window_steps - self.retraces_window - self.no_loss_steps + 1
        self.sum_f += f
        self.sum_var = (self.sum_var + (self.sum_f - m * f) ** 2 / self.window_steps ** 2
                        if self.window_steps > 0 else 0.0)
        if self.steps <= self.window_steps and m > 0:  # the long window has never closed
            self.mean_ref = self.sum_f / m
            self.dev_ref = math.sqrt(max(self.sum_var, 0.0) / m) * 1.05 ** self.retraces_window
        self.f_last = f

    # --- point 6: an accepted step ---------------------------------------------------------------------
    def _accepted_step(self, f: Optional[float], x: torch.Tensor, g: torch.Tensor) -> None:
        """``g``: the gradient with weight decay; ``x``: the point it was taken at."""
        self.dev_correction = max(1.0, self.dev_correction / 1.05)
        if f is None:
            self.no_loss_steps += 1
        self.x_good = x.clone()
        pp = self.p_scale ** 2 * float(self.p @ self.p)
        S = float(self.p_scale * (g @ self.p)) / pp if pp != 0 and math.isfinite(pp) else 0.0
        step = self._new_step_sizes(S, float(g.norm()))
        if self.beta:
            self.m = self.beta * self.m + (1 - self.beta) * g
            d = self.m
            dd = float(d @ d)
            self.p, self.p_scale = d.clone(), (float(g @ d) / dd if dd > 0 else 1.0)
        else:
            d, self.p, self.p_scale = g, g.clone(), 1.0
        self.norm_sum += abs(self.p_scale) * float(self.p.norm())
        self._set_x(x - step * d)
        self.outcome = "accepted"

    def _new_step_sizes(self, S: float, g_norm: float) -> float:
        self.growth_damper /= _DAMPER_DIV
        G = _G_NUM / (1 + self.growth_damper)
        self.lr_damp = math.sqrt(self.lr_damp)
        h = 1 - S
        if G * h < 1:
            self.alpha *= G
        else:
            self.alpha = (self.lr if self.stochastic else self.alpha) / h
        lr = max(_LR_MIN, min(self.lr_damp * (2 / 3) ** (self.schedule + self.increase),
                              self.lr_damp * self.warmup_factor * self.steps))
        if lr * g_norm > _CLIP:
            lr = _CLIP / g_norm
        self.lr = lr
        if self.stochastic and S > 0:
            self.alpha = min(self.alpha, lr / S)
        a = self.alpha * S
        self.mean_angle += min(0.0, a)
        self.min_angle = min(self.min_angle, a)
        if a < -0.1:
            self.alpha = -0.1 / S
        self.alpha = min(max(self.alpha, _ALPHA_RANGE[0]), _ALPHA_RANGE[1])
        return self.lr if self.stochastic else self.alpha

    # --- point 7: a retrace -------------------------------------------------------------------------------
    def _retrace(self, f: float, why: str) -> str:
        self.dev_correction *= 1.05
        self.retraces_window += 1
        self.retraces += 1
        if self.stochastic and self.retraces_window == 25:
            self.collects = min(2 * self.collects, 6250)
        d = self.growth_damper
        self.growth_damper = d + 16 if d <= 1 else (d * 16 if d < 62500 else _DAMPER0)
        self.schedule = min(self.schedule + 0.4, _SCHEDULE_MAX)
        self.lr_damp = max(_LR_DAMP_MIN, self.lr_damp / 2)
        self.lr = max(_LR_MIN, self.lr / 2)
        pp = self.p_scale ** 2 * float(self.p @ self.p)
        if not self.stochastic:
            den = (f - self.f_last) + self.alpha * pp
            factor = 0.5 * self.alpha * pp / den if den != 0 else math.nan
            if not math.isfinite(factor):
                factor = 0.01
            self.alpha = min(max(self.alpha * factor, _RETRACE_ALPHA_MIN), _ALPHA_RANGE[1])
        s = self.lr if self.stochastic else self.alpha
        self.norm_sum += abs(self.p_scale) * float(self.p.norm())
        if self.x_good is not None:  # go back: x = x_good - s * (the direction re-applied)
            self._set_x(self.x_good - s * self.p_scale * self.p)
        self.coll_n, self.coll_losses = 0, []
        self.outcome = why
        return why
