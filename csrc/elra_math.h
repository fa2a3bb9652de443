// elra_math.h: the scalar and element-wise math of ELRA, shared by the CPU and CUDA kernels.
//
// Plain C++ with no torch (or CUDA runtime) headers, so that a .cu file including it compiles
// with nothing but nvcc. Everything here is a pure function of its arguments; the kernels built
// on it are tested against the pure-torch kernels (elra/kernels_torch.py) and, on whole
// trajectories, against the reference implementation (elra/_reference.py).
//
// The scalar slots, status/mode/kind codes and constants: elra_contract.h, generated from
// elra/_contract.py ([note: the scalar slots] there).
//
// [note: the one-pass stochastic step]
// In the stochastic regime the step applied is lr = max(1e-5, min(lr_schedule, lr_warmup)), known
// to the host before the step, unless the clip (lr |g| <= 10) or a non-finite gradient changes
// it; the reductions only steer alpha. So a normal stochastic step runs as one pass
// (step_fused): it reads x, g and the previous direction d_prev, forms the sums of the
// reductions, writes the new direction into a second buffer d_new and moves x by that lr, where
// g is finite. finalize (kind KIND_ACCEPT_FUSED) then decides from the sums as usual, and a
// fix-up pass (fixup) runs only when the guess was wrong: the clip shifts x along d_new
// (MODE_SHIFT); a non-finite gradient undoes the move, retraces along d_prev and copies d_prev
// into d_new (MODE_UNDO_RETRACE). The engine then swaps the two direction buffers. Five memory
// streams instead of six (g is read once), one more buffer of the parameters' size.
//
// [note: weight decay in one pass]
// The decay term c x needs c = wd kappa with kappa = grad_norm_avg / |x| before the pass. |x|^2 of
// the current x is known from the last accepted step: x_new = x - s dn gives
// |x_new|^2 = |x|^2 - 2 s <x, dn> + s^2 |dn|^2 from that step's reductions (slot XX_CACHE, set
// by finalize). step_fused takes kappa from it (spec_kappa), and finalize compares it with the
// kappa of the |x| the pass itself measured: within KAPPA_TOLERANCE (the cached value differs
// by the rounding of x and of the float sums, about 1e-6) the pass stands and the scalars are
// computed with the kappa it used; otherwise (the parameters were changed between steps) the
// fix-up redoes the move with the right c (MODE_REDO).
#pragma once

#include <cmath>
#include <cstdint>

#include "elra_contract.h"

#if defined(__CUDACC__)
#define ELRA_HD __host__ __device__ __forceinline__
#else
#define ELRA_HD inline
#endif

namespace elra {

// What the host passes to finalize (all known on the host without reading the device).
struct FinalizeParams {
  double growth;       // G
  double lr_schedule;  // lr_damp * (2/3)^(schedule + increase)
  double lr_warmup;    // lr_damp * warmup_factor * steps
  double inv;          // 1 / loss scale
  double momentum;     // beta
  double f;            // loss of this call (for the deterministic retrace parabola)
  double f_last;       // loss of the last accepted point
  int stochastic;      // regime
  int kind;            // KIND_* (elra_contract.h)
  int with_x;          // weight decay active: reductions hold the x terms
  int half;            // half-precision buffer: the 65e3 gradient-norm limit applies
  int keep_copy;       // a retrace-point copy exists
  double spec;         // KIND_ACCEPT_FUSED: the step step_fused already applied
  int nseg;            // segments
  double wd[MAX_SEGMENTS];  // per segment weight-decay base (times kappa = gna / |x|)
};

template <typename V>
ELRA_HD bool finite(V v) {
  return v == v && v - v == V(0);
}

// Point 6: alpha/lr update of an accepted step; returns the step size to apply.
ELRA_HD double accepted_update(double* s, double S, double grad_norm, const FinalizeParams& p) {
  const double h = 1.0 - S;
  double alpha = s[ALPHA];
  if (p.growth * h < 1.0) {
    alpha *= p.growth;
  } else {
    alpha = (p.stochastic ? s[LR] : alpha) / h;
  }
  double lr = p.lr_schedule < p.lr_warmup ? p.lr_schedule : p.lr_warmup;
  if (lr < LR_MIN) lr = LR_MIN;
  s[CLIPPED] = lr * grad_norm > CLIP ? 1.0 : 0.0;
  if (lr * grad_norm > CLIP) lr = CLIP / grad_norm;
  s[LR] = lr;
  if (p.stochastic && S > 0.0 && lr / S < alpha) alpha = lr / S;
  const double a = alpha * S;
  s[MEAN_ANGLE] += a < 0.0 ? a : 0.0;
  if (a < s[MIN_ANGLE]) s[MIN_ANGLE] = a;
  if (a < ANGLE_CAP) alpha = ANGLE_CAP / S;
  alpha = alpha < ALPHA_MIN ? ALPHA_MIN : (alpha > ALPHA_MAX ? ALPHA_MAX : alpha);
  s[ALPHA] = alpha;
  s[STEP] = p.stochastic ? s[LR] : alpha;
  return s[STEP];
}

// Point 7: shrink the step sizes after a failed step; returns the step size to re-apply.
ELRA_HD double retrace_update(double* s, double f, double f_last, double p_sq, int stochastic) {
  double lr = s[LR] / 2.0;
  s[LR] = lr < LR_MIN ? LR_MIN : lr;
  if (!stochastic) {
    const double alpha = s[ALPHA];
    const double d = (f - f_last) + alpha * p_sq;
    double factor = d != 0.0 ? 0.5 * alpha * p_sq / d : NAN;
    if (!finite(factor)) factor = RETRACE_FALLBACK_SHRINK;  // NaN loss; +inf loss gives 0
    double na = alpha * factor;
    na = na < RETRACE_ALPHA_MIN ? RETRACE_ALPHA_MIN : (na > ALPHA_MAX ? ALPHA_MAX : na);
    s[ALPHA] = na;
  }
  s[STEP] = stochastic ? s[LR] : s[ALPHA];
  return s[STEP];
}

// kappa = grad_norm_avg / |x| as step_fused takes it, from the cached |x|^2 (0 when unknown).
ELRA_HD double spec_kappa(const double* s) {
  return (s[GNA] > 0.0 && s[XX_CACHE] > 0.0) ? s[GNA] / sqrt(s[XX_CACHE]) : 0.0;
}

ELRA_HD double p_norm(const double* s) {
  const double sq = s[DIR_SQ] > 0.0 ? s[DIR_SQ] : 0.0;
  return (s[DIR_SCALE] < 0.0 ? -s[DIR_SCALE] : s[DIR_SCALE]) * sqrt(sq);
}

// Point 7. Stochastic regime before any step after the first was accepted: there is no point to
// go back to, and x stays where the first step put it (what the reference does); only the
// scalars shrink.
ELRA_HD void set_retrace(double* s, const FinalizeParams& p, int status) {
  const double old = s[APPLIED];
  const double p_sq = s[DIR_SCALE] * s[DIR_SCALE] * s[DIR_SQ];
  const double nw = retrace_update(s, p.f, p.f_last, p_sq, p.stochastic);
  s[NORM_SUM] += p_norm(s);
  s[STATUS] = status;
  s[XX_CACHE] = -1.0;
  if (s[HAS_POINT] == 0.0) {
    s[MODE] = MODE_NONE;
    return;
  }
  s[MODE] = p.keep_copy ? MODE_RETRACE_COPY : MODE_RETRACE_ALGEBRAIC;
  s[MOVE_S] = nw * s[DIR_SCALE];  // back along p = DIR_SCALE * d (with momentum p != d)
  s[MOVE_T] = old;
  s[APPLIED] = s[MOVE_S];
}

// A non-finite gradient after step_fused: the scalars of a retrace, and a fixup that first undoes
// the speculative move (MOVE_S along d_new, where g was finite), then retraces (MOVE_T along
// d_prev; nothing when there is no point yet) and restores d_prev as the direction.
ELRA_HD void set_retrace_fused(double* s, const FinalizeParams& p) {
  const bool had_point = s[HAS_POINT] != 0.0;
  set_retrace(s, p, ST_BAD_GRADIENT);
  const double shift = had_point ? s[MOVE_T] - s[MOVE_S] : 0.0;
  s[MODE] = MODE_UNDO_RETRACE;
  s[MOVE_S] = p.spec;
  s[MOVE_T] = shift;
}

// The step-size update of one call, from the reductions `red` (nseg x RED_WIDTH, raw gradient)
// into the slots `s` and the per-segment decay coefficients `coef`. The pure-torch kernel of the
// op (finalize in elra/kernels_torch.py) is the same function, written again in Python.
ELRA_HD void finalize(const double* red, double* s, double* coef, const FinalizeParams& p) {
  for (int k = 0; k < p.nseg; ++k) coef[k] = 0.0;
  s[INV] = p.inv;
  if (p.kind == KIND_RETRACE) {
    set_retrace(s, p, ST_RETRACE);
    return;
  }
  double gg_raw = 0.0, xx = 0.0;
  for (int k = 0; k < p.nseg; ++k) {
    gg_raw += red[k * RED_WIDTH + 1];
    xx += red[k * RED_WIDTH + 4];
  }
  gg_raw *= p.inv * p.inv;
  s[GRAD_SQ] = gg_raw;
  bool ok = finite(gg_raw) && !(p.half && sqrt(gg_raw) >= HALF_GRAD_NORM_LIMIT);
  const bool fused = p.kind == KIND_ACCEPT_FUSED;
  double gd = 0.0, gg = 0.0, kappa = 0.0, kappa_spec = 0.0;
  bool redo = false;
  if (ok) {
    if (p.with_x) {
      const double gna = s[GNA] > 0.0 ? s[GNA] : sqrt(gg_raw);
      kappa = xx > 0.0 ? gna / sqrt(xx) : 0.0;
      if (fused) {  // keep the kappa step_fused used when it is close enough to this one
        kappa_spec = spec_kappa(s);
        const double diff = kappa_spec > kappa ? kappa_spec - kappa : kappa - kappa_spec;
        if (diff <= KAPPA_TOLERANCE * kappa)
          kappa = kappa_spec;
        else
          redo = true;
      }
    }
    for (int k = 0; k < p.nseg; ++k) {
      const double* r = red + k * RED_WIDTH;
      const double c = p.with_x ? p.wd[k] * kappa : 0.0;
      coef[k] = fused ? (redo ? c - p.wd[k] * kappa_spec : 0.0) : c;
      gd += p.inv * r[0] + c * r[2];
      gg += p.inv * p.inv * r[1] + 2.0 * c * p.inv * r[3] + c * c * r[4];
    }
    if (gg < 0.0) gg = 0.0;
    ok = finite(gg) && finite(gd);
  }
  if (!ok) for (int k = 0; k < p.nseg; ++k) coef[k] = 0.0;
  if (p.kind == KIND_FIRST) {  // point 4: the first direction is g' itself, the step alpha
    if (!ok) {
      s[MODE] = MODE_NONE;
      s[STATUS] = ST_BAD_GRADIENT;
      return;
    }
    s[DIR_SQ] = gg;
    s[DIR_SCALE] = 1.0;
    s[GNA] = sqrt(gg);
    s[STEP] = s[ALPHA];
    s[APPLIED] = s[ALPHA];
    s[HAS_POINT] = p.stochastic ? 0.0 : 1.0;
    s[XX_CACHE] = -1.0;
    s[MODE] = MODE_STEP;
    s[MOVE_S] = s[ALPHA];
    s[STATUS] = ST_OK;
    return;
  }
  if (!ok) {
    if (p.kind == KIND_ACCEPT_FUSED)
      set_retrace_fused(s, p);
    else
      set_retrace(s, p, ST_BAD_GRADIENT);
    return;
  }
  const double denom = s[DIR_SCALE] * s[DIR_SQ];
  const double S = (denom != 0.0 && finite(denom)) ? gd / denom : 0.0;
  const double step = accepted_update(s, S, sqrt(gg), p);
  const double b = p.momentum;
  double xdn = 0.0;  // <x, d_new>, for |x_new|^2 below
  if (p.with_x)
    for (int k = 0; k < p.nseg; ++k) {
      const double* r = red + k * RED_WIDTH;
      xdn += b * r[2] + (1.0 - b) * (p.inv * r[3] + p.wd[k] * kappa * r[4]);
    }
  if (b == 0.0) {
    s[DIR_SQ] = gg;
    s[DIR_SCALE] = 1.0;
  } else {
    const double sq = b * b * s[DIR_SQ] + 2.0 * b * (1.0 - b) * gd + (1.0 - b) * (1.0 - b) * gg;
    const double g_new = b * gd + (1.0 - b) * gg;
    s[DIR_SQ] = sq > 0.0 ? sq : 0.0;
    s[DIR_SCALE] = sq > 0.0 ? g_new / sq : 1.0;
  }
  s[NORM_SUM] += p_norm(s);
  // |x_new|^2 = |x|^2 - 2 step <x, d_new> + step^2 |d_new|^2 (d_new: the direction just stored)
  const double xx_new = xx - 2.0 * step * xdn + step * step * s[DIR_SQ];
  s[XX_CACHE] = (p.with_x && finite(xx_new) && xx_new > 0.0) ? xx_new : -1.0;
  if (fused && redo) {  // x moved by p.spec along a direction with a stale c
    s[MODE] = MODE_REDO;
    s[MOVE_S] = p.spec;
    s[MOVE_T] = step;
  } else if (fused) {  // x already moved by p.spec along d_new
    const double shift = p.spec - step;
    s[MODE] = shift == 0.0 ? MODE_NONE : MODE_SHIFT;
    s[MOVE_S] = shift;
  } else {
    s[MODE] = MODE_STEP;
    s[MOVE_S] = step;
  }
  s[APPLIED] = step;
  s[HAS_POINT] = 1.0;
  s[STATUS] = ST_OK;
}

// The element-wise update of one element of x (and d, and the retrace copy xg), computed in the
// "opmath" type Acc (float for float/half/bfloat16, double for double), as torch does.
// MODE_STEP:      d <- b d + (1 - b)(inv g + c x);  xg <- x;  x <- x - s d
// MODE_RETRACE_*: x <- xg - s d   or   x <- x + (t - s) d
template <typename T, typename Acc>
ELRA_HD void update_element(int mode, T& x, T& d, T* xg, T g, Acc inv, Acc c, Acc b, Acc s,
                            Acc t) {
  if (mode == MODE_STEP) {
    const Acc xo = static_cast<Acc>(x);
    Acc dn = inv * static_cast<Acc>(g);
    if (c != Acc(0)) dn += c * xo;
    if (b != Acc(0)) dn = b * static_cast<Acc>(d) + (Acc(1) - b) * dn;
    const T dt = static_cast<T>(dn);
    if (xg) *xg = x;
    d = dt;
    x = static_cast<T>(xo - s * static_cast<Acc>(dt));
  } else if (mode == MODE_RETRACE_COPY) {
    x = static_cast<T>(static_cast<Acc>(*xg) - s * static_cast<Acc>(d));
  } else if (mode == MODE_RETRACE_ALGEBRAIC) {
    x = static_cast<T>(static_cast<Acc>(x) + (t - s) * static_cast<Acc>(d));
  }
}

// One element of step_fused: the new direction dn = b d_prev + (1 - b) inv g goes to d_new, and x
// moves by the speculative step s where g is finite (elsewhere x is kept, so that an undo can
// restore it). For finite g this is MODE_STEP of update_element without weight decay.
template <typename T, typename Acc>
ELRA_HD void fused_element(T& x, T dp, T& dnew, T g, Acc inv, Acc c, Acc b, Acc s) {
  const Acc gv = static_cast<Acc>(g), xo = static_cast<Acc>(x);
  Acc dn = inv * gv;
  if (c != Acc(0)) dn += c * xo;
  if (b != Acc(0)) dn = b * static_cast<Acc>(dp) + (Acc(1) - b) * dn;
  const T dt = static_cast<T>(dn);
  dnew = dt;
  if (finite(gv)) x = static_cast<T>(xo - s * static_cast<Acc>(dt));
}

// One element of fixup (after step_fused and finalize): see MODE_SHIFT, MODE_UNDO_RETRACE and
// MODE_REDO (u, r: MOVE_S, MOVE_T; dc: the segment's correction of c; b: momentum).
template <typename T, typename Acc>
ELRA_HD void fixup_element(int mode, T& x, T dp, T& dnew, T g, Acc u, Acc r, Acc dc, Acc b) {
  if (mode == MODE_SHIFT) {
    x = static_cast<T>(static_cast<Acc>(x) + u * static_cast<Acc>(dnew));
  } else if (mode == MODE_UNDO_RETRACE) {
    if (finite(static_cast<Acc>(g))) x = static_cast<T>(static_cast<Acc>(x) + u * static_cast<Acc>(dnew));
    x = static_cast<T>(static_cast<Acc>(x) + r * static_cast<Acc>(dp));
    dnew = dp;
  } else if (mode == MODE_REDO) {
    const Acc xo = static_cast<Acc>(x) + u * static_cast<Acc>(dnew);
    const T dt = static_cast<T>(static_cast<Acc>(dnew) + (Acc(1) - b) * dc * xo);
    dnew = dt;
    x = static_cast<T>(xo - r * static_cast<Acc>(dt));
  }
}

}  // namespace elra
