"""The engine: ELRA's vector half over the flat parameter buffers, computed by the ``elra::`` ops.

The engine owns the vectors of the algorithm (the direction, the retrace point, the gradient
collection) and the scalar tensor of the ops (:mod:`elra._contract`). It calls one kernel table
(:class:`elra._ops.Kernels`: the native C++/CUDA kernels or the pure-torch ones), so the same
code drives every backend. A step is two phases, so that the host can act in between:

``first`` / ``accept``  the reductions and the step-size update (``reduce`` + ``finalize``, or
                        the one-pass ``step_fused`` + ``finalize``): the device decides, from the
                        gradient, whether the step is taken or becomes a retrace;
``outcome``             that decision, read now (``wait``) or left for later on a device;
``move``                the element-wise pass that moves the parameters (``update``, or the
                        ``fixup`` of a one-pass step when its guess was wrong).

``retrace`` is a decision and a move at once; ``collect`` adds one call's gradient to the
collection. The host (:mod:`elra.stepper`) learns an outcome late on a GPU (:meth:`resolve`).

[note: no host round trip in a normal step]
The scalars (alpha, lr, the window sums, ...) live in one float64 tensor on the parameters'
device; the host passes only what it already knows (loss-derived values and counters). Whether
the gradient was finite is decided on the device: with a non-finite gradient ``finalize`` turns
the step into a retrace and the element-wise pass moves back instead of forward. On the CPU the
host reads the scalar tensor through a NumPy view (free); on a GPU it reads it once, at the start
of the next call (:meth:`resolve`), when the device has long finished. Only the 100-step window,
checkpoints, boosting and gradient collection read device values at once.

[note: one pass for a normal stochastic step]
See the note of the same name in ``csrc/elra_math.h``: the reductions and the move run as one
pass (``step_fused``) with the step the host expects, a fix-up pass follows only when the clip or
a non-finite gradient changed it, and the engine alternates between two direction buffers. With
weight decay the pass takes |x| from the last step ([note: weight decay in one pass] there).
Used with kernels whose ``one_pass`` says it pays off, in the stochastic regime, without a kept
retrace copy (half precision) or a reducer, and not when the last step predicts the clip; the
other steps take two passes.

[note: the retrace point]
After an accepted step ``x = x_good - s * d``. In the stochastic regime a retrace only halves
``s``, so ``x_good - s' * d = x + (s - s') * d`` is recovered algebraically to within a rounding
of the step itself, and no copy of ``x`` is kept. In the deterministic regime a retrace may
shrink ``alpha`` by orders of magnitude, so the engine keeps an exact copy of ``x_good``; so do
half-precision buffers (a huge failed step can overflow float16).

[note: sharded parameters]
With a ``reducer`` (see :mod:`elra.distributed`) the buffers hold one rank's shard, and a
parameter group may have segments on some ranks and none on others. The per-segment sums of
``reduce`` are added up per parameter group, summed over the ranks in one all-reduce
(``num_groups`` x 5 float64), and handed to ``finalize`` as extra rows, one per group, while the
local rows are zeroed: ``finalize`` only ever adds rows weighted by their group's decay, so it
computes the global step size, and the decay coefficients of the local segments come out as
usual for ``update``. ``|g|^2`` of a collected gradient is summed the same way.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import numpy as np
import torch

from ._contract import (ALPHA, APPLIED, CLIP, CLIPPED, DIR_SCALE, DIR_SQ, GNA, GRAD_SQ,
                        HALF_GRAD_NORM_LIMIT, HAS_POINT, KIND_ACCEPT, KIND_ACCEPT_FUSED,
                        KIND_FIRST, KIND_RETRACE, LR, MEAN_ANGLE, MIN_ANGLE, MODE,
                        MODE_NONE, NORM_SUM, NUM_SLOTS, RED_WIDTH, ST_NONE, ST_OK, STATUS, STEP,
                        XX_CACHE)
from . import selfcheck
from ._ops import TORCH_KERNELS, Kernels, choose, kernels_for
from .flat_buffer import FlatBuffer

logger = logging.getLogger("elra")
CLIP_FORESIGHT = 0.8  # a step predicted within 80% of the clip takes the two-pass path
_NO_ROWS: list = []  # finalize's weight decay rows without decay (never changed)
_HALF = (torch.float16, torch.bfloat16)

# checkpoint keys of the scalar slots; keys older checkpoints lack get these defaults
# (None: the saved step_size)
STATE_SLOTS = {"alpha": ALPHA, "lr": LR, "step_size": STEP, "mean_angle": MEAN_ANGLE,
               "min_angle": MIN_ANGLE, "norm_sum": NORM_SUM, "gna": GNA, "dir_sqnorm": DIR_SQ,
               "dir_scale": DIR_SCALE, "applied": APPLIED, "has_point": HAS_POINT,
               "clipped": CLIPPED, "xx_cache": XX_CACHE}
_OPTIONAL = {"gna": 0.0, "applied": None, "has_point": 1.0, "clipped": 0.0, "xx_cache": -1.0}


class Engine:
    """The vectors and scalar tensor of ELRA over flat buffers of one device."""

    def __init__(self, buffers: list[FlatBuffer], kernels: Kernels, *, stochastic: bool,
                 momentum: float, alpha: float, lr: float,
                 reducer: Optional[Callable[[torch.Tensor], None]] = None, num_groups: int = 1,
                 defer: Optional[bool] = None, fuse: Optional[bool] = None):
        self.buffers, self.kernels, self.reducer = buffers, kernels, reducer
        self.stochastic, self.momentum = stochastic, float(momentum)
        devices = {b.device for b in buffers}  # the scalars live with the buffers, or on the
        dev = devices.pop() if len(devices) == 1 else torch.device("cpu")  # host for several
        self.device = dev
        self.defer = (dev.type != "cpu") if defer is None else bool(defer)
        self.direction = [b.new_zeros() for b in buffers]
        self.retrace_point: list[Optional[torch.Tensor]] = [
            b.new_zeros() if (not stochastic or b.dtype in _HALF) else None for b in buffers]
        self.collected: Optional[list[torch.Tensor]] = None
        self.collected_count = 0
        self._spare: Optional[list[torch.Tensor]] = None  # the other direction (one pass)
        scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
        scal[ALPHA], scal[LR], scal[DIR_SCALE], scal[STATUS] = alpha, lr, 1.0, ST_NONE
        self._host = scal.numpy().copy()  # the slots as last read (a device engine)
        self._scal = scal.to(dev)
        self._view = self._scal.numpy() if dev.type == "cpu" else None
        self._bounds = [[s.start for s in b.segments] + [b.segments[-1].end] for b in buffers]
        self._rows_of_groups(buffers, int(num_groups))
        self._half = any(b.dtype in _HALF for b in buffers)
        self._keep_copy = any(x is not None for x in self.retrace_point)
        want = kernels.one_pass and stochastic and not self._keep_copy and reducer is None
        self.fuse = want if fuse is None else bool(fuse)
        self._pass: Optional[tuple] = None  # the move the last decision asked for

    def _rows_of_groups(self, buffers: list[FlatBuffer], num_groups: int) -> None:
        """The rows of the reductions: one per segment of every buffer (and one per group
        when sharded, see [note: sharded parameters]), each with its group."""
        dev = self.device
        self._row_groups = [s.group for b in buffers for s in b.segments]
        offsets, off = [], 0
        for b in buffers:
            offsets.append(off)
            off += len(b.segments)
        self._nloc = off
        if self.reducer is not None:
            self._group_index = torch.tensor(self._row_groups, dtype=torch.long, device=dev)
            self._group_red = torch.zeros(num_groups, RED_WIDTH, dtype=torch.float64, device=dev)
            self._row_groups = self._row_groups + list(range(num_groups))
            off += num_groups
        self._red = torch.zeros(off * RED_WIDTH, dtype=torch.float64, device=dev)
        self._coef = torch.zeros(off, dtype=torch.float64, device=dev)
        self._red_views = [self._red[o * RED_WIDTH:(o + len(b.segments)) * RED_WIDTH]
                           for o, b in zip(offsets, buffers)]
        self._coef_views = [self._coef[o:] for o in offsets]

    @property
    def name(self) -> str:
        return self.kernels.name

    # --- reading the scalar tensor ---------------------------------------------------------------
    def _slots(self) -> np.ndarray:
        """The slots now (a device engine: one transfer)."""
        if self._view is not None:
            return self._view
        self._host = self._scal.cpu().numpy()
        if self._scal.device.type == "cpu":  # driven as a device's (tests): a copy, as on a GPU
            self._host = self._host.copy()
        return self._host

    def _known(self) -> np.ndarray:
        """The slots as known without a transfer (a device engine: as last read)."""
        return self._view if self._view is not None else self._host

    def resolve(self) -> bool:
        """Whether the last step was taken as planned (on a GPU: one transfer, made at the start
        of the next call, when the device has long finished)."""
        return int(self._slots()[STATUS]) == ST_OK

    def outcome(self, wait: bool) -> Optional[bool]:
        """The last decision: ``True`` taken, ``False`` turned into a retrace (or, first step,
        nothing), ``None`` not read yet (a deferring engine, unless ``wait``)."""
        if self.defer and not wait:
            return None
        return self.resolve()

    @property
    def step_size(self) -> float:
        """The step last applied (on a GPU: as of the last read)."""
        return float(self._known()[STEP])

    def window_sums(self) -> tuple[float, float, float]:
        """``(norm_sum, mean_angle, min_angle)`` of the current window (read at once)."""
        v = self._slots()
        return float(v[NORM_SUM]), float(v[MEAN_ANGLE]), float(v[MIN_ANGLE])

    def set_grad_norm_avg(self, value: float) -> None:
        """Start a new window with the given ``grad_norm_avg``."""
        self._scal[MEAN_ANGLE:NORM_SUM + 1].zero_()
        self._scal[GNA].fill_(value)
        if self._view is None:
            self._host[MEAN_ANGLE:NORM_SUM + 1] = 0.0
            self._host[GNA] = value

    # --- state -----------------------------------------------------------------------------------
    def vectors(self) -> dict[str, list[Optional[torch.Tensor]]]:
        """The vector state by name, one flat tensor (or None) per buffer."""
        out = {"direction": list(self.direction), "retrace_point": list(self.retrace_point)}
        if self.collected is not None:
            out["collected"] = list(self.collected)
        return out

    def scratch_buffers(self) -> list[torch.Tensor]:
        """Buffers the engine owns beyond its state (:meth:`vectors`): working memory."""
        return list(self._spare) if self._spare is not None else []

    def ensure_collection(self) -> None:
        if self.collected is None:
            self.collected = [b.new_zeros() for b in self.buffers]
            self.collected_count = 0

    def drop_collection(self) -> None:
        self.collected_count = 0

    def scalar_state(self) -> dict:
        v = self._slots()
        out = {k: float(v[i]) for k, i in STATE_SLOTS.items()}
        out["collected_count"] = self.collected_count
        return out

    def load_scalar_state(self, d: dict) -> None:
        host = self._scal.cpu()
        for k, i in STATE_SLOTS.items():
            if k in d:
                host[i] = float(d[k])
            elif k in _OPTIONAL:  # keys that older checkpoints lack
                host[i] = _OPTIONAL[k] if _OPTIONAL[k] is not None else float(d["step_size"])
            else:
                raise KeyError(k)
        self._scal.copy_(host)
        self._host = host.numpy().copy()
        self.collected_count = int(d["collected_count"])

    # --- the passes ------------------------------------------------------------------------------
    def _sources(self, use_collected: bool) -> list[torch.Tensor]:
        return self.collected if use_collected else [b.grad for b in self.buffers]

    def collect(self, weight: float, inv: float) -> bool:
        """``collected += weight * inv * g``; False (nothing counted) if the gradient is not
        finite. Reads ``|g|^2`` at once (collection is a synchronous path)."""
        first = self.collected_count == 0
        gg = 0.0
        for c, b in zip(self.collected, self.buffers):
            self.kernels.collect(c, b.grad, weight * inv, inv, first, b.dtype in _HALF, self._scal)
            gg += float(self._slots()[GRAD_SQ])
        if self.reducer is not None:  # the ranks decide from the global |g|^2
            t = torch.tensor([gg], dtype=torch.float64, device=self.device)
            self.reducer(t)
            gg = t.item()
        ok = math.isfinite(gg) and not (self._half and math.sqrt(gg) >= HALF_GRAD_NORM_LIMIT)
        if ok:
            self.collected_count += 1
        return ok

    def _reduce(self, use_collected: bool, with_x: bool) -> None:
        for buf, g, d, bounds, out in zip(self.buffers, self._sources(use_collected),
                                          self.direction, self._bounds, self._red_views):
            self.kernels.reduce(g, d, buf.data, bounds, with_x, out)
        if self.reducer is not None:  # see [note: sharded parameters]
            local = self._red[:self._nloc * RED_WIDTH].view(self._nloc, RED_WIDTH)
            self._group_red.zero_().index_add_(0, self._group_index, local)
            self.reducer(self._group_red)
            local.zero_()
            self._red[self._nloc * RED_WIDTH:].copy_(self._group_red.view(-1))

    def _finalize(self, kind: int, inv: float, wd: Optional[list[float]], growth=0.0,
                  lr_schedule=0.0, lr_warmup=0.0, f=0.0, f_last=0.0, spec=0.0) -> None:
        rows = [wd[g] for g in self._row_groups] if wd is not None else _NO_ROWS
        self.kernels.finalize(self._red, self._scal, self._coef, kind, rows, growth, lr_schedule,
                              lr_warmup, inv, self.momentum, f, f_last, spec, self.stochastic,
                              self._half, self._keep_copy)

    def first(self, use_collected: bool, inv: float, wd: Optional[list[float]]) -> None:
        """Decide the very first step: direction g' (with decay), step alpha."""
        self._reduce(use_collected, wd is not None)
        self._finalize(KIND_FIRST, inv, wd)
        self._pass = ("update", use_collected, 0.0)

    def can_fuse(self, wd: Optional[list[float]], step: float) -> bool:
        """Whether the one-pass step applies to a step expected to be ``step`` long. Not when
        the clip is likely: the pass would move by ``step`` and shift back, rounding at the scale
        of the longer move (predicted from the last step: clipped, or near the clip)."""
        if not self.fuse:
            return False
        v = self._known()
        if v[CLIPPED] or step * step * float(v[GRAD_SQ]) > (CLIP_FORESIGHT * CLIP) ** 2:
            return False
        return wd is None or bool(v[XX_CACHE] > 0.0 and v[GNA] > 0.0)

    def accept(self, use_collected: bool, inv: float, wd: Optional[list[float]], growth: float,
               lr_schedule: float, lr_warmup: float, f: float, f_last: float,
               fused_step: Optional[float] = None) -> None:
        """Decide an accepted step (the device may turn it into a retrace). ``fused_step``: take
        the one pass, which moves by this step before the decision (see :meth:`can_fuse`)."""
        if fused_step is None:
            self._reduce(use_collected, wd is not None)
            self._finalize(KIND_ACCEPT, inv, wd, growth, lr_schedule, lr_warmup, f, f_last)
            self._pass = ("update", use_collected, self.momentum)
            return
        if self._spare is None:
            self._spare = [b.new_zeros() for b in self.buffers]
        sources = self._sources(use_collected)
        for buf, g, d, dn, bounds, out in zip(self.buffers, sources, self.direction, self._spare,
                                              self._bounds, self._red_views):
            rows = [wd[s.group] for s in buf.segments] if wd is not None else []
            self.kernels.step_fused(buf.data, d, dn, g, self._scal, bounds, inv, self.momentum,
                                    fused_step, rows, out)
        self._finalize(KIND_ACCEPT_FUSED, inv, wd, growth, lr_schedule, lr_warmup, f, f_last,
                       fused_step)
        self._pass = ("fixup", use_collected, self.momentum)

    def move(self) -> None:
        """The element-wise pass of the last decision."""
        kind, use_collected, momentum = self._pass
        self._pass = None
        sources = self._sources(use_collected)
        if kind == "update":
            for buf, g, d, xg, coef, bounds in zip(self.buffers, sources, self.direction,
                                                   self.retrace_point, self._coef_views,
                                                   self._bounds):
                self.kernels.update(buf.data, d, g, xg, self._scal, coef, bounds, momentum)
            return
        if self._view is None or self._view[MODE] != MODE_NONE:  # on a CPU: only if needed
            for buf, g, d, dn, coef, bounds in zip(self.buffers, sources, self.direction,
                                                   self._spare, self._coef_views, self._bounds):
                self.kernels.fixup(buf.data, d, dn, g, self._scal, coef, bounds, momentum)
        self.direction, self._spare = self._spare, self.direction

    def retrace(self, f: float, f_last: float) -> None:
        """Shrink the step and go back to the last accepted point (point 7)."""
        self._finalize(KIND_RETRACE, 1.0, None, f=f, f_last=f_last)
        self._pass = ("update", False, self.momentum)
        self.move()


def _checked_kernels_for(device: torch.device, choice: str, dtypes: set):
    """:func:`elra._ops.kernels_for`, and native kernels on a CUDA device checked there first
    (once per device and dtype, :func:`elra.selfcheck.checked`)."""
    kernels, reason = kernels_for(device, choice)
    if reason is None:
        kernels, reason = selfcheck.checked(kernels, device, dtypes)
    return kernels, reason


def make_engine(buffers: list[FlatBuffer], choice: str, **kw) -> Engine:
    """The engine for ``buffers`` with the kernels ``choice`` asks for ("auto": the native
    ones where they can run, else pure torch; "native" raises ``RuntimeError`` where they
    cannot). Native kernels on a CUDA device pass a self-check there first (once per device,
    :mod:`elra.selfcheck`; "auto" falls back to pure torch with a warning if they fail it).
    ``kw``: the keyword arguments of :class:`Engine`."""
    devices = {b.device for b in buffers}
    rows = sum(len(b.segments) for b in buffers)
    if kw.get("reducer") is not None:
        rows += kw.get("num_groups", 1)
    dtypes = {b.dtype for b in buffers}
    kernels = choose(devices, rows, choice, lambda d, c: _checked_kernels_for(d, c, dtypes),
                     TORCH_KERNELS)
    logger.info("elra: %s kernels on %s", kernels.name, ", ".join(sorted(map(str, devices))))
    return Engine(buffers, kernels, **kw)
