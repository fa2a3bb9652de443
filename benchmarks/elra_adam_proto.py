"""ElraAdam research prototype: ELRA's angle test on a long-horizon drift of Adam's steps.

One global step size ``alpha`` multiplies Adam's bias-corrected direction ``u = m_hat / (sqrt(v_hat)
+ eps)``. It is tuned on line by the ELRA question "does the new gradient still point along the way we
have been going?", asked of the long-horizon, step-weighted drift ``D`` of the applied steps, and
answered with a smoothed exponential change of at most x1.02 per step. There is no learning rate to
set; ``alpha0`` (default 1e-3, Adam's default learning rate) is only the first step.

This is the research prototype of ``benchmarks/results/elra_adam_research.md`` (that log has every
variant tried and every number). The production version will live on the package's flat buffer.

The recommended rule (the defaults)
-----------------------------------
State per parameter: Adam's ``m``, ``v`` and the drift ``D`` (3 buffers; Adam has 2). Scalars:
``alpha``, the smoothed reductions ``C``, ``N``, the step-weight sums ``A``, ``Z``, the step count
``t``, the running peak of ``alpha`` per step (for the growth cap) and the loss guard.

Constants: ``alpha0 = 1e-3``, ``kappa = 0.02``, ``beta1 = 0.9``, ``beta2 = 0.999``, ``eps = 1e-8``,
``beta_s = 0.9``, horizon ``H = 1000`` (``beta_a = 1 - 1/H``), ratio clipped to ``[-1, 1]``, growth
cap ``2``, ``alpha`` kept in ``[1e-9, 1e4]``::

    step(g, f):
        if guard.bad(f) or g is not finite:            # retrace
            alpha = alpha / 4
            if the previous call was not a retrace:    # back to the last good point, exactly
                x = (x + alpha_prev u_prev) / (1 - alpha_prev wd)
                D = (D + alpha_prev u_prev) / beta_a ;  A = (A - alpha_prev) / beta_a ;  Z = (Z - 1) / beta_a
            return                                     # (u_prev is recomputed from m, v: no buffer)
        guard.update(f);  t = t + 1
        m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g*g
        s = 1 / (sqrt(v / (1 - beta2^t)) + eps)                     # element-wise, this step's v
        c = -<g, D> * Z / A      (0 at t = 1)  # D as before this step, in units of its mean step
        n = <g, s*g>
        C = beta_s C + (1 - beta_s) c ;  N = beta_s N + (1 - beta_s) n
        if t > 1 and N > 0:
            r = clip(C / N, -1, 1)
            alpha_new = alpha * exp(kappa r)
            if r > 0:                                  # stop late growth:
                alpha_new = min(alpha_new, max(alpha, 2 * max(alpha_1 .. alpha_floor(t/2))))
            alpha = clamp(alpha_new, 1e-9, 1e4)
        u = (m / (1 - beta1^t)) * s
        x = x (1 - alpha wd) - alpha u                # decoupled weight decay (AdamW), wd = 0 default
        D = beta_a D - alpha u ;  A = beta_a A + alpha ;  Z = beta_a Z + 1

``alpha_k`` is the step applied at step k. The recommended variant (``one_pass=True``, the default)
applies last step's ``alpha``: ``u`` and the parameters use the ``alpha`` of before this step's
``C``, ``N`` update, which then takes effect from the next step on, so that the reductions and the
update share one pass over the parameters. ``one_pass=False`` is the two-pass rule as written above;
the two are indistinguishable in the measurements (research log, section 3).

Guard (``LossGuard``): exponential moving mean and variance of the accepted losses (``beta =
0.95``), active after 20 losses; a loss is bad if it is not finite or above all of ``2 mean``,
``mean + 6 sd`` and ``f_first`` (the first loss seen: the page had ``0.25 f_first``, which retraced
ordinary mini-batch outliers once the loss was small, at batch 16 until ``alpha`` reached its floor;
see the research log). With a bare ``step()`` (no loss) only a non-finite gradient retraces. A
non-finite value is never written into the parameters.

Why the pieces: the angle test on a long horizon (not on consecutive gradients, whose anti-correlation
near the noise floor collapses the step); the step-weighted drift, so that the memory of the large
early steps fades with their weight; the cap, because on classifiers that fit their training set the
drift keeps pointing one way (logit growth) and ``alpha`` otherwise climbs late, 2-3x above its
earlier peak, until the fit breaks (digits, MNIST-1D). The cap lets ``alpha`` at most double each
time ``t`` doubles once the early climb is over, and never binds on the language models measured.

Research switches (keyword arguments, not for users): ``drift`` ("step" as above, "direction" = the
page's variant A: ``D = beta_a D - u``, no ``A/Z`` scaling), horizon ``H = min(h_max, max(h_min,
h_frac t))`` (variant A: ``h_min=100, h_frac=0.5``), ``growth_cap`` (None: no cap), ``gate`` and
``slow_beta`` (two other ways to stop late growth, measured and rejected), ``one_pass``, ``guard``
(False: only non-finite values retrace), ``guard_first`` (the guard's ``f_first`` factor),
``retrace_factor``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """sum_i <xs[i], ys[i]> as a Python float."""
    return float(torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1))
                              for x, y in zip(xs, ys)]).sum())


class LossGuard:
    """Exponential moving mean and variance of the accepted losses; a loss is bad if it is not
    finite, or (once ``warm`` losses were seen) above all of ``k_mean * mean``,
    ``mean + k_sd * sd`` and ``k_first * first``."""

    def __init__(self, beta: float = 0.95, warm: int = 20, k_mean: float = 2.0, k_sd: float = 6.0,
                 k_first: float = 1.0) -> None:
        self.beta, self.warm, self.k_mean, self.k_sd, self.k_first = beta, warm, k_mean, k_sd, k_first
        self.count, self.mean, self.var, self.first = 0, 0.0, 0.0, 0.0

    def bad(self, f: float) -> bool:
        if not math.isfinite(f):
            return True
        if self.count < self.warm:
            return False
        sd = math.sqrt(max(self.var, 0.0))
        return f > max(self.k_mean * self.mean, self.mean + self.k_sd * sd, self.k_first * self.first)

    def update(self, f: float) -> None:
        self.count += 1
        if self.count == 1:
            self.mean, self.var, self.first = f, 0.0, f
            return
        d = f - self.mean
        self.mean += (1 - self.beta) * d
        self.var = self.beta * (self.var + (1 - self.beta) * d * d)

    def state_dict(self) -> dict:
        return dict(count=self.count, mean=self.mean, var=self.var, first=self.first)

    def load_state_dict(self, s: dict) -> None:
        self.count, self.mean, self.var, self.first = s["count"], s["mean"], s["var"], s["first"]


class ElraAdamProto(torch.optim.Optimizer):
    """See the module docstring. Research switches are keyword arguments; the defaults are the
    recommended configuration."""

    def __init__(self, params, alpha0: float = 1e-3, *, weight_decay: float = 0.0,
                 kappa: float = 0.02, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 beta_s: float = 0.9, h_min: float = 1000.0, h_frac: float = 0.0,
                 h_max: float = math.inf, drift: str = "step", one_pass: bool = True,
                 growth_cap: Optional[float] = 2.0, gate: Optional[float] = None,
                 ratio_clip: float = 1.0, slow_beta: Optional[float] = None, guard: bool = True,
                 guard_first: float = 1.0, retrace_factor: float = 0.25,
                 alpha_min: float = 1e-9, alpha_max: float = 1e4) -> None:
        if not alpha0 > 0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if drift not in ("direction", "step"):
            raise ValueError(f"drift must be 'direction' or 'step', got {drift!r}")
        super().__init__(params, dict(lr=alpha0, weight_decay=weight_decay))
        self.cfg = dict(kappa=kappa, beta1=betas[0], beta2=betas[1], eps=eps, beta_s=beta_s,
                        h_min=h_min, h_frac=h_frac, h_max=h_max, drift=drift, one_pass=one_pass,
                        growth_cap=growth_cap, gate=gate, ratio_clip=ratio_clip, slow_beta=slow_beta, guard=guard,
                        alpha_min=alpha_min, alpha_max=alpha_max, retrace_factor=retrace_factor)
        # global scalars: one step size for all parameters
        self.sc = dict(alpha=alpha0, alpha_prev=alpha0, C=0.0, N=0.0, t=0, A=0.0, Z=0.0,
                       peak=alpha0, pos=1.0, R=0.0, Rw=0.0, prev_retrace=False, beta_a_prev=1.0)
        self.loss_guard = LossGuard(k_first=guard_first)
        self.retraces = 0
        self.last_outcome = "none"
        self.peaks: list[float] = []
        self.trace: list[tuple] = []  # (t, alpha, C/N) per accepted step, for the research log

    # --- helpers -------------------------------------------------------------------------------
    def _params(self):
        out = []
        for grp in self.param_groups:
            for p in grp["params"]:
                if p.grad is not None:
                    out.append((grp, p))
        return out

    def _set_lr(self) -> None:
        for grp in self.param_groups:
            grp["lr"] = self.sc["alpha"]

    def _buffers(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["D"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _direction(self, ms, vs, t: int) -> list[torch.Tensor]:
        """u = m_hat / (sqrt(v_hat) + eps), bias corrections of step t."""
        c = self.cfg
        bc1, bc2 = 1 - c["beta1"] ** t, 1 - c["beta2"] ** t
        den = torch._foreach_sqrt(vs)
        torch._foreach_div_(den, math.sqrt(bc2))
        torch._foreach_add_(den, c["eps"])
        u = torch._foreach_div(ms, den)
        torch._foreach_div_(u, bc1)
        return u

    # --- retrace -------------------------------------------------------------------------------
    def _retrace(self, reason: str) -> None:
        sc, cfg = self.sc, self.cfg
        self.retraces += 1
        self.last_outcome = reason
        if not sc["prev_retrace"] and sc["t"] > 0:
            # back to the last good point: undo x_{t+1} = x_t (1 - a wd) - a u, D = b D - w u
            a, t = sc["alpha_prev"], sc["t"]
            for grp in self.param_groups:
                ps = [p for p in grp["params"] if p in self.state and self.state[p]]
                if not ps:
                    continue
                ms = [self.state[p]["m"] for p in ps]
                vs = [self.state[p]["v"] for p in ps]
                Ds = [self.state[p]["D"] for p in ps]
                u = self._direction(ms, vs, t)
                with torch.no_grad():
                    torch._foreach_add_(ps, u, alpha=a)
                    if grp["weight_decay"]:
                        torch._foreach_div_(ps, 1 - a * grp["weight_decay"])
                w = a if cfg["drift"] == "step" else 1.0
                torch._foreach_add_(Ds, u, alpha=w)
                torch._foreach_div_(Ds, sc["beta_a_prev"])
            if cfg["drift"] == "step":
                sc["A"] = (sc["A"] - a) / sc["beta_a_prev"]
                sc["Z"] = (sc["Z"] - 1) / sc["beta_a_prev"]
        sc["alpha"] = max(sc["alpha"] * cfg["retrace_factor"], cfg["alpha_min"])
        sc["prev_retrace"] = True
        self._set_lr()

    # --- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, loss: Union[float, torch.Tensor, Callable, None] = None):
        ret = None
        if callable(loss):
            with torch.enable_grad():
                ret = loss()
            loss = ret
        f = None if loss is None else float(loss)
        sc, cfg = self.sc, self.cfg
        items = self._params()
        if not items:
            return ret
        grads = [p.grad for _, p in items]
        gfinite = math.isfinite(float(torch.stack(torch._foreach_norm(grads)).sum())) \
            if grads else True
        if not gfinite:
            self._retrace("retrace_gradient")
            return ret
        if f is not None and cfg["guard"] and self.loss_guard.bad(f):
            self._retrace("retrace_loss")
            return ret
        if f is not None:
            self.loss_guard.update(f)
        sc["prev_retrace"] = False
        sc["t"] += 1
        t = sc["t"]
        b1, b2 = cfg["beta1"], cfg["beta2"]
        bc2 = 1 - b2 ** t
        # pass 1: moments, and the two reductions c = -<g, D>, n = <g, s g>
        cdot, ndot = 0.0, 0.0
        per_group = []
        for grp in self.param_groups:
            ps = [p for p in grp["params"] if p.grad is not None]
            if not ps:
                continue
            st = [self._buffers(p) for p in ps]
            gs = [p.grad for p in ps]
            ms, vs, Ds = [s["m"] for s in st], [s["v"] for s in st], [s["D"] for s in st]
            if t > 1:
                cdot -= _dot(gs, Ds)
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
            den = torch._foreach_sqrt(vs)
            torch._foreach_div_(den, math.sqrt(bc2))
            torch._foreach_add_(den, cfg["eps"])
            sg = torch._foreach_div(gs, den)
            ndot += _dot(sg, gs)
            per_group.append((grp, ps, ms, vs, Ds))
        # step size
        if cfg["drift"] == "step" and sc["A"] > 0:
            cdot *= sc["Z"] / sc["A"]  # in units of the mean step stored in D
        bs = cfg["beta_s"]
        sc["C"] = bs * sc["C"] + (1 - bs) * cdot
        sc["N"] = bs * sc["N"] + (1 - bs) * ndot
        ratio = None
        alpha_used = sc["alpha"]  # one pass: this step uses last step's alpha
        if t > 1 and sc["N"] > 0:
            rc = cfg["ratio_clip"]
            ratio = max(-rc, min(rc, sc["C"] / sc["N"]))
            H = min(cfg["h_max"], max(cfg["h_min"], cfg["h_frac"] * t))
            if cfg["slow_beta"] is not None:  # grow only as fast as the slow mean ratio says
                sb = cfg["slow_beta"]
                sc["R"] = sb * sc["R"] + (1 - sb) * ratio
                sc["Rw"] = sb * sc["Rw"] + (1 - sb)
                ratio = min(ratio, sc["R"] / sc["Rw"])
            if cfg["gate"] is not None:  # fraction of positive ratios over the horizon
                sc["pos"] += (float(ratio > 0) - sc["pos"]) / H
                if ratio > 0 and sc["pos"] < cfg["gate"]:
                    ratio = 0.0
            new = sc["alpha"] * math.exp(cfg["kappa"] * ratio)
            if cfg["growth_cap"] is not None and ratio > 0 and t >= 2:
                # at most growth_cap x the largest step of the first half of the run
                new = min(new, max(sc["alpha"], cfg["growth_cap"] * self.peaks[t // 2 - 1]))
            sc["alpha"] = min(max(new, cfg["alpha_min"]), cfg["alpha_max"])
        if not cfg["one_pass"]:
            alpha_used = sc["alpha"]
        sc["peak"] = max(sc["peak"], alpha_used)
        self.peaks.append(sc["peak"])  # peaks[k] = largest step of steps 1..k+1
        # pass 2: x and the drift
        H = min(cfg["h_max"], max(cfg["h_min"], cfg["h_frac"] * t))
        beta_a = 1 - 1 / H
        for grp, ps, ms, vs, Ds in per_group:
            u = self._direction(ms, vs, t)
            if grp["weight_decay"]:
                torch._foreach_mul_(ps, 1 - alpha_used * grp["weight_decay"])
            torch._foreach_add_(ps, u, alpha=-alpha_used)
            torch._foreach_mul_(Ds, beta_a)
            torch._foreach_add_(Ds, u, alpha=-(alpha_used if cfg["drift"] == "step" else 1.0))
        if cfg["drift"] == "step":
            sc["A"] = beta_a * sc["A"] + alpha_used
            sc["Z"] = beta_a * sc["Z"] + 1
        sc["alpha_prev"], sc["beta_a_prev"] = alpha_used, beta_a
        self.trace.append((t, alpha_used, ratio))
        self.last_outcome = "accepted"
        self._set_lr()
        return ret

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["elra_adam"] = dict(sc=dict(self.sc), guard=self.loss_guard.state_dict(),
                               retraces=self.retraces, peaks=list(self.peaks))
        return sd

    def load_state_dict(self, sd: dict) -> None:
        sd = dict(sd)
        extra = sd.pop("elra_adam")
        super().load_state_dict(sd)
        self.sc = dict(extra["sc"])
        self.loss_guard.load_state_dict(extra["guard"])
        self.retraces = extra["retraces"]
        self.peaks = list(extra["peaks"])
