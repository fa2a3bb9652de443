// elra_contract.h: GENERATED from elra/_contract.py by scripts/gen_contract.py;
// do not edit. The numbers the engine (Python) and the kernels agree on.
#pragma once

namespace elra {

enum Slot : int {
  ALPHA = 0,  // alpha: estimate of the ideal step along the gradient
  LR = 1,  // lr: the damped, scheduled step (stochastic regime)
  STEP = 2,  // step size last applied along the direction
  MEAN_ANGLE = 3,  // window sum of min(0, alpha * S)
  MIN_ANGLE = 4,  // window minimum of alpha * S
  NORM_SUM = 5,  // window sum of |p|
  DIR_SQ = 6,  // |d|^2 of the stored direction
  DIR_SCALE = 7,  // p = DIR_SCALE * d
  GNA = 8,  // grad_norm_avg (set by the host at windows, by the first step before)
  STATUS = 9,  // outcome of the last call, see Status
  MODE = 10,  // what the element-wise kernels do next, see Mode
  MOVE_S = 11,  // step size of the element-wise kernels
  MOVE_T = 12,  // second step size (algebraic retrace: x += (MOVE_T - MOVE_S) d)
  INV = 13,  // factor undoing loss scaling, for the update kernel
  GRAD_SQ = 14,  // |inv * g|^2 of the last reduction or collection
  APPLIED = 15,  // x = x_good - APPLIED * d: the multiple of the stored direction now applied
  HAS_POINT = 16,  // 1 once there is a point to retrace to
  CLIPPED = 17,  // 1 if the last accepted step was shortened by the clip
  XX_CACHE = 18,  // |x|^2 of the current x after an accepted step with weight decay, else -1
  NUM_SLOTS = 24,  // length of the slot tensor
};

enum Status : int {
  ST_OK = 0,  // the step was taken as planned
  ST_RETRACE = 1,  // a retrace was asked for and taken
  ST_BAD_GRADIENT = 2,  // the gradient was not finite: the step became a retrace (or, first, none)
  ST_NONE = 3,  // no step yet
};

enum Mode : int {
  MODE_NONE = 0,  // nothing to do
  MODE_STEP = 1,  // d <- b d + (1 - b)(inv g + c x); xg <- x; x <- x - MOVE_S d
  MODE_RETRACE_COPY = 2,  // x <- xg - MOVE_S d
  MODE_RETRACE_ALGEBRAIC = 3,  // x <- x + (MOVE_T - MOVE_S) d
  MODE_SHIFT = 4,  // fixup after step_fused: x += MOVE_S d_new (the clip)
  MODE_UNDO_RETRACE = 5,  // fixup: x += MOVE_S d_new where g is finite, x += MOVE_T d_prev, d_new <- d_prev (a non-finite gradient)
  MODE_REDO = 6,  // fixup: x_old = x + MOVE_S d_new, d_new += (1 - b) dc x_old, x = x_old - MOVE_T d_new (a stale kappa; dc per segment, in coef)
};

enum Kind : int {
  KIND_FIRST = 0,  // the very first step: the direction is g', the step alpha
  KIND_ACCEPT = 1,  // an accepted step (two passes: reduce, finalize, update)
  KIND_RETRACE = 2,  // a retrace asked for by the host (no gradient)
  KIND_ACCEPT_FUSED = 3,  // an accepted step whose move step_fused already made by `spec`
};

constexpr double CLIP = 10.0;  // bound on the norm of an applied stochastic step
constexpr double LR_MIN = 1e-05;  // floor of the applied stochastic step
constexpr double ALPHA_MIN = 1e-08;  // alpha is kept in [ALPHA_MIN, ALPHA_MAX] after an accepted step
constexpr double ALPHA_MAX = 1000000.0;
constexpr double RETRACE_ALPHA_MIN = 1e-12;  // floor of alpha after a deterministic retrace
constexpr double ANGLE_CAP = -0.1;  // alpha * S is kept >= ANGLE_CAP
constexpr double RETRACE_FALLBACK_SHRINK = 0.01;  // alpha factor when the retrace parabola is not usable
constexpr double HALF_GRAD_NORM_LIMIT = 65000.0;  // a larger gradient norm in fp16/bf16 counts as an overflow
constexpr double KAPPA_TOLERANCE = 0.0001;  // relative; see [note: weight decay in one pass] in elra_math.h
constexpr int MAX_SEGMENTS = 64;  // segments per buffer
constexpr int RED_WIDTH = 5;  // per segment: <g,d>, |g|^2, <x,d>, <g,x>, |x|^2

}  // namespace elra
