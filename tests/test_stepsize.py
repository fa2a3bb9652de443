"""The step-size update on plain floats (points 6 and 7 of the algorithm)."""

import math

import pytest

from elra.control import StepInputs
from elra.stepsize import (ALPHA_MAX, ALPHA_MIN, RETRACE_ALPHA_MIN, Scalars, accepted_update,
                           retrace_update)

BIG = StepInputs(growth=1e6, lr_schedule=0.5, lr_warmup=10.0)


def test_same_direction_grows_alpha_by_the_cap():
    sc = Scalars(alpha=1e-3, lr=0.1)
    s = accepted_update(sc, S=0.99999, grad_norm=1.0, inputs=StepInputs(4.56, 0.5, 10.0),
                        stochastic=False)
    assert sc.alpha == pytest.approx(1e-3 * 4.56)
    assert s == sc.alpha == sc.step_size


def test_orthogonal_gradients_keep_alpha():
    sc = Scalars(alpha=0.25, lr=0.1)
    accepted_update(sc, S=0.0, grad_norm=1.0, inputs=BIG, stochastic=False)
    assert sc.alpha == pytest.approx(0.25)


def test_overshoot_shrinks_alpha_to_the_parabola_minimum():
    sc = Scalars(alpha=0.2, lr=0.1)
    accepted_update(sc, S=-0.3, grad_norm=1.0, inputs=BIG, stochastic=False)
    # alpha / h = 0.2 / 1.3, then alpha * S = -0.046 stays above the -0.1 cap
    assert sc.alpha == pytest.approx(0.2 / 1.3)
    assert sc.mean_angle == pytest.approx(-0.3 * 0.2 / 1.3)
    assert sc.min_angle == pytest.approx(-0.3 * 0.2 / 1.3)


def test_angle_cap():
    sc = Scalars(alpha=10.0, lr=0.1)
    accepted_update(sc, S=-0.5, grad_norm=1.0, inputs=BIG, stochastic=False)
    assert sc.alpha == pytest.approx(0.1 / 0.5)  # alpha * S capped at -0.1


def test_stochastic_lr_schedule_warmup_and_clip():
    sc = Scalars(alpha=1e-4, lr=0.1)
    s = accepted_update(sc, S=0.0, grad_norm=1.0, inputs=StepInputs(1e6, 0.6, 0.2),
                        stochastic=True)
    assert s == sc.lr == pytest.approx(0.2)  # warm-up bound
    accepted_update(sc, S=0.0, grad_norm=100.0, inputs=StepInputs(1e6, 0.6, 5.0),
                    stochastic=True)
    assert sc.lr == pytest.approx(10.0 / 100.0)  # |lr * g| clipped to 10
    accepted_update(sc, S=0.0, grad_norm=1.0, inputs=StepInputs(1e6, 1e-9, 5.0),
                    stochastic=True)
    assert sc.lr == pytest.approx(1e-5)  # floor


def test_stochastic_alpha_bounded_by_lr_over_S():
    sc = Scalars(alpha=1.0, lr=0.5)
    accepted_update(sc, S=0.5, grad_norm=1.0, inputs=StepInputs(1e6, 0.3, 5.0), stochastic=True)
    # alpha = lr_prev / h = 1.0, then min(alpha, lr / S) = 0.6
    assert sc.alpha == pytest.approx(0.3 / 0.5)


def test_alpha_clamped():
    sc = Scalars(alpha=ALPHA_MAX, lr=0.1)
    accepted_update(sc, S=1.0, grad_norm=1.0, inputs=BIG, stochastic=False)
    assert sc.alpha == ALPHA_MAX
    sc = Scalars(alpha=1e-12, lr=0.1)
    accepted_update(sc, S=0.0, grad_norm=1.0, inputs=BIG, stochastic=False)
    assert sc.alpha == ALPHA_MIN


def test_deterministic_retrace_parabola():
    sc = Scalars(alpha=1.0, lr=0.1)
    # phi(t) = 1 - 2 t + c t^2 with phi(1) = 4  ->  c = 5, minimum at t = 2 / 10
    s = retrace_update(sc, f=4.0, f_last=1.0, p_sqnorm=2.0, stochastic=False)
    assert s == sc.alpha == pytest.approx(0.2)
    assert sc.lr == pytest.approx(0.05)


@pytest.mark.parametrize("f,alpha", [(math.nan, 0.01), (math.inf, RETRACE_ALPHA_MIN),
                                     (-5.0, RETRACE_ALPHA_MIN), (-1.0, 0.01)])
def test_deterministic_retrace_fallback(f, alpha):
    # as the reference: a NaN loss shrinks alpha 100x (so does a parabola through d = 0, where
    # the factor is not finite); an infinite loss (factor 0) or a parabola without a minimum
    # (factor < 0) sends alpha to its floor
    sc = Scalars(alpha=1.0, lr=0.1)
    retrace_update(sc, f=f, f_last=1.0, p_sqnorm=2.0, stochastic=False)
    assert sc.alpha == pytest.approx(alpha)


def test_stochastic_retrace_halves_lr_only():
    sc = Scalars(alpha=3.0, lr=0.4)
    s = retrace_update(sc, f=math.nan, f_last=1.0, p_sqnorm=2.0, stochastic=True)
    assert s == sc.lr == pytest.approx(0.2) and sc.alpha == 3.0
    sc.lr = 1.5e-5
    retrace_update(sc, f=1.0, f_last=1.0, p_sqnorm=1.0, stochastic=True)
    assert sc.lr == pytest.approx(1e-5)
