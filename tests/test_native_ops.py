"""The elra:: operators themselves: schemas (torch.library.opcheck) and each op vs float64."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elra import native_status

pytestmark = pytest.mark.skipif(not native_status()["cpu"],
                                reason=f"native kernels not built: {native_status()['error']}")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
sizes = st.lists(st.sampled_from([0, 1, 3, 7, 8, 15, 16, 17, 33, 1000, 16385, 40000]),
                 min_size=1, max_size=5)
dtypes = st.sampled_from(list(TOL))


def ops():
    return torch.ops.elra


def args(n=37):
    g, d, x = torch.randn(n), torch.randn(n), torch.randn(n)
    scal = torch.zeros(24, dtype=torch.float64)
    scal[0], scal[1], scal[7] = 0.1, 0.1, 1.0
    return g, d, x, scal


def test_opcheck_all_ops():
    from torch.library import opcheck

    g, d, x, scal = args()
    red, coef = torch.zeros(10, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    params = [1.0, 0.4, 3.0, 1.0, 0.0, 1.0, 1.0, 1, 1, 1, 0, 0, 0.0]
    opcheck(ops().reduce.default, (g, d, x, [0, 20, 37], True, red))
    opcheck(ops().finalize.default, (red, scal, coef, params, [0.01, 0.0]))
    opcheck(ops().update.default, (x, d, g, None, scal, coef, [0, 20, 37], 0.0))
    opcheck(ops().collect.default, (torch.zeros(37), g, 0.5, 1.0, True, False, scal))
    dn = torch.zeros(37)
    scal[8], scal[18] = 1.5, 40.0  # GNA, XX_CACHE
    opcheck(ops().step_fused.default, (x, d, dn, g, scal, [0, 20, 37], 1.0, 0.0, 0.3, [], red))
    opcheck(ops().step_fused.default, (x, d, dn, g, scal, [0, 20, 37], 1.0, 0.5, 0.3,
                                       [0.01, 0.0], red))
    scal[10], scal[11], scal[12] = 6, 0.3, 0.1  # MODE_REDO, MOVE_S, MOVE_T
    opcheck(ops().fixup.default, (x, d, dn, g, scal, coef, [0, 20, 37], 0.5))


@SETTINGS
@given(seg=sizes, dtype=dtypes, seed=st.integers(0, 2**16), with_x=st.booleans())
def test_reduce_matches_float64(seg, dtype, seed, with_x):
    gen = torch.Generator().manual_seed(seed)
    n = sum(seg)
    g, d, x = (torch.randn(n, generator=gen).to(dtype) for _ in range(3))
    bounds = [0] + list(np.cumsum(seg))
    out = torch.full((5 * len(seg),), math.nan, dtype=torch.float64)
    ops().reduce(g, d, x, [int(b) for b in bounds], with_x, out)
    G, D, X = (t.double().numpy() for t in (g, d, x))
    for k in range(len(seg)):
        sl = slice(bounds[k], bounds[k + 1])
        exp = [G[sl] @ D[sl], G[sl] @ G[sl]]
        exp += [X[sl] @ D[sl], G[sl] @ X[sl], X[sl] @ X[sl]] if with_x else [0.0, 0.0, 0.0]
        tol = TOL[dtype] * (1 + seg[k])
        np.testing.assert_allclose(out[5 * k:5 * k + 5].numpy(), exp, rtol=TOL[dtype], atol=tol)


@SETTINGS
@given(n=st.sampled_from([0, 1, 7, 16, 17, 40000]), dtype=dtypes, seed=st.integers(0, 2**16),
       first=st.booleans())
def test_collect_matches_float64(n, dtype, seed, first):
    gen = torch.Generator().manual_seed(seed)
    g, c = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    expected = (0 if first else c.double()) + 0.25 * g.double()
    scal = torch.zeros(24, dtype=torch.float64)
    ops().collect(c, g, 0.25, 0.5, first, False, scal)
    np.testing.assert_allclose(c.double().numpy(), expected.numpy(), rtol=TOL[dtype] * 4,
                               atol=TOL[dtype] * 4)
    assert scal[14].item() == pytest.approx(0.25 * float(g.double() @ g.double()),
                                            rel=TOL[dtype] * 10, abs=1e-9)
    assert scal[9].item() == 0.0  # status: fine


@SETTINGS
@given(seg=sizes, dtype=dtypes, seed=st.integers(0, 2**16),
       mode=st.sampled_from([1, 2, 3]), momentum=st.sampled_from([0.0, 0.5]),
       use_xg=st.booleans())
def test_update_matches_float64(seg, dtype, seed, mode, momentum, use_xg):
    gen = torch.Generator().manual_seed(seed)
    n = sum(seg)
    x, d, g, xg = (torch.randn(n, generator=gen).to(dtype) for _ in range(4))
    if mode == 2:
        use_xg = True
    bounds = [0] + [int(b) for b in np.cumsum(seg)]
    coef = torch.tensor([0.01 * (k % 3) for k in range(len(seg))], dtype=torch.float64)
    scal = torch.zeros(24, dtype=torch.float64)
    scal[10], scal[11], scal[12], scal[13] = mode, 0.3, 0.5, 0.75  # mode, s, t, inv
    X, Dd, G, XG = (t.double().numpy().copy() for t in (x, d, g, xg))
    C = np.concatenate([np.full(s, coef[k].item()) for k, s in enumerate(seg)]) if n else X
    if mode == 1:
        dn = 0.75 * G + C * X
        if momentum:
            dn = momentum * Dd + (1 - momentum) * dn
        exp_x, exp_d, exp_xg = X - 0.3 * dn, dn, (X if use_xg else XG)
    elif mode == 2:
        exp_x, exp_d, exp_xg = XG - 0.3 * Dd, Dd, XG
    else:
        exp_x, exp_d, exp_xg = X + (0.5 - 0.3) * Dd, Dd, XG
    ops().update(x, d, g, xg if use_xg else None, scal, coef, bounds, momentum)
    tol = TOL[dtype] * 8
    np.testing.assert_allclose(x.double().numpy(), exp_x, rtol=tol, atol=tol)
    np.testing.assert_allclose(d.double().numpy(), exp_d, rtol=tol, atol=tol)
    np.testing.assert_allclose(xg.double().numpy(), exp_xg, rtol=tol, atol=tol)


@SETTINGS
@given(seg=sizes, dtype=dtypes, seed=st.integers(0, 2**16), momentum=st.sampled_from([0.0, 0.5]),
       inv=st.sampled_from([1.0, 0.25]), bad=st.sampled_from([None, math.nan, math.inf]),
       decay=st.booleans())
def test_step_fused_matches_float64(seg, dtype, seed, momentum, inv, bad, decay):
    """One pass: the sums of reduce, the direction and move of update (where g is finite); with
    weight decay c = wd * grad_norm_avg / sqrt(cached |x|^2) from the scalar slots."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(seg)
    x, dp, g = (torch.randn(n, generator=gen).to(dtype) for _ in range(3))
    if bad is not None and n:
        g[seed % n] = bad
    dn = torch.full((n,), math.nan).to(dtype)
    bounds = [0] + [int(b) for b in np.cumsum(seg)]
    X, DP, G = (t.double().numpy().copy() for t in (x, dp, g))
    scal = torch.zeros(24, dtype=torch.float64)
    scal[8], scal[18] = 1.5, 2.0 + n  # GNA, XX_CACHE
    wd = [0.01 * (k % 3) for k in range(len(seg))] if decay else []
    kappa = 1.5 / math.sqrt(2.0 + n)
    C = (np.concatenate([np.full(sz, wd[k] * kappa) for k, sz in enumerate(seg)]) if decay and n
         else np.zeros(n))
    out = torch.full((5 * len(seg),), math.nan, dtype=torch.float64)
    ops().step_fused(x, dp, dn, g, scal, bounds, inv, momentum, 0.3, wd, out)
    exp_dn = inv * G + C * X
    if momentum:
        exp_dn = momentum * DP + (1 - momentum) * exp_dn
    fin = np.isfinite(G)
    exp_x = np.where(fin, X - 0.3 * exp_dn, X)
    tol = TOL[dtype] * 8
    np.testing.assert_allclose(x.double().numpy(), exp_x, rtol=tol, atol=tol)
    np.testing.assert_array_equal(x.double().numpy()[~fin], X[~fin])  # kept exactly
    np.testing.assert_allclose(dn.double().numpy()[fin], exp_dn[fin], rtol=tol, atol=tol)
    if bad is None:
        for k in range(len(seg)):
            sl = slice(bounds[k], bounds[k + 1])
            exp = [G[sl] @ DP[sl], G[sl] @ G[sl]]
            exp += [X[sl] @ DP[sl], G[sl] @ X[sl], X[sl] @ X[sl]] if decay else [0.0, 0.0, 0.0]
            np.testing.assert_allclose(out[5 * k:5 * k + 5].numpy(), exp, rtol=TOL[dtype],
                                       atol=TOL[dtype] * (1 + seg[k]))


@SETTINGS
@given(seg=sizes, dtype=dtypes, seed=st.integers(0, 2**16), mode=st.sampled_from([0, 1, 4, 5, 6]),
       momentum=st.sampled_from([0.0, 0.5]))
def test_fixup_matches_float64(seg, dtype, seed, mode, momentum):
    """MODE_SHIFT moves x along d_new; MODE_UNDO_RETRACE undoes the move where g is finite,
    retraces along d_prev and restores d_prev; MODE_REDO redoes the move with the segment's
    corrected c; other modes leave everything alone."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(seg)
    x, dp, dn, g = (torch.randn(n, generator=gen).to(dtype) for _ in range(4))
    if n and mode != 6:
        g[seed % n] = math.nan
    bounds = [0] + [int(b) for b in np.cumsum(seg)]
    X, DP, DN, G = (t.double().numpy().copy() for t in (x, dp, dn, g))
    coef = torch.tensor([0.02 * (k % 3) - 0.01 for k in range(len(seg))], dtype=torch.float64)
    DC = np.concatenate([np.full(sz, coef[k].item()) for k, sz in enumerate(seg)]) if n else X
    scal = torch.zeros(24, dtype=torch.float64)
    scal[10], scal[11], scal[12] = mode, 0.3, -0.2  # MODE, MOVE_S (u), MOVE_T (r)
    ops().fixup(x, dp, dn, g, scal, coef, bounds, momentum)
    if mode == 4:
        exp_x, exp_dn = X + 0.3 * DN, DN
    elif mode == 5:
        exp_x, exp_dn = np.where(np.isfinite(G), X + 0.3 * DN, X) - 0.2 * DP, DP
    elif mode == 6:
        xo = X + 0.3 * DN
        exp_dn = DN + (1 - momentum) * DC * xo
        exp_x = xo + 0.2 * exp_dn
    else:
        exp_x, exp_dn = X, DN
    tol = TOL[dtype] * 8
    np.testing.assert_allclose(x.double().numpy(), exp_x, rtol=tol, atol=tol)
    np.testing.assert_allclose(dn.double().numpy(), exp_dn, rtol=tol, atol=tol)
    np.testing.assert_array_equal(dp.double().numpy(), DP)


def test_bad_inputs_raise_clear_errors():
    g, d, x, scal = args()
    out = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bounds"):
        ops().reduce(g, d, x, [0, 30], False, out)
    with pytest.raises(RuntimeError, match="dtype"):
        ops().reduce(g, d.double(), x, [0, 37], False, out)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops().reduce(g, torch.randn(74)[::2], x, [0, 37], False, out)
    with pytest.raises(RuntimeError, match="float64"):
        ops().reduce(g, d, x, [0, 37], False, torch.zeros(5))
    with pytest.raises(RuntimeError, match="d_new must be a buffer of its own"):
        ops().step_fused(x, d, d, g, scal, [0, 37], 1.0, 0.0, 0.1, [], out)
    with pytest.raises(RuntimeError, match="one entry per segment"):
        ops().step_fused(x, d, torch.zeros(37), g, scal, [0, 37], 1.0, 0.0, 0.1, [0.1, 0.2], out)
    coef = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        ops().fixup(x, d.double(), d, g, scal, coef, [0, 37], 0.0)


@pytest.mark.skipif(bool(os.environ.get("ELRA_CPU_ISA")), reason="already inside a capped run")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_cpu_code_path(isa):
    """The kernels pick AVX-512, AVX2 or generic loops at run time; on a machine with all three
    the other paths only run when capped (ELRA_CPU_ISA). Rerun the op tests with each cap."""
    import subprocess
    import sys

    env = dict(os.environ, ELRA_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "matches_float64"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


def test_python_constants_match_the_kernel_header():
    """engine_native.py mirrors the slot, mode, status and kind numbers of csrc/elra_math.h."""
    import re
    from pathlib import Path

    from elra import engine_native as en

    header = (Path(__file__).resolve().parents[1] / "csrc" / "elra_math.h").read_text()
    values = {name: int(v) for name, v in re.findall(r"\b([A-Z][A-Z0-9_]+) = (\d+)", header)}
    for name in ("ALPHA", "LR", "STEP", "MEAN_ANGLE", "MIN_ANGLE", "NORM_SUM", "DIR_SQ",
                 "DIR_SCALE", "GNA", "STATUS", "MODE", "GRAD_SQ", "APPLIED", "HAS_POINT",
                 "CLIPPED", "NUM_SLOTS", "MODE_NONE", "ST_OK", "ST_RETRACE", "ST_BAD_GRADIENT",
                 "ST_NONE", "KIND_FIRST", "KIND_ACCEPT", "KIND_RETRACE", "KIND_ACCEPT_FUSED"):
        assert getattr(en, name) == values[name], name
    assert en.MAX_SEGMENTS == int(re.search(r"MAX_SEGMENTS = (\d+)", header).group(1))
    assert en.RED_WIDTH == int(re.search(r"RED_WIDTH = (\d+)", header).group(1))
