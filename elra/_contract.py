"""The contract between the engine and its kernels: scalar slots, codes and kernel constants.

Every number the host and the kernels must agree on is defined here, once. The C++ and CUDA
kernels read the same definitions from ``csrc/elra_contract.h``, which is generated from this
module (``python scripts/gen_contract.py``; a test checks that the committed header is current).
The op schemas themselves are in :mod:`elra._ops`.

[note: the scalar slots]
The engine keeps its scalar state in one float64 tensor on the parameters' device. ``finalize``
reads the reductions and the host's inputs and rewrites the slots; the element-wise kernels then
read their mode and step sizes from the same tensor, so a normal step needs no host round trip.
"""

from __future__ import annotations

# --- scalar slots of the state tensor (index: meaning) ------------------------------------------
SLOTS = (
    ("ALPHA", "alpha: estimate of the ideal step along the gradient"),
    ("LR", "lr: the damped, scheduled step (stochastic regime)"),
    ("STEP", "step size last applied along the direction"),
    ("MEAN_ANGLE", "window sum of min(0, alpha * S)"),
    ("MIN_ANGLE", "window minimum of alpha * S"),
    ("NORM_SUM", "window sum of |p|"),
    ("DIR_SQ", "|d|^2 of the stored direction"),
    ("DIR_SCALE", "p = DIR_SCALE * d"),
    ("GNA", "grad_norm_avg (set by the host at windows, by the first step before)"),
    ("STATUS", "outcome of the last call, see Status"),
    ("MODE", "what the element-wise kernels do next, see Mode"),
    ("MOVE_S", "step size of the element-wise kernels"),
    ("MOVE_T", "second step size (algebraic retrace: x += (MOVE_T - MOVE_S) d)"),
    ("INV", "factor undoing loss scaling, for the update kernel"),
    ("GRAD_SQ", "|inv * g|^2 of the last reduction or collection"),
    ("APPLIED", "x = x_good - APPLIED * d: the multiple of the stored direction now applied"),
    ("HAS_POINT", "1 once there is a point to retrace to"),
    ("CLIPPED", "1 if the last accepted step was shortened by the clip"),
    ("XX_CACHE", "|x|^2 of the current x after an accepted step with weight decay, else -1"),
)
NUM_SLOTS = 24  # the tensor's length: room for slots to come without changing checkpoints
(ALPHA, LR, STEP, MEAN_ANGLE, MIN_ANGLE, NORM_SUM, DIR_SQ, DIR_SCALE, GNA, STATUS, MODE, MOVE_S,
 MOVE_T, INV, GRAD_SQ, APPLIED, HAS_POINT, CLIPPED, XX_CACHE) = range(len(SLOTS))

# --- codes ------------------------------------------------------------------------------------------
STATUSES = (
    ("ST_OK", "the step was taken as planned"),
    ("ST_RETRACE", "a retrace was asked for and taken"),
    ("ST_BAD_GRADIENT", "the gradient was not finite: the step became a retrace (or, first, none)"),
    ("ST_NONE", "no step yet"),
)
ST_OK, ST_RETRACE, ST_BAD_GRADIENT, ST_NONE = range(len(STATUSES))

MODES = (
    ("MODE_NONE", "nothing to do"),
    ("MODE_STEP", "d <- b d + (1 - b)(inv g + c x); xg <- x; x <- x - MOVE_S d"),
    ("MODE_RETRACE_COPY", "x <- xg - MOVE_S d"),
    ("MODE_RETRACE_ALGEBRAIC", "x <- x + (MOVE_T - MOVE_S) d"),
    ("MODE_SHIFT", "fixup after step_fused: x += MOVE_S d_new (the clip)"),
    ("MODE_UNDO_RETRACE", "fixup: x += MOVE_S d_new where g is finite, x += MOVE_T d_prev, "
                          "d_new <- d_prev (a non-finite gradient)"),
    ("MODE_REDO", "fixup: x_old = x + MOVE_S d_new, d_new += (1 - b) dc x_old, "
                  "x = x_old - MOVE_T d_new (a stale kappa; dc per segment, in coef)"),
)
(MODE_NONE, MODE_STEP, MODE_RETRACE_COPY, MODE_RETRACE_ALGEBRAIC, MODE_SHIFT, MODE_UNDO_RETRACE,
 MODE_REDO) = range(len(MODES))

KINDS = (
    ("KIND_FIRST", "the very first step: the direction is g', the step alpha"),
    ("KIND_ACCEPT", "an accepted step (two passes: reduce, finalize, update)"),
    ("KIND_RETRACE", "a retrace asked for by the host (no gradient)"),
    ("KIND_ACCEPT_FUSED", "an accepted step whose move step_fused already made by `spec`"),
)
KIND_FIRST, KIND_ACCEPT, KIND_RETRACE, KIND_ACCEPT_FUSED = range(len(KINDS))

# --- constants of the kernels (names follow ELRA_ALGORITHM.md) --------------------------------------
CONSTANTS = (
    ("CLIP", 10.0, "bound on the norm of an applied stochastic step"),
    ("LR_MIN", 1e-5, "floor of the applied stochastic step"),
    ("ALPHA_MIN", 1e-8, "alpha is kept in [ALPHA_MIN, ALPHA_MAX] after an accepted step"),
    ("ALPHA_MAX", 1e6, ""),
    ("RETRACE_ALPHA_MIN", 1e-12, "floor of alpha after a deterministic retrace"),
    ("ANGLE_CAP", -0.1, "alpha * S is kept >= ANGLE_CAP"),
    ("RETRACE_FALLBACK_SHRINK", 0.01, "alpha factor when the retrace parabola is not usable"),
    ("HALF_GRAD_NORM_LIMIT", 65e3, "a larger gradient norm in fp16/bf16 counts as an overflow"),
    ("KAPPA_TOLERANCE", 1e-4, "relative; see [note: weight decay in one pass] in elra_math.h"),
)
(CLIP, LR_MIN, ALPHA_MIN, ALPHA_MAX, RETRACE_ALPHA_MIN, ANGLE_CAP, RETRACE_FALLBACK_SHRINK,
 HALF_GRAD_NORM_LIMIT, KAPPA_TOLERANCE) = (value for _, value, _ in CONSTANTS)
MAX_SEGMENTS = 64  # parameter-group segments per buffer (bounds travel by value to the GPU)
RED_WIDTH = 5  # reductions per segment: <g,d>, |g|^2, <x,d>, <g,x>, |x|^2


def header() -> str:
    """The text of ``csrc/elra_contract.h`` (generated; see the module docstring)."""
    out = ["// elra_contract.h: GENERATED from elra/_contract.py by scripts/gen_contract.py;",
           "// do not edit. The numbers the engine (Python) and the kernels agree on.",
           "#pragma once", "", "namespace elra {", ""]

    def enum(name: str, members: tuple, extra: tuple = ()) -> None:
        out.append(f"enum {name} : int {{")
        for k, (member, doc) in enumerate(members):
            out.append(f"  {member} = {k},  // {doc}")
        for member, value, doc in extra:
            out.append(f"  {member} = {value},  // {doc}")
        out.extend(["};", ""])

    enum("Slot", SLOTS, (("NUM_SLOTS", NUM_SLOTS, "length of the slot tensor"),))
    enum("Status", STATUSES)
    enum("Mode", MODES)
    enum("Kind", KINDS)
    for name, value, doc in CONSTANTS:
        out.append(f"constexpr double {name} = {value!r};" + (f"  // {doc}" if doc else ""))
    out.append(f"constexpr int MAX_SEGMENTS = {MAX_SEGMENTS};  // segments per buffer")
    out.append(f"constexpr int RED_WIDTH = {RED_WIDTH};  // per segment: <g,d>, |g|^2, <x,d>, "
               "<g,x>, |x|^2")
    out.extend(["", "}  // namespace elra", ""])
    return "\n".join(out)
