"""The step-size update of ``finalize`` (points 6 and 7 of the algorithm), on every kernel table.

Each case drives the op with reductions chosen so that the angle term and the gradient norm
come out as wanted: one segment, no decay, stored direction with ``|d|^2 = 1`` and scale 1, so
``S = <g, d> = red[0]`` and ``|g| = sqrt(red[1])``.
"""

import math

import pytest
import torch

from elra import _ops, native_status
from elra._contract import (ALPHA, ALPHA_MAX, ALPHA_MIN, DIR_SCALE, DIR_SQ, HAS_POINT, KIND_ACCEPT,
                            KIND_RETRACE, LR, MEAN_ANGLE, MIN_ANGLE, NUM_SLOTS, RED_WIDTH,
                            RETRACE_ALPHA_MIN, STEP)

TABLES = {"torch": _ops.TORCH_KERNELS}
if native_status()["cpu"]:
    TABLES["native"] = _ops.dispatched("elra")
KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not native_status()["cpu"], reason="native kernels not built"))]
BIG = (1e6, 0.5, 10.0)  # growth, lr_schedule, lr_warmup


@pytest.fixture(params=KERNELS)
def k(request):
    return TABLES[request.param]


def scalars(alpha, lr):
    s = torch.zeros(NUM_SLOTS, dtype=torch.float64)
    s[ALPHA], s[LR], s[DIR_SQ], s[DIR_SCALE], s[HAS_POINT] = alpha, lr, 1.0, 1.0, 1.0
    return s


def accept(k, s, S, grad_norm, inputs=BIG, stochastic=False):
    """finalize of an accepted step; returns the step it applies."""
    red = torch.tensor([S, grad_norm ** 2, 0.0, 0.0, 0.0], dtype=torch.float64)
    coef = torch.zeros(1, dtype=torch.float64)
    k.finalize(red, s, coef, KIND_ACCEPT, [], *inputs, 1.0, 0.0, 1.0, 1.0, 0.0, stochastic,
               False, False)
    return s[STEP].item()


def retrace(k, s, f, f_last, p_sq, stochastic):
    s[DIR_SQ] = p_sq
    red = torch.zeros(RED_WIDTH, dtype=torch.float64)
    k.finalize(red, s, torch.zeros(1, dtype=torch.float64), KIND_RETRACE, [], 0.0, 0.0, 0.0, 1.0,
               0.0, f, f_last, 0.0, stochastic, False, False)
    return s[STEP].item()


def test_same_direction_grows_alpha_by_the_cap(k):
    s = scalars(1e-3, 0.1)
    step = accept(k, s, 0.99999, 1.0, (4.56, 0.5, 10.0))
    assert s[ALPHA].item() == pytest.approx(1e-3 * 4.56)
    assert step == s[ALPHA].item()


def test_orthogonal_gradients_keep_alpha(k):
    s = scalars(0.25, 0.1)
    accept(k, s, 0.0, 1.0)
    assert s[ALPHA].item() == pytest.approx(0.25)


def test_overshoot_shrinks_alpha_to_the_parabola_minimum(k):
    s = scalars(0.2, 0.1)
    accept(k, s, -0.3, 1.0)
    # alpha / h = 0.2 / 1.3, then alpha * S = -0.046 stays above the -0.1 cap
    assert s[ALPHA].item() == pytest.approx(0.2 / 1.3)
    assert s[MEAN_ANGLE].item() == pytest.approx(-0.3 * 0.2 / 1.3)
    assert s[MIN_ANGLE].item() == pytest.approx(-0.3 * 0.2 / 1.3)


def test_angle_cap(k):
    s = scalars(10.0, 0.1)
    accept(k, s, -0.5, 1.0)
    assert s[ALPHA].item() == pytest.approx(0.1 / 0.5)  # alpha * S capped at -0.1


def test_stochastic_lr_schedule_warmup_and_clip(k):
    s = scalars(1e-4, 0.1)
    assert accept(k, s, 0.0, 1.0, (1e6, 0.6, 0.2), True) == pytest.approx(0.2)  # warm-up bound
    accept(k, s, 0.0, 100.0, (1e6, 0.6, 5.0), True)
    assert s[LR].item() == pytest.approx(10.0 / 100.0)  # |lr * g| clipped to 10
    accept(k, s, 0.0, 1.0, (1e6, 1e-9, 5.0), True)
    assert s[LR].item() == pytest.approx(1e-5)  # floor


def test_stochastic_alpha_bounded_by_lr_over_S(k):
    s = scalars(1.0, 0.5)
    accept(k, s, 0.5, 1.0, (1e6, 0.3, 5.0), True)
    # alpha = lr_prev / h = 1.0, then min(alpha, lr / S) = 0.6
    assert s[ALPHA].item() == pytest.approx(0.3 / 0.5)


def test_alpha_clamped(k):
    s = scalars(ALPHA_MAX, 0.1)
    accept(k, s, 1.0, 1.0)
    assert s[ALPHA].item() == ALPHA_MAX
    s = scalars(1e-12, 0.1)
    accept(k, s, 0.0, 1.0)
    assert s[ALPHA].item() == ALPHA_MIN


def test_deterministic_retrace_parabola(k):
    s = scalars(1.0, 0.1)
    # phi(t) = 1 - 2 t + c t^2 with phi(1) = 4  ->  c = 5, minimum at t = 2 / 10
    assert retrace(k, s, 4.0, 1.0, 2.0, False) == pytest.approx(0.2) == s[ALPHA].item()
    assert s[LR].item() == pytest.approx(0.05)


@pytest.mark.parametrize("f,alpha", [(math.nan, 0.01), (math.inf, RETRACE_ALPHA_MIN),
                                     (-5.0, RETRACE_ALPHA_MIN), (-1.0, 0.01)])
def test_deterministic_retrace_fallback(k, f, alpha):
    # as the reference: a NaN loss shrinks alpha 100x (so does a parabola through d = 0, where
    # the factor is not finite); an infinite loss (factor 0) or a parabola without a minimum
    # (factor < 0) sends alpha to its floor
    s = scalars(1.0, 0.1)
    retrace(k, s, f, 1.0, 2.0, False)
    assert s[ALPHA].item() == pytest.approx(alpha)


def test_stochastic_retrace_halves_lr_only(k):
    s = scalars(3.0, 0.4)
    assert retrace(k, s, math.nan, 1.0, 2.0, True) == pytest.approx(0.2) == s[LR].item()
    assert s[ALPHA].item() == 3.0
    s[LR] = 1.5e-5
    retrace(k, s, 1.0, 1.0, 1.0, True)
    assert s[LR].item() == pytest.approx(1e-5)
