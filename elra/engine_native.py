"""The native engine: ELRA's vector work in fused C++ (CPU) or CUDA kernels.

Same interface as :class:`elra.engine.TorchEngine`, computed by the ``torch.ops.elra`` operators
of ``csrc/``: per step one reduction pass, the step-size update on the device (``finalize``, the
function of ``csrc/elra_math.h`` that mirrors :mod:`elra.stepsize`), and one update pass; a
normal stochastic step folds the two passes into one (note below).

[note: no host round trip in a normal step]
The scalars (alpha, lr, the window sums, ...) live in one float64 tensor on the parameters'
device; the host passes only what it already knows (loss-derived values and counters). Whether
the gradient was finite is decided on the device too: with a non-finite gradient ``finalize``
turns the step into a retrace and the update kernel moves back instead of forward. The host
learns the outcome afterwards: on the CPU at once (reading the scalar tensor through a NumPy view
is free), on a GPU at the start of the next call (:meth:`NativeEngine.resolve`), when the
device has long finished. Only the 100-step control window, checkpoints, boosting and gradient
collection read device values synchronously.

[note: one pass for a normal stochastic step]
See the note of the same name in ``csrc/elra_math.h``: the reductions and the update run as one
pass (``step_fused``) with the step the host already knows, a fix-up pass follows only when the
clip or a non-finite gradient changed it, and the engine alternates between two direction
buffers. With weight decay the pass takes |x| from the last step (see [note: weight decay in
one pass] there). Used in the stochastic regime without boosting or a kept retrace copy (half
precision), not right after a clipped step (which predicts another clip) and, with weight decay,
only when the last step left a usable |x|; the other steps take the two-pass path (``reduce``,
``finalize``, ``update``).

[note: sharded parameters]
With a ``reducer`` (see :mod:`elra.distributed`) the buffers hold one rank's shard, and a
parameter group may have segments on some ranks and none on others. The per-segment sums of
``reduce`` are then added up per parameter group, summed over the ranks in one all-reduce
(``num_groups`` x 5 float64), and handed to ``finalize`` as extra segments, one per group,
while the local segments' rows are zeroed: ``finalize`` only ever adds rows weighted by their
group's decay, so it computes the global step size, and the decay coefficients of the local
segments come out as usual for ``update``. Sharded steps always take the two-pass path.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _native
from .control import CLIP, LR_MIN
from .engine import _HALF, HALF_GRAD_NORM_LIMIT, Engine
from .flat_buffer import FlatBuffer

CLIP_FORESIGHT = 0.8  # a step predicted within 80% of the clip takes the two-pass path

# slot indices and codes of csrc/elra_math.h
ALPHA, LR, STEP, MEAN_ANGLE, MIN_ANGLE, NORM_SUM, DIR_SQ, DIR_SCALE, GNA, STATUS = range(10)
MODE, GRAD_SQ, APPLIED, HAS_POINT, CLIPPED, XX_CACHE, NUM_SLOTS = 10, 14, 15, 16, 17, 18, 24
MODE_NONE = 0
ST_OK, ST_RETRACE, ST_BAD_GRADIENT, ST_NONE = 0, 1, 2, 3
KIND_FIRST, KIND_ACCEPT, KIND_RETRACE, KIND_ACCEPT_FUSED = 0, 1, 2, 3
MAX_SEGMENTS = 64
RED_WIDTH = 5

_STATE_SLOTS = {"alpha": ALPHA, "lr": LR, "step_size": STEP, "mean_angle": MEAN_ANGLE,
                "min_angle": MIN_ANGLE, "norm_sum": NORM_SUM, "gna": GNA,
                "dir_sqnorm": DIR_SQ, "dir_scale": DIR_SCALE, "applied": APPLIED,
                "has_point": HAS_POINT, "clipped": CLIPPED, "xx_cache": XX_CACHE}
# keys that older checkpoints (or the torch engine's) lack; None: the saved step_size
_OPTIONAL = {"gna": 0.0, "applied": None, "has_point": 1.0, "clipped": 0.0, "xx_cache": -1.0}


class NativeEngine(Engine):
    """Fused kernels over the flat buffers of one device (all buffers on that device)."""

    name = "native"

    @staticmethod
    def supports(buffers: list[FlatBuffer], extra_segments: int = 0) -> Optional[str]:
        """``None`` if this engine can drive ``buffers``, else the reason it cannot
        (``extra_segments``: the per-group rows a sharded engine adds)."""
        if _native.ops() is None:
            return f"the native kernels are not available ({_native.native_status()['error']})"
        devices = {b.device for b in buffers}
        if len(devices) != 1:
            return "the parameters live on several devices"
        dev = next(iter(devices))
        if not _native.has_kernels_for(dev):
            return f"no native kernels for {dev.type} tensors in this build"
        if sum(len(b.segments) for b in buffers) + extra_segments > MAX_SEGMENTS:
            return f"more than {MAX_SEGMENTS} parameter-group segments"
        return None

    def __init__(self, buffers: list[FlatBuffer], *, stochastic: bool, momentum: float,
                 alpha: float, lr: float, defer: Optional[bool] = None, fuse: bool = True,
                 reducer=None, num_groups: int = 1):
        super().__init__(buffers, stochastic=stochastic, momentum=momentum, alpha=alpha, lr=lr,
                         reducer=reducer, num_groups=num_groups)
        ops = _native.ops()  # the resolved overloads skip the per-call schema matching
        self._op_reduce, self._op_collect = ops.reduce.default, ops.collect.default
        self._op_finalize, self._op_update = ops.finalize.default, ops.update.default
        self._op_step_fused, self._op_fixup = ops.step_fused.default, ops.fixup.default
        dev = buffers[0].device
        self.device = dev
        self.defer = (dev.type != "cpu") if defer is None else bool(defer)
        scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
        scal[ALPHA], scal[LR], scal[DIR_SCALE], scal[STATUS] = alpha, lr, 1.0, ST_NONE
        self._scal = scal.to(dev)
        self._view = self._scal.numpy() if dev.type == "cpu" else None
        self._bounds = [[s.start for s in b.segments] + [b.segments[-1].end] for b in buffers]
        self._seg_groups = [s.group for b in buffers for s in b.segments]
        self._seg_offsets = []
        off = 0
        for b in buffers:
            self._seg_offsets.append(off)
            off += len(b.segments)
        self._nloc = off
        if reducer is not None:  # one extra row per group: the group's global sums
            self._group_index = torch.tensor(self._seg_groups, dtype=torch.long, device=dev)
            self._group_red = torch.zeros(num_groups, RED_WIDTH, dtype=torch.float64, device=dev)
            self._seg_groups = self._seg_groups + list(range(num_groups))
            off += num_groups
        self._red = torch.zeros(off * RED_WIDTH, dtype=torch.float64, device=dev)
        self._coef = torch.zeros(off, dtype=torch.float64, device=dev)
        self._red_views = [self._red[o * RED_WIDTH:(o + len(b.segments)) * RED_WIDTH]
                           for o, b in zip(self._seg_offsets, buffers)]
        self._coef_views = [self._coef[o:] for o in self._seg_offsets]
        self._no_wd = [0.0] * off
        self._half = int(any(b.dtype in _HALF for b in buffers))
        self._keep_copy = int(any(x is not None for x in self.retrace_point))
        self._last_step = alpha
        self.fuse = bool(fuse) and stochastic and not self._keep_copy and reducer is None
        self._spare: Optional[list[torch.Tensor]] = None  # the other direction buffer
        self._clipped = False  # the last accepted step was clipped (GPU: as last read)
        self._grad_sq = 0.0  # |g|^2 of the last step (GPU: as last read)
        self._xx_known = False  # XX_CACHE and GNA usable by a one-pass step with decay (GPU)

    # --- reading the device scalars ------------------------------------------------------------
    def _read(self, slot: int) -> float:
        if self._view is not None:
            return float(self._view[slot])
        return float(self._scal[slot].cpu().numpy())

    def _read_all(self):
        return self._view if self._view is not None else self._scal.cpu().numpy()

    def scalar_state(self) -> dict:
        v = self._read_all()
        out = {k: float(v[i]) for k, i in _STATE_SLOTS.items()}
        out["collected_count"] = self.collected_count
        return out

    def load_scalar_state(self, d: dict) -> None:
        host = self._scal.cpu()
        for k, i in _STATE_SLOTS.items():
            if k in d:
                host[i] = float(d[k])
            elif k in _OPTIONAL:  # keys that older checkpoints lack
                host[i] = _OPTIONAL[k] if _OPTIONAL[k] is not None else float(d["step_size"])
            else:
                raise KeyError(k)
        self._scal.copy_(host)
        self.collected_count = int(d["collected_count"])
        self._last_step = float(d["step_size"])

    @property
    def scalars(self):  # a host copy, for inspection and tests
        from .stepsize import Scalars

        v = self._read_all()
        sc = Scalars(alpha=float(v[ALPHA]), lr=float(v[LR]), step_size=float(v[STEP]),
                     mean_angle=float(v[MEAN_ANGLE]), min_angle=float(v[MIN_ANGLE]),
                     norm_sum=float(v[NORM_SUM]), gna=float(v[GNA]), applied=float(v[APPLIED]),
                     has_point=bool(v[HAS_POINT]))
        return sc

    @scalars.setter
    def scalars(self, value) -> None:  # the base class sets it once; the device holds the truth
        pass

    @property
    def dir_sqnorm(self) -> float:
        return self._read(DIR_SQ)

    @dir_sqnorm.setter
    def dir_sqnorm(self, value) -> None:
        pass

    @property
    def dir_scale(self) -> float:
        return self._read(DIR_SCALE)

    @dir_scale.setter
    def dir_scale(self, value) -> None:
        pass

    @property
    def step_size(self) -> float:
        """The step last applied (on a GPU: as of the last time it was read)."""
        if self._view is not None:
            return float(self._view[STEP])
        return self._last_step

    def window_sums(self):
        v = self._read_all()
        return float(v[NORM_SUM]), float(v[MEAN_ANGLE]), float(v[MIN_ANGLE])

    def set_grad_norm_avg(self, value: float) -> None:
        self._scal[MEAN_ANGLE:NORM_SUM + 1].zero_()
        self._scal[GNA].fill_(value)
        if value <= 0.0:
            self._xx_known = False

    def resolve(self) -> Optional[bool]:
        v = self._read_all()  # one transfer on a GPU
        if self._view is None:
            self._last_step = float(v[STEP])
            self._clipped = bool(v[CLIPPED])
            self._grad_sq = float(v[GRAD_SQ])
            self._xx_known = bool(v[XX_CACHE] > 0.0 and v[GNA] > 0.0)
        return int(v[STATUS]) == ST_OK

    def scratch_buffers(self) -> list[torch.Tensor]:
        return list(self._spare) if self._spare is not None else []

    # --- the steps -----------------------------------------------------------------------------
    def _sources(self, use_collected: bool) -> list[torch.Tensor]:
        return self.collected if use_collected else [b.grad for b in self.buffers]

    def _finalize(self, kind: int, inv: float, wd: Optional[list[float]], growth=0.0,
                  lr_schedule=0.0, lr_warmup=0.0, f=0.0, f_last=0.0, spec=0.0) -> None:
        with_x = wd is not None
        params = [growth, lr_schedule, lr_warmup, inv, self.momentum, f, f_last,
                  float(self.stochastic), float(kind), float(with_x), float(self._half),
                  float(self._keep_copy), spec]
        wdl = [wd[g] for g in self._seg_groups] if with_x else self._no_wd
        self._op_finalize(self._red, self._scal, self._coef, params, wdl)

    def _reduce(self, use_collected: bool, with_x: bool) -> None:
        for buf, g, d, bounds, out in zip(self.buffers, self._sources(use_collected),
                                          self.direction, self._bounds, self._red_views):
            self._op_reduce(g, d, buf.data, bounds, with_x, out)
        if self.reducer is not None:  # see [note: sharded parameters]
            local = self._red[:self._nloc * RED_WIDTH].view(self._nloc, RED_WIDTH)
            self._group_red.zero_().index_add_(0, self._group_index, local)
            self.reducer(self._group_red)
            local.zero_()
            self._red[self._nloc * RED_WIDTH:].copy_(self._group_red.view(-1))

    def _update(self, use_collected: bool, momentum: float) -> None:
        for buf, g, d, xg, coef, bounds in zip(self.buffers, self._sources(use_collected),
                                               self.direction, self.retrace_point,
                                               self._coef_views, self._bounds):
            self._op_update(buf.data, d, g, xg, self._scal, coef, bounds, momentum)

    def _outcome(self, booster, f: float) -> Optional[bool]:
        """Read the status now when it is free or needed (boosting); else leave it for later."""
        if self.defer and booster is None:
            return None
        ok = int(self._read(STATUS)) == ST_OK
        if ok and booster is not None:
            booster.update(self.buffers, f)
        return ok

    def collect(self, weight: float, inv: float) -> bool:
        first = self.collected_count == 0
        ok = True
        gg = 0.0
        for c, b in zip(self.collected, self.buffers):
            self._op_collect(c, b.grad, weight * inv, inv, first, b.dtype in _HALF, self._scal)
            ok = ok and int(self._read(STATUS)) == ST_OK
            if self.reducer is not None:
                gg += self._read(GRAD_SQ)
        if self.reducer is not None:  # the ranks decide from the global |g|^2
            t = torch.tensor([gg], dtype=torch.float64, device=self.device)
            self.reducer(t)
            gg = t.item()
            ok = math.isfinite(gg) and not (self._half and math.sqrt(gg) >= HALF_GRAD_NORM_LIMIT)
        if ok:
            self.collected_count += 1
        return ok

    def first_step(self, use_collected, inv, wd, booster, f):
        self._reduce(use_collected, wd is not None)
        self._finalize(KIND_FIRST, inv, wd)
        done = self._outcome(booster, f)
        self._update(use_collected, 0.0)
        return done

    def _fusable(self, wd, booster, spec: float) -> bool:
        """Whether the one-pass step applies. Not when the clip is likely: the pass would move
        by ``spec`` and shift back, rounding at the scale of the longer move (predicted from
        the last step: it was clipped, or ``spec`` times its |g| is near the clip)."""
        if not self.fuse or booster is not None:
            return False
        v = self._view
        clipped, grad_sq = (bool(v[CLIPPED]), float(v[GRAD_SQ])) if v is not None else (
            self._clipped, self._grad_sq)
        if clipped or spec * spec * grad_sq > (CLIP_FORESIGHT * CLIP) ** 2:
            return False
        if wd is None:
            return True
        return bool(v[XX_CACHE] > 0.0 and v[GNA] > 0.0) if v is not None else self._xx_known

    def accept_step(self, use_collected, inv, wd, inputs, f, f_last, booster):
        # the step finalize will choose unless the clip or a bad gradient intervenes (as there)
        spec = inputs.lr_schedule if inputs.lr_schedule < inputs.lr_warmup else inputs.lr_warmup
        spec = LR_MIN if spec < LR_MIN else spec
        if self._fusable(wd, booster, spec):
            return self._accept_fused(use_collected, inv, wd, inputs, f, f_last, spec)
        self._reduce(use_collected, wd is not None)
        self._finalize(KIND_ACCEPT, inv, wd, inputs.growth, inputs.lr_schedule, inputs.lr_warmup,
                       f, f_last)
        done = self._outcome(booster, f)
        self._update(use_collected, self.momentum)
        return done

    def _accept_fused(self, use_collected, inv, wd, inputs, f, f_last, spec) -> Optional[bool]:
        if self._spare is None:
            self._spare = [b.new_zeros() for b in self.buffers]
        sources = self._sources(use_collected)
        for buf, g, d, dn, bounds, out in zip(self.buffers, sources, self.direction,
                                              self._spare, self._bounds, self._red_views):
            wdl = [wd[s.group] for s in buf.segments] if wd is not None else []
            self._op_step_fused(buf.data, d, dn, g, self._scal, bounds, inv, self.momentum, spec,
                                wdl, out)
        self._finalize(KIND_ACCEPT_FUSED, inv, wd, inputs.growth, inputs.lr_schedule,
                       inputs.lr_warmup, f, f_last, spec)
        if self._view is None or self._view[MODE] != MODE_NONE:  # on a CPU: only if needed
            for buf, g, d, dn, coef, bounds in zip(self.buffers, sources, self.direction,
                                                   self._spare, self._coef_views, self._bounds):
                self._op_fixup(buf.data, d, dn, g, self._scal, coef, bounds, self.momentum)
        self.direction, self._spare = self._spare, self.direction
        return self._outcome(None, f)

    def retrace(self, f, f_last):
        self._finalize(KIND_RETRACE, 1.0, None, f=f, f_last=f_last)
        self._update(False, self.momentum)
