"""Engines: the vector half of ELRA over the flat parameter buffers.

An engine owns the vectors of the algorithm (the previous direction, the retrace point, the
gradient collection) and the scalars that follow from them (``alpha``, ``lr``, the window sums of
the angle terms). Its small interface is all the optimizer uses:

``collect``      add one call's gradient into the collection (``coll += w * g``); False if the
                 gradient is not finite,
``first_step``   the very first move along the gradient (with weight decay in the
                 deterministic regime, as the reference does),
``accept_step``  an accepted step: the reductions (``<g, p>``, ``|g|^2``, and for weight decay
                 ``<x, p>``, ``<g, x>``, ``|x|^2``), the step-size update from them, the update;
                 with a non-finite gradient the engine retraces instead and says so,
``retrace``      the step-size shrink of a failed step and the move back,
``window_sums`` / ``set_grad_norm_avg``  what the 100-step control window reads and sets.

With a ``reducer`` (sharded parameters, see :mod:`elra.distributed`) the buffers hold only this
rank's shard: every sum over the parameters (the reductions of a step, ``|g|^2`` of a collected
gradient) is summed over the process group by ``reducer`` before anything is decided from it,
so all ranks compute the same scalars and each moves its own shard.

The step methods return ``True`` (done), ``False`` (the gradient was not finite) or ``None``
(not known yet: a device engine may report it later through :meth:`Engine.resolve`).
:class:`TorchEngine` implements the interface with plain torch operations (it works everywhere and
is the ground truth in tests); :class:`elra.engine_native.NativeEngine` with fused kernels.

[note: weight decay and loss scaling without touching the gradients]
The direction of a step is ``g' = inv * g + c * x`` per parameter group (``inv`` undoes loss
scaling, ``c`` is the group's weight-decay coefficient). Its reductions follow algebraically from
``<g, p>``, ``|g|^2``, ``<x, p>``, ``<g, x>`` and ``|x|^2``, so neither the user's gradients nor an
extra buffer are modified or allocated, and a fused kernel can do it in one pass.

[note: the retrace point]
After an accepted step ``x = x_good - s * d``. In the stochastic regime a retrace only halves
``s``, so ``x_good - s' * d = x + (s - s') * d`` is recovered algebraically to within a rounding
of the step itself, and no copy of ``x`` is kept (one buffer and two memory passes per step
saved). In the deterministic regime a retrace may shrink ``alpha`` by orders of magnitude; there
the rounding error of ``x + s * d`` would be large against the new step, so the engine keeps an
exact copy of ``x_good``. Half-precision buffers always keep the copy (a huge failed step can
overflow float16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .control import StepInputs
from .flat_buffer import FlatBuffer
from .stepsize import Scalars, accepted_update, retrace_update

HALF_GRAD_NORM_LIMIT = 65e3  # a larger gradient norm in fp16/bf16 counts as an overflow
_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Reductions:
    """Global reductions of one step (float64 on the host)."""

    finite: bool
    grad_norm: float = 0.0  # |g'|, the norm of the direction to apply (with decay)
    raw_grad_norm: float = 0.0  # |inv * g|, before weight decay
    gd: float = 0.0  # <g', d_prev>
    gg: float = 0.0  # |g'|^2
    coefs: Optional[list] = None  # per buffer, per segment weight-decay coefficient c


class Engine:
    """Base of all engines: vector state, its layout and the shared scalar logic."""

    name = "base"

    def __init__(self, buffers: list[FlatBuffer], *, stochastic: bool, momentum: float,
                 alpha: float, lr: float, reducer: Optional[Callable[[torch.Tensor], None]] = None,
                 num_groups: int = 1):
        self.buffers = buffers
        self.reducer = reducer  # sums a float64 tensor over the ranks in place (sharded)
        self.num_groups = int(num_groups)  # parameter groups of the optimizer (on every rank)
        self.stochastic = stochastic
        self.momentum = float(momentum)
        self.scalars = Scalars(alpha=alpha, lr=lr)
        self.dir_sqnorm = 0.0  # |d|^2 of the stored direction
        self.dir_scale = 1.0  # p = dir_scale * d (the projection, with momentum)
        self.direction = [b.new_zeros() for b in buffers]
        self.retrace_point: list[Optional[torch.Tensor]] = [
            b.new_zeros() if (not stochastic or b.dtype in _HALF) else None for b in buffers]
        self.collected: Optional[list[torch.Tensor]] = None
        self.collected_count = 0

    # --- state --------------------------------------------------------------------------------
    def vectors(self) -> dict[str, list[Optional[torch.Tensor]]]:
        """The engine's vector state by name, one flat tensor (or None) per buffer."""
        out = {"direction": list(self.direction), "retrace_point": list(self.retrace_point)}
        if self.collected is not None:
            out["collected"] = list(self.collected)
        return out

    def ensure_collection(self) -> None:
        if self.collected is None:
            self.collected = [b.new_zeros() for b in self.buffers]
            self.collected_count = 0

    def drop_collection(self) -> None:
        self.collected_count = 0

    def scalar_state(self) -> dict:
        sc = self.scalars
        return {"alpha": sc.alpha, "lr": sc.lr, "step_size": sc.step_size, "applied": sc.applied,
                "has_point": float(sc.has_point),
                "mean_angle": sc.mean_angle, "min_angle": sc.min_angle, "norm_sum": sc.norm_sum,
                "gna": sc.gna,
                "dir_sqnorm": self.dir_sqnorm, "dir_scale": self.dir_scale,
                "collected_count": self.collected_count}

    def load_scalar_state(self, d: dict) -> None:
        sc = self.scalars
        for k in ("alpha", "lr", "step_size", "mean_angle", "min_angle", "norm_sum"):
            setattr(sc, k, float(d[k]))
        sc.gna = float(d.get("gna", 0.0))
        sc.applied = float(d.get("applied", sc.step_size))
        sc.has_point = bool(d.get("has_point", 1.0))
        self.dir_sqnorm = float(d["dir_sqnorm"])
        self.dir_scale = float(d["dir_scale"])
        self.collected_count = int(d["collected_count"])

    # --- shared scalar math ------------------------------------------------------------------
    def _angle_term(self, gd: float) -> float:
        """S = <g', p> / |p|^2 with p = dir_scale * d (0 when p is zero)."""
        denom = self.dir_scale * self.dir_sqnorm
        return gd / denom if denom != 0.0 and math.isfinite(denom) else 0.0

    def _next_direction_scalars(self, red: Reductions) -> None:
        b = self.momentum
        if b == 0.0:
            self.dir_sqnorm, self.dir_scale = red.gg, 1.0
        else:
            sq = b * b * self.dir_sqnorm + 2 * b * (1 - b) * red.gd + (1 - b) ** 2 * red.gg
            g_dot_new = b * red.gd + (1 - b) * red.gg
            self.dir_sqnorm = max(sq, 0.0)
            self.dir_scale = g_dot_new / sq if sq > 0.0 else 1.0

    def p_norm(self) -> float:
        return abs(self.dir_scale) * math.sqrt(max(self.dir_sqnorm, 0.0))

    # --- interface (implemented per engine) --------------------------------------------------------
    def collect(self, weight: float, inv: float) -> bool:
        raise NotImplementedError

    def first_step(self, use_collected: bool, inv: float, wd: Optional[list[float]], booster,
                   f: float) -> Optional[bool]:
        raise NotImplementedError

    def accept_step(self, use_collected: bool, inv: float, wd: Optional[list[float]],
                    inputs: StepInputs, f: float, f_last: float, booster) -> Optional[bool]:
        raise NotImplementedError

    def retrace(self, f: float, f_last: float) -> None:
        raise NotImplementedError

    def resolve(self) -> Optional[bool]:
        """The outcome of the last step whose outcome was reported as ``None``."""
        return None

    def scratch_buffers(self) -> list[torch.Tensor]:
        """Buffers the engine owns beyond its state (``vectors``): working memory."""
        return []

    def window_sums(self) -> tuple[float, float, float]:
        """``(norm_sum, mean_angle, min_angle)`` of the current window."""
        sc = self.scalars
        return sc.norm_sum, sc.mean_angle, sc.min_angle

    def set_grad_norm_avg(self, value: float) -> None:
        """Start a new window with the given ``grad_norm_avg`` (used by weight decay)."""
        self.scalars.reset_window()
        self.scalars.gna = value

    @property
    def step_size(self) -> float:
        return self.scalars.step_size


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype in _HALF:
        return torch.dot(a.float(), b.float())
    return torch.dot(a, b)


class TorchEngine(Engine):
    """The pure-torch engine: a few whole-buffer torch operations per step, works everywhere."""

    name = "torch"

    def __init__(self, buffers: list[FlatBuffer], **kw):
        super().__init__(buffers, **kw)
        self._gprime: Optional[list[torch.Tensor]] = None  # g' with weight decay (see reduce)

    def scratch_buffers(self) -> list[torch.Tensor]:
        return list(self._gprime) if self._gprime is not None else []

    def _sources(self, use_collected: bool) -> list[torch.Tensor]:
        return self.collected if use_collected else [b.grad for b in self.buffers]

    def _grad_ok(self, gg: float) -> bool:
        if not math.isfinite(gg):
            return False
        if any(b.dtype in _HALF for b in self.buffers) and math.sqrt(gg) >= HALF_GRAD_NORM_LIMIT:
            return False
        return True

    def collect(self, weight: float, inv: float) -> bool:
        grads = [b.grad for b in self.buffers]
        if self.reducer is None:
            gg = sum(_dot(g, g).item() for g in grads) * inv * inv
        else:
            t = sum(_dot(g, g).double() for g in grads).reshape(1)
            self.reducer(t)
            gg = t.item() * inv * inv
        if not self._grad_ok(gg):
            return False
        w = weight * inv
        for c, g in zip(self.collected, grads):
            if self.collected_count == 0:
                torch.mul(g, w, out=c)
            else:
                c.add_(g, alpha=w)
        self.collected_count += 1
        return True

    def reduce(self, use_collected: bool, inv: float, wd: Optional[list[float]]) -> Reductions:
        srcs = self._sources(use_collected)
        if self.reducer is not None:
            return self._reduce_sharded(srcs, inv, wd)
        if wd is None:
            parts = [torch.stack([_dot(g, d), _dot(g, g)]) for g, d in zip(srcs, self.direction)]
            gd, gg = (sum(v) for v in zip(*(p.double().tolist() for p in parts)))
            gd, gg = gd * inv, gg * inv * inv
            if not self._grad_ok(gg):
                return Reductions(finite=False)
            n = math.sqrt(gg)
            return Reductions(True, n, n, gd, gg, None)
        # weight decay: |x| first (kappa), then g' = inv g + c x into a working buffer of the
        # engine, and <g', d>, |g'|^2 from it (fewer passes over memory than the five sums of
        # the raw vectors: 10 streams per step instead of 18)
        xs = [buf.data for buf in self.buffers]
        xx = float(sum(_dot(x, x).double() for x in xs))
        half = any(b.dtype in _HALF for b in self.buffers)
        gg_raw = None
        if half or self.scalars.gna <= 0.0:
            gg_raw = float(sum(_dot(g, g).double() for g in srcs)) * inv * inv
            if not self._grad_ok(gg_raw):
                return Reductions(finite=False)
        gna = self.scalars.gna if self.scalars.gna > 0.0 else math.sqrt(gg_raw)
        kappa = gna / math.sqrt(xx) if xx > 0.0 else 0.0
        coefs = self._fill_gprime(srcs, inv, wd, kappa)
        parts = [torch.stack([_dot(gp, d), _dot(gp, gp)]) for gp, d in zip(self._gprime,
                                                                           self.direction)]
        gd, gg = (sum(v) for v in zip(*(p.double().tolist() for p in parts)))
        if not math.isfinite(gg) or not math.isfinite(gd):
            return Reductions(finite=False)
        n = math.sqrt(max(gg, 0.0))
        return Reductions(True, n, math.sqrt(gg_raw) if gg_raw is not None else n, gd, gg, coefs)

    def _fill_gprime(self, srcs: list[torch.Tensor], inv: float, wd: list[float],
                     kappa: float) -> list[list[float]]:
        """g' = inv * g + c * x per segment into the working buffer; the coefficients c."""
        if self._gprime is None:
            self._gprime = [b.new_zeros() for b in self.buffers]
        coefs = []
        for buf, g, gp in zip(self.buffers, srcs, self._gprime):
            cs = []
            for seg in buf.segments:
                c = wd[seg.group] * kappa
                cs.append(c)
                sl = slice(seg.start, seg.end)
                if c == 0.0:
                    torch.mul(g[sl], inv, out=gp[sl])
                elif inv == 1.0:
                    torch.add(g[sl], buf.data[sl], alpha=c, out=gp[sl])
                else:
                    torch.add(buf.data[sl], g[sl], alpha=inv / c, out=gp[sl]).mul_(c)
            coefs.append(cs)
        return coefs

    def _reduce_sharded(self, srcs: list[torch.Tensor], inv: float,
                        wd: Optional[list[float]]) -> Reductions:
        """The reductions over this rank's shard, summed over the group in one all-reduce.

        Without weight decay: ``<g, d>`` and ``|g|^2``. With it, per parameter group the five raw
        sums ``<g, d>``, ``|g|^2``, ``<x, d>``, ``<g, x>``, ``|x|^2``: kappa needs the global
        ``|x|`` before ``g'`` exists, so ``<g', d>`` and ``|g'|^2`` follow algebraically (as in
        the native engine's ``finalize``).
        """
        dev = self.buffers[0].device
        if wd is None:
            acc = torch.zeros(2, dtype=torch.float64, device=dev)
            for g, d in zip(srcs, self.direction):
                acc += torch.stack([_dot(g, d), _dot(g, g)]).double()
            self.reducer(acc)
            gd, gg = acc.tolist()
            gd, gg = gd * inv, gg * inv * inv
            if not self._grad_ok(gg) or not math.isfinite(gd):
                return Reductions(finite=False)
            n = math.sqrt(gg)
            return Reductions(True, n, n, gd, gg, None)
        acc = torch.zeros(self.num_groups, 5, dtype=torch.float64, device=dev)
        for buf, g, d in zip(self.buffers, srcs, self.direction):
            x = buf.data
            for seg in buf.segments:
                sl = slice(seg.start, seg.end)
                gs, ds, xs = g[sl], d[sl], x[sl]
                acc[seg.group] += torch.stack([_dot(gs, ds), _dot(gs, gs), _dot(xs, ds),
                                               _dot(gs, xs), _dot(xs, xs)]).double()
        self.reducer(acc)
        rows = acc.tolist()
        gg_raw = sum(r[1] for r in rows) * inv * inv
        xx = sum(r[4] for r in rows)
        if not self._grad_ok(gg_raw):
            return Reductions(finite=False)
        gna = self.scalars.gna if self.scalars.gna > 0.0 else math.sqrt(gg_raw)
        kappa = gna / math.sqrt(xx) if xx > 0.0 else 0.0
        gd = gg = 0.0
        for k, r in enumerate(rows):
            c = wd[k] * kappa
            gd += inv * r[0] + c * r[2]
            gg += inv * inv * r[1] + 2.0 * c * inv * r[3] + c * c * r[4]
        if not math.isfinite(gg) or not math.isfinite(gd):
            return Reductions(finite=False)
        coefs = self._fill_gprime(srcs, inv, wd, kappa)
        gg = max(gg, 0.0)
        return Reductions(True, math.sqrt(gg), math.sqrt(gg_raw), gd, gg, coefs)

    def _write_direction(self, red: Reductions, use_collected: bool, inv: float,
                         b: float) -> None:
        """d <- b * d + (1 - b) * g' with g' = inv * g + c * x per segment (b = momentum).

        With weight decay g' is already in the working buffer (see :meth:`reduce`): without
        momentum it simply becomes the direction (the buffers swap roles).
        """
        if red.coefs is not None:
            if b == 0.0:
                self.direction, self._gprime = self._gprime, self.direction
            else:
                for d, gp in zip(self.direction, self._gprime):
                    d.mul_(b).add_(gp, alpha=1 - b)
            return
        for g, d in zip(self._sources(use_collected), self.direction):
            if b == 0.0:
                if inv == 1.0:
                    d.copy_(g)
                else:
                    torch.mul(g, inv, out=d)
            else:
                d.mul_(b).add_(g, alpha=(1 - b) * inv)

    def _move(self, step: float) -> None:
        for buf, d, xg in zip(self.buffers, self.direction, self.retrace_point):
            if xg is not None:
                xg.copy_(buf.data)
            buf.data.add_(d, alpha=-step)
        self.scalars.applied = step

    def first_step(self, use_collected, inv, wd, booster, f):
        red = self.reduce(use_collected, inv, wd)
        if not red.finite:
            return False
        if booster is not None:
            booster.update(self.buffers, f)
        self._write_direction(red, use_collected, inv, 0.0)  # the first direction is g itself
        self.dir_sqnorm, self.dir_scale = red.gg, 1.0
        self.scalars.gna = red.grad_norm
        self.scalars.step_size = self.scalars.alpha
        self._move(self.scalars.alpha)
        self.scalars.has_point = not self.stochastic
        return True

    def accept_step(self, use_collected, inv, wd, inputs, f, f_last, booster):
        red = self.reduce(use_collected, inv, wd)
        if not red.finite:
            self.retrace(f, f_last)
            return False
        if booster is not None:
            booster.update(self.buffers, f)
        S = self._angle_term(red.gd)
        step = accepted_update(self.scalars, S, red.grad_norm, inputs, self.stochastic)
        self._write_direction(red, use_collected, inv, self.momentum)
        self._next_direction_scalars(red)
        self._move(step)
        self.scalars.has_point = True
        self.scalars.norm_sum += self.p_norm()
        return True

    def retrace(self, f, f_last):
        old = self.scalars.applied
        p_sq = self.dir_scale ** 2 * self.dir_sqnorm
        new = retrace_update(self.scalars, f, f_last, p_sq, self.stochastic)
        self.scalars.norm_sum += self.p_norm()
        if not self.scalars.has_point:
            # stochastic, and no step after the first accepted yet: there is no point to go
            # back to, and x stays where the first step put it (as in the reference)
            return
        mult = new * self.dir_scale  # back along p = dir_scale * d (with momentum p != d)
        for buf, d, xg in zip(self.buffers, self.direction, self.retrace_point):
            if xg is not None:
                torch.add(xg, d, alpha=-mult, out=buf.data)
            else:
                buf.data.add_(d, alpha=old - mult)
        self.scalars.applied = mult
