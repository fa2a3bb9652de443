"""The elra:: ops: every kernel table (native C++, pure torch) against float64, and opcheck.

The ops are the engine's whole interface (schemas: elra/_ops.py; slots and codes:
elra/_contract.py), so each backend's kernel of each op is tested here on its own, with the same
random layouts: sizes 0, 1, odd, past the vector width and the chunk size, several segments.
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elra import _ops, kernels_torch as kt, native_status
from elra._contract import (DIR_SCALE, GNA, GRAD_SQ, KIND_ACCEPT, LR, MODE, MODE_REDO, MOVE_S,
                            MOVE_T, NUM_SLOTS, RED_WIDTH, ST_OK, STATUS, XX_CACHE, ALPHA, INV)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
sizes = st.lists(st.sampled_from([0, 1, 3, 7, 8, 15, 16, 17, 33, 1000, 16385, 40000]),
                 min_size=1, max_size=5)
dtypes = st.sampled_from(list(TOL))
HAVE_NATIVE = native_status()["cpu"]
# the pure-torch kernels, registered in a namespace of their own so that opcheck (which calls
# through the dispatcher) tests them and not the native kernels of elra::
_TEST_LIB = _ops.define("elra_torchtest")
# the pure-torch kernels as registered (with their argument checks; the engine calls them
# without, elra.kernels_torch.UNCHECKED)
TABLES = {"torch": _ops.Kernels("torch", *(getattr(kt, op) for op in _ops.OPS), one_pass=False)}
if HAVE_NATIVE:
    TABLES["native"] = _ops.dispatched("elra")
KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not HAVE_NATIVE, reason=f"native kernels not built: {native_status()['error']}"))]


@pytest.fixture(params=KERNELS, scope="module")
def k(request):
    """A kernel table (elra._ops.Kernels)."""
    return TABLES[request.param]


def slots(**values) -> torch.Tensor:
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
    for name, v in values.items():
        scal[globals()[name]] = v
    return scal


def args(n=37):
    g, d, x = torch.randn(n), torch.randn(n), torch.randn(n)
    return g, d, x, slots(ALPHA=0.1, LR=0.1, DIR_SCALE=1.0)


@pytest.mark.parametrize("namespace", ["elra_torchtest", pytest.param("elra", marks=pytest.mark.skipif(
    not HAVE_NATIVE, reason="native kernels not built"))])
def test_opcheck_all_ops(namespace):
    """Schemas, fake kernels (torch.compile), mutation annotations: torch.library.opcheck."""
    from torch.library import opcheck

    ops = getattr(torch.ops, namespace)
    g, d, x, scal = args()
    red, coef = torch.zeros(2 * RED_WIDTH, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    opcheck(ops.reduce.default, (g, d, x, [0, 20, 37], True, red))
    opcheck(ops.finalize.default, (red, scal, coef, KIND_ACCEPT, [0.01, 0.0], 1.0, 0.4, 3.0, 1.0,
                                   0.0, 1.0, 1.0, 0.0, True, False, False))
    opcheck(ops.update.default, (x, d, g, None, scal, coef, [0, 20, 37], 0.0))
    opcheck(ops.collect.default, (torch.zeros(37), g, 0.5, 1.0, True, False, scal))
    dn = torch.zeros(37)
    scal[GNA], scal[XX_CACHE] = 1.5, 40.0
    opcheck(ops.step_fused.default, (x, d, dn, g, scal, [0, 20, 37], 1.0, 0.0, 0.3, [], red))
    opcheck(ops.step_fused.default, (x, d, dn, g, scal, [0, 20, 37], 1.0, 0.5, 0.3,
                                     [0.01, 0.0], red))
    scal[MODE], scal[MOVE_S], scal[MOVE_T] = MODE_REDO, 0.3, 0.1
    opcheck(ops.fixup.default, (x, d, dn, g, scal, coef, [0, 20, 37], 0.5))


def test_fake_kernels_check_shapes_and_dtypes():
    """The fake (meta) kernels reject what the real ones reject, so a compiled graph fails at
    trace time, not on the device."""
    g, d, x, scal = (t.to("meta") for t in args())
    out = torch.zeros(RED_WIDTH, dtype=torch.float64, device="meta")
    torch.ops.elra.reduce(g, d, x, [0, 37], False, out)  # fine
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.elra.reduce(g, d.double(), x, [0, 37], False, out)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.elra.reduce(g, d, x, [0, 37], False, out.float())
    with pytest.raises(RuntimeError, match="bounds"):
        torch.ops.elra.reduce(g, d, x, [0, 30], False, out)


@SETTINGS
@given(seg=sizes, dtype=dtypes, seed=st.integers(0, 2**16), with_x=st.booleans())
def test_reduce_matches_float64(k, seg, dtype, seed, with_x):
    gen = torch.Generator().manual_seed(seed)
    n = sum(seg)
    g, d, x = (torch.randn(n, generator=gen).to(dtype) for _ in range(3))
    bounds = [0] + list(np.cumsum(seg))
    out = torch.full((5 * len(seg),), math.nan, dtype=torch.float64)
    k.reduce(g, d, x, [int(b) for b in bounds], with_x, out)
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
def test_collect_matches_float64(k, n, dtype, seed, first):
    gen = torch.Generator().manual_seed(seed)
    g, c = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    expected = (0 if first else c.double()) + 0.25 * g.double()
    scal = slots()
    k.collect(c, g, 0.25, 0.5, first, False, scal)
    np.testing.assert_allclose(c.double().numpy(), expected.numpy(), rtol=TOL[dtype] * 4,
                               atol=TOL[dtype] * 4)
    assert scal[GRAD_SQ].item() == pytest.approx(0.25 * float(g.double() @ g.double()),
                                                 rel=TOL[dtype] * 10, abs=1e-9)
    assert scal[STATUS].item() == ST_OK


@SETTINGS
@given(seg=sizes, dtype=dtypes, seed=st.integers(0, 2**16),
       mode=st.sampled_from([1, 2, 3]), momentum=st.sampled_from([0.0, 0.5]),
       use_xg=st.booleans())
def test_update_matches_float64(k, seg, dtype, seed, mode, momentum, use_xg):
    gen = torch.Generator().manual_seed(seed)
    n = sum(seg)
    x, d, g, xg = (torch.randn(n, generator=gen).to(dtype) for _ in range(4))
    if mode == 2:
        use_xg = True
    bounds = [0] + [int(b) for b in np.cumsum(seg)]
    coef = torch.tensor([0.01 * (k % 3) for k in range(len(seg))], dtype=torch.float64)
    scal = slots(MODE=mode, MOVE_S=0.3, MOVE_T=0.5, INV=0.75)
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
    k.update(x, d, g, xg if use_xg else None, scal, coef, bounds, momentum)
    tol = TOL[dtype] * 8
    np.testing.assert_allclose(x.double().numpy(), exp_x, rtol=tol, atol=tol)
    np.testing.assert_allclose(d.double().numpy(), exp_d, rtol=tol, atol=tol)
    np.testing.assert_allclose(xg.double().numpy(), exp_xg, rtol=tol, atol=tol)


@SETTINGS
@given(seg=sizes, dtype=dtypes, seed=st.integers(0, 2**16), momentum=st.sampled_from([0.0, 0.5]),
       inv=st.sampled_from([1.0, 0.25]), bad=st.sampled_from([None, math.nan, math.inf]),
       decay=st.booleans())
def test_step_fused_matches_float64(k, seg, dtype, seed, momentum, inv, bad, decay):
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
    scal = slots(GNA=1.5, XX_CACHE=2.0 + n)
    wd = [0.01 * (k % 3) for k in range(len(seg))] if decay else []
    kappa = 1.5 / math.sqrt(2.0 + n)
    C = (np.concatenate([np.full(sz, wd[k] * kappa) for k, sz in enumerate(seg)]) if decay and n
         else np.zeros(n))
    out = torch.full((5 * len(seg),), math.nan, dtype=torch.float64)
    k.step_fused(x, dp, dn, g, scal, bounds, inv, momentum, 0.3, wd, out)
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
def test_fixup_matches_float64(k, seg, dtype, seed, mode, momentum):
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
    scal = slots(MODE=mode, MOVE_S=0.3, MOVE_T=-0.2)  # MOVE_S: u, MOVE_T: r
    k.fixup(x, dp, dn, g, scal, coef, bounds, momentum)
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


def test_bad_inputs_raise_clear_errors(k):
    """Both kernel tables reject bad calls with the same messages."""
    g, d, x, scal = args()
    out = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bounds"):
        k.reduce(g, d, x, [0, 30], False, out)
    with pytest.raises(RuntimeError, match="dtype"):
        k.reduce(g, d.double(), x, [0, 37], False, out)
    with pytest.raises(RuntimeError, match="contiguous"):
        k.reduce(g, torch.randn(74)[::2], x, [0, 37], False, out)
    with pytest.raises(RuntimeError, match="float64"):
        k.reduce(g, d, x, [0, 37], False, torch.zeros(5))
    with pytest.raises(RuntimeError, match="d_new must be a buffer of its own"):
        k.step_fused(x, d, d, g, scal, [0, 37], 1.0, 0.0, 0.1, [], out)
    with pytest.raises(RuntimeError, match="one entry per segment"):
        k.step_fused(x, d, torch.zeros(37), g, scal, [0, 37], 1.0, 0.0, 0.1, [0.1, 0.2], out)
    coef = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        k.fixup(x, d.double(), d, g, scal, coef, [0, 37], 0.0)
    with pytest.raises(RuntimeError, match="one entry per segment"):
        k.finalize(out, scal, coef, KIND_ACCEPT, [0.1, 0.2], 1.0, 0.4, 3.0, 1.0, 0.0, 1.0, 1.0,
                   0.0, True, False, False)
    with pytest.raises(RuntimeError, match="kind"):
        k.finalize(out, scal, coef, 7, [], 1.0, 0.4, 3.0, 1.0, 0.0, 1.0, 1.0, 0.0, True, False,
                   False)
    with pytest.raises(RuntimeError, match="red"):
        k.finalize(torch.zeros(7, dtype=torch.float64), scal, coef, KIND_ACCEPT, [], 1.0, 0.4,
                   3.0, 1.0, 0.0, 1.0, 1.0, 0.0, True, False, False)


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("ELRA_CPU_ISA")), reason="already inside a capped run")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_cpu_code_path(isa):
    """The kernels pick AVX-512, AVX2 or generic loops at run time; on a machine with all three
    the other paths only run when capped (ELRA_CPU_ISA). Rerun the op tests with each cap."""
    import subprocess
    import sys

    env = dict(os.environ, ELRA_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "matches_float64 and native"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout
