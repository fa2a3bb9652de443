"""The host control law on its own: loss statistics, decisions, window, schedule, decay."""

import math

import pytest

from elra import control as C
from elra.control import LossControl, normalize_weight_decay


@pytest.mark.parametrize("value,expected", [(0.0, 0.0), (1e-4, 1e-4), (0.9999, 1e-4),
                                            (0.99999, 1e-5), (1.0, 0.0), (0.05, 0.05)])
def test_weight_decay_normalization(value, expected):
    assert normalize_weight_decay(value) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("value", [-1e-4, 0.1, 0.3, 0.5, 0.85, 1.5, math.nan, math.inf])
def test_weight_decay_out_of_range(value):
    with pytest.raises(ValueError, match="weight_decay"):
        normalize_weight_decay(value)


@pytest.mark.parametrize("value", ["1e-4", None, True])
def test_weight_decay_not_a_number(value):
    with pytest.raises(TypeError):
        normalize_weight_decay(value)


def test_first_step_and_reference_thresholds():
    # Rosenbrock from (0.3, 0.8): the thresholds that calls 2..6 (counted from 0) are measured
    # against follow from the losses before them alone (ELRA_ALGORITHM.md, point 5)
    losses = [50.90000534057617, 50.872344970703125, 50.74625778198242, 48.52437210083008,
              21.755760192871094, 3.7891414165496826]
    c = LossControl(stochastic=False)
    c.begin_step(True)
    c.first_step(losses[0])
    assert c.threshold() == pytest.approx(1.1 * losses[0] + 5 * 0.33 * losses[0])
    seen = []
    for f in losses[1:]:
        c.begin_step(True)
        t = c.accept_test(f, f)
        assert t is not None and t.threshold == c.threshold()  # the bar before this loss
        c.accept(t, f)
        seen.append(c.threshold())
    assert [round(s, 1) for s in seen] == [107.3, 114.3, 112.2, 112.9, 126.7]


def test_an_exploding_loss_never_raises_its_own_bar():
    # Rosenbrock from (-1.2, 1) in float64 reaches these losses; the reference then retraces a
    # loss of 1.4e26. Its threshold after them, found by bisection on the reference: 55.131.
    losses = [24.2, 24.1458, 23.9001, 19.8336, 4.4813, 4.13753, 4.12641, 4.12288, 3.70667, 2.61081]
    c = LossControl(stochastic=False)
    c.begin_step(True)
    c.first_step(losses[0])
    for f in losses[1:]:
        c.begin_step(True)
        c.accept(c.accept_test(f, f), f)
    assert c.threshold() == pytest.approx(55.131, abs=1e-3)
    c.begin_step(True)
    assert c.accept_test(55.1, 55.1) is not None
    assert c.accept_test(55.2, 55.2) is None
    assert c.accept_test(1.43e26, 1.43e26) is None


def test_accept_test_rejects_without_committing():
    c = LossControl(stochastic=True, classes=10)
    c.begin_step(True)
    c.first_step(2.3)
    before = c.to_dict()
    c.begin_step(True)
    assert c.accept_test(1e6, 1e6) is None  # far above the threshold
    assert c.accept_test(math.nan, 2.0) is None
    after = c.to_dict()
    after["steps"], after["window_steps"] = before["steps"], before["window_steps"]
    assert after == before


def test_stochastic_explosion_rule():
    c = LossControl(stochastic=True, classes=10)
    c.begin_step(True)
    c.first_step(1.0)  # f_init = max(1.0, log 10) = 2.30
    assert c.f_init == pytest.approx(math.log(10))
    c.begin_step(True)
    assert c.accept_test(2.5, 2.5) is not None  # below 1.1 * 2.303 = 2.533
    assert c.accept_test(2.6, 2.6) is None  # above it, though under the statistics' threshold
    assert c.accept_test(2.5, 2.6) is None  # the explosion rule looks at the last loss
    d = LossControl(stochastic=False)
    d.begin_step(True)
    d.first_step(1.0)
    d.begin_step(True)
    assert d.accept_test(2.6, 2.6) is not None  # no explosion rule when deterministic


def test_accept_multiplies_growth_and_damps():
    c = LossControl(stochastic=True, warmup=10)
    c.begin_step(True)
    c.first_step(2.0)
    c.begin_step(True)
    t = c.accept_test(1.9, 1.9)
    inputs = c.accept(t, 1.9)
    assert inputs.growth == pytest.approx(1e6 / (1 + 855000 / 3.9))  # 4.56
    assert inputs.growth == pytest.approx(4.5614, rel=1e-4)
    assert inputs.lr_warmup == pytest.approx(0.1 * 2)
    assert inputs.lr_schedule == pytest.approx((2 / 3) ** 1)


@pytest.mark.parametrize("damper,expected", [(855000.0, 855000.0), (100.0, 1600.0),
                                             (0.5, 16.5), (62499.0, 62499.0 * 16)])
def test_retrace_growth_damper(damper, expected):
    c = LossControl(stochastic=False)
    c.growth_damper = damper
    c.retrace()
    assert c.growth_damper == pytest.approx(expected)


def test_retrace_schedule_and_damp():
    c = LossControl(stochastic=True)
    c.schedule, c.lr_damp = 28.2, 0.0015
    c.retrace()
    assert c.schedule == pytest.approx(C.SCHEDULE_MAX)
    assert c.lr_damp == pytest.approx(C.LR_DAMP_MIN)
    assert c.dev_correction == pytest.approx(1.05)


def test_25th_retrace_in_a_window_doubles_collects_only_when_stochastic():
    for stochastic, expected in ((True, 2), (False, 1)):
        c = LossControl(stochastic=stochastic)
        for _ in range(25):
            c.retrace()
        assert c.collects == expected


def test_window_schedule_rules():
    c = LossControl(stochastic=True)
    c.schedule = 3.0
    c.close_window(norm_sum=100.0, mean_angle=0.0, min_angle=-0.5, weight_decay_on=False)
    assert c.schedule == pytest.approx(4.0)  # a strong overshoot raises it
    assert c.grad_norm_avg == pytest.approx(1.0)
    c.close_window(norm_sum=100.0, mean_angle=0.0, min_angle=0.0, weight_decay_on=False)
    assert c.schedule == pytest.approx(4.0 - 0.33)
    # the limit log(gna / clip) / log(1.5) bounds the decay from below
    c.schedule = 1.0
    c.close_window(norm_sum=100.0 * 10.0 * 1.5**2, mean_angle=0.0, min_angle=0.0,
                   weight_decay_on=False)
    assert c.schedule == pytest.approx(2.0)
    # retraces in a quiet window lower it by one more step
    c.schedule = 5.0
    c.retraces_window = 1
    c.close_window(norm_sum=1.0, mean_angle=0.0, min_angle=0.0, weight_decay_on=False)
    assert c.schedule == pytest.approx(5.0 - 1.0 - 0.33)
    assert c.retraces_window == 0


def test_window_with_zero_gradient_norm_is_safe():
    c = LossControl(stochastic=True)
    c.close_window(norm_sum=0.0, mean_angle=0.0, min_angle=0.0, weight_decay_on=True)
    assert math.isfinite(c.schedule)


def test_dynamic_weight_decay_factor():
    c = LossControl(stochastic=True)
    c.valid_loss, c.train_loss = 0.5, 0.1
    c.close_window(100.0, 0.0, 0.0, weight_decay_on=True)
    assert c.wd_dynamic == pytest.approx(min(3.0, math.sqrt(2 * 0.5 / 0.1 - 1)))
    c.valid_loss = 0.05
    c.close_window(100.0, 0.0, 0.0, weight_decay_on=True)
    assert c.wd_dynamic == pytest.approx(1.0)
    c.started = True
    coefs = c.weight_decay_coefficients([1e-4, 0.0])
    assert coefs == [pytest.approx(0.005 * 2 * 1.0), 0.0]


def test_weight_decay_on_the_first_step_only_when_deterministic():
    # as the reference: its first stochastic step moves along g, its first deterministic step
    # along g + 2 * wd * 0.005 * |g| / |x| * x
    c = LossControl(stochastic=True)
    assert c.weight_decay_coefficients([1e-4]) is None  # not started
    c.started = True
    assert c.weight_decay_coefficients([0.0, 0.0]) is None
    assert c.weight_decay_coefficients([1e-4]) == [pytest.approx(0.005 * 2 * 1e-4)]
    d = LossControl(stochastic=False)
    assert d.weight_decay_coefficients([1e-3, 0.0]) == [pytest.approx(0.005 * 2 * 1e-3), 0.0]
    assert d.weight_decay_coefficients([0.0]) is None


def test_long_window_stall_grows_the_batch():
    c = LossControl(stochastic=True, batch_size=768)  # long window = one short window
    assert c.long_window_steps == 100
    c.begin_step(True)
    c.first_step(1.0)
    c.mean_ref = 0.5
    for k in range(6):
        c.window_steps, c.sum_f, c.sum_var = 100, 100.0 * (1.0 + 0.01 * k), 1.0
        c.close_window(100.0, 0.0, 0.0, weight_decay_on=False)
    assert c.increase and c.collects == 2
    # the next long window clears the flag again
    c.window_steps, c.sum_f = 100, 10.0
    c.close_window(100.0, 0.0, 0.0, weight_decay_on=False)
    assert not c.increase and c.collects == 2


def test_long_window_progress_resets_stall():
    c = LossControl(stochastic=True, batch_size=768)
    c.begin_step(True)
    c.first_step(1.0)
    c.window_steps, c.sum_f, c.sum_var = 100, 80.0, 4.0
    c.close_window(100.0, 0.0, 0.0, weight_decay_on=False)
    assert c.mean_ref == pytest.approx(0.8)
    assert c.dev_ref == pytest.approx(math.sqrt(4.0 / 100))
    assert c.window_steps == 0 and c.sum_f == 0.0 and c.stall == 0


def test_control_dict_roundtrip():
    c = LossControl(stochastic=True, batch_size=32, classes=10, warmup=10, collects=4)
    c.window_history = [1.0, 2.0]
    c.valid_loss = 0.3
    d = c.to_dict()
    assert LossControl.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown"):
        LossControl.from_dict({**d, "bogus": 1})
