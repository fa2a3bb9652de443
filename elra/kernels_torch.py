"""The pure-torch kernel of each ``elra::`` op: works on every device, needs no compiler.

Each function here implements one op of the contract (:mod:`elra._ops` has the schemas) with
the semantics of the C++ and CUDA kernels of ``csrc/``: same arguments, same slots of the scalar
tensor (:mod:`elra._contract`), same outcome codes. ``finalize`` is the step-size update of
``csrc/elra_math.h`` written again in Python floats, in the same order of operations, so that it
gives the same doubles. The element-wise ops are a few whole-buffer torch operations each.

The scalar tensor is read and written on the host: free on the CPU, one transfer each way per
op on another device (this path is the fallback there; the native kernels keep a normal step on
the device). The argument checks only look at metadata, so the fake (meta) kernels of
:mod:`elra._ops` use them too; the engine, which builds its arguments itself, calls the ops
without them (``UNCHECKED``: a few microseconds a step).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ._contract import (ALPHA, ALPHA_MAX, ALPHA_MIN, ANGLE_CAP, APPLIED, CLIP, CLIPPED, DIR_SCALE,
                        DIR_SQ, GNA, GRAD_SQ, HALF_GRAD_NORM_LIMIT, HAS_POINT, INV, KAPPA_TOLERANCE,
                        KIND_ACCEPT_FUSED, KIND_FIRST, KIND_RETRACE, LR, LR_MIN,
                        MEAN_ANGLE, MIN_ANGLE, MODE, MODE_NONE, MODE_REDO, MODE_RETRACE_ALGEBRAIC,
                        MODE_RETRACE_COPY, MODE_SHIFT, MODE_STEP, MODE_UNDO_RETRACE, MOVE_S, MOVE_T,
                        NORM_SUM, NUM_SLOTS, RED_WIDTH, RETRACE_ALPHA_MIN, RETRACE_FALLBACK_SHRINK,
                        ST_BAD_GRADIENT, ST_OK, ST_RETRACE, STATUS, STEP, XX_CACHE)

_HALF = (torch.float16, torch.bfloat16)


# --- argument checks (metadata only) -----------------------------------------------------------
def _fail(msg: str) -> None:
    raise RuntimeError(f"elra: {msg}")


def check_buffers(**named: torch.Tensor) -> None:
    """Flat contiguous buffers of one dtype, size and device (the first names the others)."""
    (n0, t0), *rest = named.items()
    for name, t in named.items():
        if t.dim() != 1 or not t.is_contiguous():
            _fail(f"{name} must be a contiguous 1-d tensor, got shape {list(t.shape)}")
    for name, t in rest:
        if t.device != t0.device:
            _fail(f"{name} must be on {t0.device}, got {t.device}")
        if t.dtype != t0.dtype:
            _fail(f"{name} has dtype {t.dtype}, {n0} has {t0.dtype}: the buffers must share a dtype")
        if t.numel() != t0.numel():
            _fail(f"size mismatch: {name} has {t.numel()} elements, {n0} has {t0.numel()}")


def check_doubles(t: torch.Tensor, name: str, min_numel: int, device: torch.device) -> None:
    """A float64 tensor of the ops' scalars: on the buffers' device, or on the CPU (these
    kernels keep the scalars on the host anyway; so buffers on several devices share them)."""
    if t.device != device and t.device.type != "cpu":
        _fail(f"{name} must be on {device} or the CPU, got {t.device}")
    if t.dtype != torch.float64 or not t.is_contiguous() or t.numel() < min_numel:
        _fail(f"{name} must be a contiguous float64 tensor of at least {min_numel} elements")


def check_bounds(bounds: Sequence[int], numel: int) -> int:
    """The number of segments of ``bounds`` (checked: 0 = b0 <= b1 <= ... = numel). These
    kernels take any number of segments; the native ones at most ``MAX_SEGMENTS``."""
    if len(bounds) < 2:
        _fail("bounds need at least two entries")
    if bounds[0] != 0 or bounds[-1] != numel:
        _fail(f"bounds must cover [0, {numel})")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        _fail("bounds must be non-decreasing")
    return len(bounds) - 1


def check_reduce(g, d, x, bounds, with_x, out) -> int:
    check_buffers(g=g, d=d, x=x)
    nseg = check_bounds(bounds, g.numel())
    check_doubles(out, "out", nseg * RED_WIDTH, g.device)
    return nseg


def check_collect(coll, g, weight, inv, first, half, scal) -> None:
    check_buffers(coll=coll, g=g)
    check_doubles(scal, "scal", NUM_SLOTS, g.device)


def check_finalize(red, scal, coef, kind, wd, *_) -> int:
    check_doubles(scal, "scal", NUM_SLOTS, scal.device)
    if red.device != scal.device or red.dtype != torch.float64 or red.dim() != 1 or \
            not red.is_contiguous() or red.numel() == 0 or red.numel() % RED_WIDTH:
        _fail(f"red must be a contiguous float64 tensor of nseg * {RED_WIDTH} elements "
              f"(nseg >= 1) on the device of scal, got {red.numel()} on {red.device}")
    nseg = red.numel() // RED_WIDTH
    check_doubles(coef, "coef", nseg, scal.device)
    if len(wd) not in (0, nseg):
        _fail(f"wd needs one entry per segment (or none), got {len(wd)} for {nseg} segments")
    if not KIND_FIRST <= kind <= KIND_ACCEPT_FUSED:
        _fail(f"unknown kind {kind}")
    return nseg


def check_update(x, d, g, xg, scal, coef, bounds, momentum=0.0) -> int:
    if xg is None:
        check_buffers(x=x, d=d, g=g)
    else:
        check_buffers(x=x, d=d, g=g, xg=xg)
    nseg = check_bounds(bounds, x.numel())
    check_doubles(scal, "scal", NUM_SLOTS, x.device)
    check_doubles(coef, "coef", nseg, x.device)
    return nseg


def check_step_fused(x, d_prev, d_new, g, scal, bounds, inv, momentum, step, wd, out) -> int:
    check_buffers(x=x, d_prev=d_prev, d_new=d_new, g=g)
    if x.numel() and not isinstance(x, FakeTensor) and x.device.type != "meta" and \
            d_new.data_ptr() in (d_prev.data_ptr(), x.data_ptr(), g.data_ptr()):
        _fail("d_new must be a buffer of its own")
    nseg = check_bounds(bounds, x.numel())
    if len(wd) not in (0, nseg):
        _fail(f"wd needs one entry per segment (or none), got {len(wd)} for {nseg} segments")
    check_doubles(scal, "scal", NUM_SLOTS, x.device)
    check_doubles(out, "out", nseg * RED_WIDTH, x.device)
    return nseg


def check_fixup(x, d_prev, d_new, g, scal, coef, bounds, momentum=0.0) -> int:
    check_buffers(x=x, d_prev=d_prev, d_new=d_new, g=g)
    nseg = check_bounds(bounds, x.numel())
    check_doubles(scal, "scal", NUM_SLOTS, x.device)
    check_doubles(coef, "coef", nseg, x.device)
    return nseg


# --- host access to the float64 tensors ------------------------------------------------------------
def _store(t: torch.Tensor, values: list) -> None:
    """``t[:len(values)] = values`` (a float64 tensor)."""
    if t.is_cpu:
        t.numpy()[:len(values)] = values
    else:
        t[:len(values)].copy_(torch.tensor(values, dtype=torch.float64))


def _put(t: torch.Tensor, items: dict) -> None:
    """``t[i] = v`` for the ``{i: v}`` of ``items`` (a float64 tensor)."""
    v = t.numpy() if t.is_cpu else t
    for i, value in items.items():
        v[i] = value


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.float(), b.float()) if a.dtype in _HALF else torch.dot(a, b)


def _segments(bounds: Sequence[int]):
    return zip(bounds, bounds[1:])


# --- the ops ---------------------------------------------------------------------------------------
def reduce(g: torch.Tensor, d: torch.Tensor, x: torch.Tensor, bounds: Sequence[int],
           with_x: bool, out: torch.Tensor) -> None:
    """``out[5k:5k+5] = <g,d>, |g|^2, <x,d>, <g,x>, |x|^2`` over segment k (x terms 0 unless
    ``with_x``)."""
    check_reduce(g, d, x, bounds, with_x, out)
    _reduce(g, d, x, bounds, with_x, out)


def _reduce(g, d, x, bounds, with_x, out) -> None:
    nseg = len(bounds) - 1
    if nseg == 1 and not with_x and out.is_cpu:  # the common case, short
        gd, gg = torch.stack((_dot(g, d), _dot(g, g))).tolist()
        out.numpy()[:RED_WIDTH] = (gd, gg, 0.0, 0.0, 0.0)
        return
    whole = nseg == 1  # no slicing: one segment is the whole buffer
    parts = []
    for a, b in _segments(bounds):
        gs, ds = (g, d) if whole else (g[a:b], d[a:b])
        parts += [_dot(gs, ds), _dot(gs, gs)]
        if with_x:
            xs = x if whole else x[a:b]
            parts += [_dot(xs, ds), _dot(gs, xs), _dot(xs, xs)]
    sums = torch.stack(parts)
    if with_x:
        out[:nseg * RED_WIDTH].copy_(sums)
    elif out.is_cpu:  # the sums to the host (free on the CPU), the zeros with them
        v = sums.tolist()
        _store(out, [t for k in range(nseg) for t in (v[2 * k], v[2 * k + 1], 0.0, 0.0, 0.0)])
    else:
        rows = out[:nseg * RED_WIDTH].view(nseg, RED_WIDTH)
        rows[:, 2:].zero_()
        rows[:, :2].copy_(sums.view(nseg, 2))


def collect(coll: torch.Tensor, g: torch.Tensor, weight: float, inv: float, first: bool,
            half: bool, scal: torch.Tensor) -> None:
    """``coll <- (first ? 0 : coll) + weight g``; ``|inv g|^2`` and the status into ``scal``."""
    check_collect(coll, g, weight, inv, first, half, scal)
    _collect(coll, g, weight, inv, first, half, scal)


def _collect(coll, g, weight, inv, first, half, scal) -> None:
    gg = float(_dot(g, g)) * (inv * inv)
    if first:
        torch.mul(g, weight, out=coll)
    else:
        coll.add_(g, alpha=weight)
    ok = math.isfinite(gg) and not (half and math.sqrt(gg) >= HALF_GRAD_NORM_LIMIT)
    _put(scal, {GRAD_SQ: gg, STATUS: float(ST_OK if ok else ST_BAD_GRADIENT)})


def finalize(red: torch.Tensor, scal: torch.Tensor, coef: torch.Tensor, kind: int,
             wd: Sequence[float], growth: float, lr_schedule: float, lr_warmup: float, inv: float,
             momentum: float, f: float, f_last: float, spec: float, stochastic: bool,
             half: bool, keep_copy: bool) -> None:
    """The step-size update of one call (``finalize`` of ``csrc/elra_math.h``)."""
    check_finalize(red, scal, coef, kind, wd)
    _finalize_op(red, scal, coef, kind, wd, growth, lr_schedule, lr_warmup, inv, momentum, f,
                 f_last, spec, stochastic, half, keep_copy)


def _finalize_op(red, scal, coef, kind, wd, growth, lr_schedule, lr_warmup, inv, momentum, f,
                 f_last, spec, stochastic, half, keep_copy) -> None:
    s = scal.tolist()
    nseg = red.numel() // RED_WIDTH
    c = [0.0] * nseg
    p = _Params(growth, lr_schedule, lr_warmup, inv, momentum, f, f_last, spec, stochastic,
                half, keep_copy, wd)
    _finalize(red.tolist(), s, c, kind, p)
    _store(scal, s)
    if coef.tolist()[:nseg] != c:  # mostly unchanged (no decay: zeros), and reading is cheaper
        _store(coef, c)


class _Params(NamedTuple):
    """finalize's host inputs (FinalizeParams of elra_math.h)."""

    growth: float
    lr_schedule: float
    lr_warmup: float
    inv: float
    momentum: float
    f: float
    f_last: float
    spec: float
    stochastic: bool
    half: bool
    keep_copy: bool
    wd: list


def _finalize(red: list, s: list, coef: list, kind: int, p: _Params) -> None:
    s[INV] = p.inv
    if kind == KIND_RETRACE:
        return _set_retrace(s, p, ST_RETRACE)
    nseg = len(coef)
    with_x = bool(p.wd)
    gg_raw = sum(red[1::RED_WIDTH]) * (p.inv * p.inv)  # in order, from 0, as the C++ loop
    xx = sum(red[4::RED_WIDTH])
    s[GRAD_SQ] = gg_raw
    ok = _finite(gg_raw) and not (p.half and math.sqrt(gg_raw) >= HALF_GRAD_NORM_LIMIT)
    fused = kind == KIND_ACCEPT_FUSED
    gd = gg = kappa = kappa_spec = 0.0
    redo = False
    if ok:
        if with_x:
            gna = s[GNA] if s[GNA] > 0.0 else math.sqrt(gg_raw)
            kappa = gna / math.sqrt(xx) if xx > 0.0 else 0.0
            if fused:  # keep the kappa step_fused used when it is close enough to this one
                kappa_spec = spec_kappa(s)
                if abs(kappa_spec - kappa) <= KAPPA_TOLERANCE * kappa:
                    kappa = kappa_spec
                else:
                    redo = True
        for k in range(nseg):
            r = red[k * RED_WIDTH:(k + 1) * RED_WIDTH]
            ck = p.wd[k] * kappa if with_x else 0.0
            coef[k] = (ck - p.wd[k] * kappa_spec if redo else 0.0) if fused else ck
            gd += p.inv * r[0] + ck * r[2]
            gg += p.inv * p.inv * r[1] + 2.0 * ck * p.inv * r[3] + ck * ck * r[4]
        gg = max(gg, 0.0)
        ok = _finite(gg) and _finite(gd)
    if not ok:
        coef[:] = [0.0] * nseg
    if kind == KIND_FIRST:
        return _first(s, p, gg) if ok else _no_step(s)
    if not ok:
        return _set_retrace_fused(s, p) if fused else _set_retrace(s, p, ST_BAD_GRADIENT)
    _accept(red, s, p, gd, gg, xx, kappa, step_moved=p.spec if fused else None, redo=redo)


def _finite(v: float) -> bool:
    return v == v and v - v == 0.0


def spec_kappa(s: list) -> float:
    """kappa = grad_norm_avg / |x| as step_fused takes it, from the cached |x|^2 (0: unknown)."""
    return s[GNA] / math.sqrt(s[XX_CACHE]) if s[GNA] > 0.0 and s[XX_CACHE] > 0.0 else 0.0


def _p_norm(s: list) -> float:
    return abs(s[DIR_SCALE]) * math.sqrt(max(s[DIR_SQ], 0.0))


def _no_step(s: list) -> None:
    s[MODE], s[STATUS] = MODE_NONE, ST_BAD_GRADIENT


def _first(s: list, p: _Params, gg: float) -> None:
    """Point 4: the first direction is g' itself, the step alpha."""
    s[DIR_SQ], s[DIR_SCALE], s[GNA] = gg, 1.0, math.sqrt(gg)
    s[STEP] = s[APPLIED] = s[MOVE_S] = s[ALPHA]
    s[HAS_POINT] = 0.0 if p.stochastic else 1.0
    s[XX_CACHE] = -1.0
    s[MODE], s[STATUS] = MODE_STEP, ST_OK


def _accept(red: list, s: list, p: _Params, gd: float, gg: float, xx: float, kappa: float,
            step_moved: Optional[float], redo: bool) -> None:
    denom = s[DIR_SCALE] * s[DIR_SQ]
    S = gd / denom if denom != 0.0 and _finite(denom) else 0.0
    step = accepted_update(s, S, math.sqrt(gg), p)
    b = p.momentum
    xdn = 0.0  # <x, d_new>, for |x_new|^2 below
    if p.wd:
        for k in range(len(p.wd)):
            r = red[k * RED_WIDTH:(k + 1) * RED_WIDTH]
            xdn += b * r[2] + (1.0 - b) * (p.inv * r[3] + p.wd[k] * kappa * r[4])
    if b == 0.0:
        s[DIR_SQ], s[DIR_SCALE] = gg, 1.0
    else:
        sq = b * b * s[DIR_SQ] + 2.0 * b * (1.0 - b) * gd + (1.0 - b) * (1.0 - b) * gg
        g_new = b * gd + (1.0 - b) * gg
        s[DIR_SQ] = sq if sq > 0.0 else 0.0
        s[DIR_SCALE] = g_new / sq if sq > 0.0 else 1.0
    s[NORM_SUM] += _p_norm(s)
    # |x_new|^2 = |x|^2 - 2 step <x, d_new> + step^2 |d_new|^2 (d_new: the direction just stored)
    xx_new = xx - 2.0 * step * xdn + step * step * s[DIR_SQ]
    s[XX_CACHE] = xx_new if (p.wd and _finite(xx_new) and xx_new > 0.0) else -1.0
    if step_moved is not None and redo:  # x moved by spec along a direction with a stale c
        s[MODE], s[MOVE_S], s[MOVE_T] = MODE_REDO, step_moved, step
    elif step_moved is not None:  # x already moved by spec along d_new
        shift = step_moved - step
        s[MODE] = MODE_NONE if shift == 0.0 else MODE_SHIFT
        s[MOVE_S] = shift
    else:
        s[MODE], s[MOVE_S] = MODE_STEP, step
    s[APPLIED] = step
    s[HAS_POINT] = 1.0
    s[STATUS] = ST_OK


def accepted_update(s: list, S: float, grad_norm: float, p: _Params) -> float:
    """Point 6: the alpha/lr update of an accepted step; returns the step size to apply."""
    h = 1.0 - S
    alpha = s[ALPHA]
    if p.growth * h < 1.0:
        alpha *= p.growth
    else:
        alpha = (s[LR] if p.stochastic else alpha) / h
    lr = p.lr_schedule if p.lr_schedule < p.lr_warmup else p.lr_warmup
    if lr < LR_MIN:
        lr = LR_MIN
    s[CLIPPED] = 1.0 if lr * grad_norm > CLIP else 0.0
    if lr * grad_norm > CLIP:
        lr = CLIP / grad_norm
    s[LR] = lr
    if p.stochastic and S > 0.0 and lr / S < alpha:
        alpha = lr / S
    a = alpha * S
    s[MEAN_ANGLE] += a if a < 0.0 else 0.0
    if a < s[MIN_ANGLE]:
        s[MIN_ANGLE] = a
    if a < ANGLE_CAP:
        alpha = ANGLE_CAP / S
    alpha = ALPHA_MIN if alpha < ALPHA_MIN else (ALPHA_MAX if alpha > ALPHA_MAX else alpha)
    s[ALPHA] = alpha
    s[STEP] = s[LR] if p.stochastic else alpha
    return s[STEP]


def retrace_update(s: list, f: float, f_last: float, p_sq: float, stochastic: bool) -> float:
    """Point 7: shrink the step sizes after a failed step; returns the step size to re-apply."""
    lr = s[LR] / 2.0
    s[LR] = LR_MIN if lr < LR_MIN else lr
    if not stochastic:
        alpha = s[ALPHA]
        d = (f - f_last) + alpha * p_sq
        factor = 0.5 * alpha * p_sq / d if d != 0.0 else math.nan
        if not _finite(factor):  # NaN loss; +inf loss gives 0
            factor = RETRACE_FALLBACK_SHRINK
        na = alpha * factor
        s[ALPHA] = RETRACE_ALPHA_MIN if na < RETRACE_ALPHA_MIN else (
            ALPHA_MAX if na > ALPHA_MAX else na)
    s[STEP] = s[LR] if stochastic else s[ALPHA]
    return s[STEP]


def _set_retrace(s: list, p: _Params, status: int) -> None:
    """Point 7; before any point to go back to (stochastic, right after the first step) only the
    scalars shrink and x stays where the first step put it (what the reference does)."""
    old = s[APPLIED]
    p_sq = s[DIR_SCALE] * s[DIR_SCALE] * s[DIR_SQ]
    nw = retrace_update(s, p.f, p.f_last, p_sq, p.stochastic)
    s[NORM_SUM] += _p_norm(s)
    s[STATUS] = status
    s[XX_CACHE] = -1.0
    if s[HAS_POINT] == 0.0:
        s[MODE] = MODE_NONE
        return
    s[MODE] = MODE_RETRACE_COPY if p.keep_copy else MODE_RETRACE_ALGEBRAIC
    s[MOVE_S] = nw * s[DIR_SCALE]  # back along p = DIR_SCALE * d (with momentum p != d)
    s[MOVE_T] = old
    s[APPLIED] = s[MOVE_S]


def _set_retrace_fused(s: list, p: _Params) -> None:
    """A non-finite gradient after step_fused: undo its move, then retrace (see fixup)."""
    had_point = s[HAS_POINT] != 0.0
    _set_retrace(s, p, ST_BAD_GRADIENT)
    shift = s[MOVE_T] - s[MOVE_S] if had_point else 0.0
    s[MODE], s[MOVE_S], s[MOVE_T] = MODE_UNDO_RETRACE, p.spec, shift


def update(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor, xg: Optional[torch.Tensor],
           scal: torch.Tensor, coef: torch.Tensor, bounds: Sequence[int], momentum: float) -> None:
    """The element-wise update of the mode ``finalize`` chose (see ``MODES``)."""
    check_update(x, d, g, xg, scal, coef, bounds)
    _update(x, d, g, xg, scal, coef, bounds, momentum)


def _update(x, d, g, xg, scal, coef, bounds, momentum) -> None:
    v = scal.tolist()
    mode, s, t, inv = int(v[MODE]), v[MOVE_S], v[MOVE_T], v[INV]
    if mode == MODE_NONE:
        return
    if mode == MODE_RETRACE_COPY:
        if xg is None:
            _fail("retrace needs the copy")
        torch.add(xg, d, alpha=-s, out=x)
    elif mode == MODE_RETRACE_ALGEBRAIC:
        x.add_(d, alpha=t - s)
    elif mode == MODE_STEP:
        cs = coef.tolist()[:len(bounds) - 1]
        if not any(cs):  # no decay: the whole buffer at once
            _step(x, d, g, xg, inv, 0.0, momentum, s)
        else:
            for (a, b), c in zip(_segments(bounds), cs):
                _step(x[a:b], d[a:b], g[a:b], None if xg is None else xg[a:b], inv, c,
                      momentum, s)


def _step(x, d, g, xg, inv: float, c: float, b: float, s: float) -> None:
    """d <- b d + (1 - b)(inv g + c x); xg <- x; x <- x - s d."""
    if xg is not None:
        xg.copy_(x)
    if b != 0.0:
        d.mul_(b).add_(g, alpha=(1.0 - b) * inv)
        if c != 0.0:
            d.add_(x, alpha=(1.0 - b) * c)
    elif c != 0.0:
        if inv == 1.0:
            torch.add(g, x, alpha=c, out=d)
        else:
            torch.add(x, g, alpha=inv / c, out=d).mul_(c)
    elif inv == 1.0:
        d.copy_(g)
    else:
        torch.mul(g, inv, out=d)
    x.add_(d, alpha=-s)


def step_fused(x: torch.Tensor, d_prev: torch.Tensor, d_new: torch.Tensor, g: torch.Tensor,
               scal: torch.Tensor, bounds: Sequence[int], inv: float, momentum: float,
               step: float, wd: Sequence[float], out: torch.Tensor) -> None:
    """One pass of a normal stochastic step: the sums of ``reduce`` (x before the move),
    ``d_new <- b d_prev + (1 - b)(inv g + c_k x)`` with ``c_k = wd[k] spec_kappa``, and
    ``x <- x - step d_new`` where g is finite."""
    check_step_fused(x, d_prev, d_new, g, scal, bounds, inv, momentum, step, wd, out)
    _step_fused(x, d_prev, d_new, g, scal, bounds, inv, momentum, step, wd, out)


def _step_fused(x, d_prev, d_new, g, scal, bounds, inv, momentum, step, wd, out) -> None:
    _reduce(g, d_prev, x, bounds, bool(wd), out)
    kappa = spec_kappa(scal.tolist()) if wd else 0.0
    for k, (a, b) in enumerate(_segments(bounds)):
        xs, gs, dn = x[a:b], g[a:b], d_new[a:b]
        torch.mul(gs, inv, out=dn)
        if wd and wd[k] * kappa != 0.0:
            dn.add_(xs, alpha=wd[k] * kappa)
        if momentum != 0.0:
            dn.mul_(1.0 - momentum).add_(d_prev[a:b], alpha=momentum)
        xs.copy_(torch.where(torch.isfinite(gs), xs - step * dn, xs))


def fixup(x: torch.Tensor, d_prev: torch.Tensor, d_new: torch.Tensor, g: torch.Tensor,
          scal: torch.Tensor, coef: torch.Tensor, bounds: Sequence[int], momentum: float) -> None:
    """The correction after ``step_fused`` and ``finalize`` (MODE_SHIFT, MODE_UNDO_RETRACE,
    MODE_REDO); other modes do nothing."""
    check_fixup(x, d_prev, d_new, g, scal, coef, bounds)
    _fixup(x, d_prev, d_new, g, scal, coef, bounds, momentum)


def _fixup(x, d_prev, d_new, g, scal, coef, bounds, momentum) -> None:
    nseg = len(bounds) - 1
    v = scal.tolist()
    mode, u, r = int(v[MODE]), v[MOVE_S], v[MOVE_T]
    if mode == MODE_SHIFT:
        x.add_(d_new, alpha=u)
    elif mode == MODE_UNDO_RETRACE:
        x.copy_(torch.where(torch.isfinite(g), x + u * d_new, x))
        x.add_(d_prev, alpha=r)
        d_new.copy_(d_prev)
    elif mode == MODE_REDO:
        for (a, b), dc in zip(_segments(bounds), coef[:nseg].tolist()):
            xo = x[a:b] + u * d_new[a:b]
            d_new[a:b].add_(xo, alpha=(1.0 - momentum) * dc)
            torch.add(xo, d_new[a:b], alpha=-r, out=x[a:b])


# The same ops without the argument checks, for a caller that builds the arguments itself (the
# engine); every other call goes through the checked functions above (the registered kernels).
UNCHECKED = {"reduce": _reduce, "collect": _collect, "finalize": _finalize_op,
             "update": _update, "step_fused": _step_fused, "fixup": _fixup}
