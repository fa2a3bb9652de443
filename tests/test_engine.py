"""The pure-torch engine against a float64 reference, on random layouts (hypothesis)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elra.control import StepInputs
from elra.engine import TorchEngine
from elra.flat_buffer import FlatBuffer
from elra.stepsize import Scalars, accepted_update

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

layouts = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1)), min_size=1, max_size=6)


def make(layout, seed, stochastic=True, momentum=0.0, dtype=torch.float32):
    """Parameters of the given (size, group) layout with random values, grads and direction."""
    gen = torch.Generator().manual_seed(seed)
    layout = sorted(layout, key=lambda t: t[1])  # the buffer is ordered by group
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype))
              for n, _ in layout]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
    buf = FlatBuffer(params, [g for _, g in layout])
    eng = TorchEngine([buf], stochastic=stochastic, momentum=momentum, alpha=0.3, lr=0.2)
    d = torch.randn(buf.numel, generator=gen, dtype=torch.float64).to(dtype)
    eng.direction[0].copy_(d)
    eng.dir_sqnorm = float(d.double().dot(d.double()))
    eng.dir_scale = 0.7 if momentum else 1.0
    groups = np.concatenate([np.full(n, g) for n, g in layout]) if buf.numel else np.zeros(0)
    return buf, eng, groups


def f64(t):
    return t.detach().double().numpy().copy()


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), inv=st.sampled_from([1.0, 0.25, 1 / 3]),
       wd=st.sampled_from([None, (0.01, 0.0), (0.0, 0.02), (0.01, 0.03)]),
       gna=st.sampled_from([0.0, 1.5]))
def test_reductions_match_float64(layout, seed, inv, wd, gna):
    buf, eng, groups = make(layout, seed)
    g, x, d = f64(buf.grad), f64(buf.data), f64(eng.direction[0])
    red = eng.reduce(False, inv, list(wd) if wd else None, gna)
    assert red.finite
    gp = inv * g
    if wd is not None:
        xn = math.sqrt(x @ x)
        k = (gna if gna > 0 else math.sqrt(gp @ gp)) / xn if xn > 0 else 0.0
        gp = gp + np.array([wd[int(i)] for i in groups]) * k * x
    tol = dict(rel=1e-5, abs=1e-5 * (1 + math.sqrt((gp @ gp) * (d @ d))))
    assert red.gd == pytest.approx(gp @ d, **tol)
    assert red.gg == pytest.approx(gp @ gp, rel=1e-5, abs=1e-6)
    assert red.grad_norm == pytest.approx(math.sqrt(gp @ gp), rel=1e-5, abs=1e-6)


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), momentum=st.sampled_from([0.0, 0.9]),
       stochastic=st.booleans(), wd=st.sampled_from([None, (0.01, 0.02)]))
def test_apply_matches_float64(layout, seed, momentum, stochastic, wd):
    buf, eng, groups = make(layout, seed, stochastic, momentum)
    g, x, d = f64(buf.grad), f64(buf.data), f64(eng.direction[0])
    dsq, dscale = eng.dir_sqnorm, eng.dir_scale
    red = eng.reduce(False, 0.5, list(wd) if wd else None, 2.0)
    inputs = StepInputs(growth=17.8, lr_schedule=0.4, lr_warmup=3.0)
    ref = Scalars(alpha=0.3, lr=0.2)
    S = red.gd / (dscale * dsq) if dsq > 0 else 0.0
    s = accepted_update(ref, S, red.grad_norm, inputs, stochastic)
    step = eng.apply(red, False, 0.5, inputs)
    assert step == s and eng.scalars.alpha == ref.alpha and eng.scalars.lr == ref.lr
    gp = 0.5 * g
    if wd is not None:
        xn = math.sqrt(x @ x)
        gp = gp + np.array([wd[int(i)] for i in groups]) * (2.0 / xn if xn > 0 else 0.0) * x
    d_new = momentum * d + (1 - momentum) * gp
    np.testing.assert_allclose(f64(eng.direction[0]), d_new, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(buf.data), x - s * d_new, rtol=1e-5, atol=1e-6)
    assert eng.dir_sqnorm == pytest.approx(d_new @ d_new, rel=1e-4, abs=1e-6)
    if momentum and d_new @ d_new > 0:
        assert eng.dir_scale == pytest.approx((gp @ d_new) / (d_new @ d_new), rel=1e-3, abs=1e-5)
    # the user's gradients are never modified
    np.testing.assert_array_equal(f64(buf.grad), g)


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), stochastic=st.booleans())
def test_retrace_returns_to_the_last_good_point(layout, seed, stochastic):
    buf, eng, _ = make(layout, seed, stochastic)
    red = eng.reduce(False, 1.0, None, 0.0)
    x_good = f64(buf.data)
    eng.apply(red, False, 1.0, StepInputs(1e3, 0.4, 3.0))
    d = f64(eng.direction[0])
    s_new = eng.retrace(f=math.nan, f_last=1.0)
    expected = x_good - s_new * d
    scale = np.abs(x_good) + np.abs(eng.scalars.step_size * d) * 4
    if stochastic:  # algebraic restore: exact to a rounding of the step
        assert np.all(np.abs(f64(buf.data) - expected) <= 4e-7 * scale + 1e-30)
    else:  # kept copy: exact
        ref = torch.add(torch.tensor(x_good, dtype=torch.float32),
                        torch.tensor(d, dtype=torch.float32), alpha=-s_new)
        assert torch.equal(buf.data, ref)


@SETTINGS
@given(layout=layouts, seed=st.integers(0, 2**16), n=st.integers(1, 4))
def test_collect_averages(layout, seed, n):
    buf, eng, _ = make(layout, seed)
    eng.ensure_collection()
    gen = torch.Generator().manual_seed(seed + 1)
    grads = []
    for _ in range(n):
        buf.grad.copy_(torch.randn(buf.numel, generator=gen))
        grads.append(f64(buf.grad))
        assert eng.collect(1.0 / n, 0.5)
    np.testing.assert_allclose(f64(eng.collected[0]), 0.5 * np.mean(grads, axis=0),
                               rtol=1e-5, atol=1e-6)
    assert eng.collected_count == n


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradient_is_rejected_without_side_effects(bad):
    buf, eng, _ = make([(5, 0), (3, 0)], 0)
    buf.grad[2] = bad
    eng.ensure_collection()
    before = [t.clone() for t in (buf.data, eng.direction[0])]
    assert not eng.reduce(False, 1.0, None, 0.0).finite
    assert not eng.collect(1.0, 1.0)
    assert eng.collected_count == 0
    assert torch.equal(before[0], buf.data) and torch.equal(before[1], eng.direction[0])


def test_half_precision_overflow_limit():
    buf, eng, _ = make([(4, 0)], 0, dtype=torch.bfloat16)
    buf.grad.fill_(4e4)  # |g| = 8e4 >= 65e3
    assert not eng.reduce(False, 1.0, None, 0.0).finite
    buf.grad.fill_(1e3)
    assert eng.reduce(False, 1.0, None, 0.0).finite
    assert eng.retrace_point[0] is not None  # half buffers always keep the exact copy
