"""The CUDA kernels of the elra:: operators against the CPU kernels (differential tests).

Every test runs on each target of tests/cuda_targets.py: the CUDA kernels on the GPU (where there
is one and a CUDA build of elra) and, always, the same kernels and glue compiled by the host
compiler against the CPU emulation of csrc/cuda/emulation (threads as fibers, blocks in order,
at most 3 blocks per segment, so that the sizes below take many grid-stride passes).

Same inputs on both sides, outputs compared with dtype-aware tolerances: the kernels share the
math of csrc/elra_math.h, but sum in a different order (per thread and per block on the GPU, per
chunk and lane on the CPU) and the GPU fuses multiply-adds, so results agree to rounding, not
bit for bit. Layouts: random segment sizes including 0, 1 and odd ones, up to MAX_SEGMENTS
segments, buffers that start at unaligned addresses (the same offset for all buffers: 16-byte
packs with a scalar head and tail; different offsets: the scalar path), and sizes past one grid
pass. The largest deviation of each op and dtype is printed at the end of the run.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elra  # noqa: F401  (loads elra._C, which registers the ops)
import cuda_targets
from elra._contract import (ALPHA, DIR_SCALE, DIR_SQ, GNA, GRAD_SQ, INV, KIND_ACCEPT, LR,
                            MAX_SEGMENTS, MEAN_ANGLE, MIN_ANGLE, MODE, MOVE_S, MOVE_T, NORM_SUM,
                            NUM_SLOTS, ST_BAD_GRADIENT, ST_OK, STATUS, STEP, XX_CACHE)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
# sums: relative to the sum of the absolute values of the terms (half types sum in float32)
SUM_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 255, 1000, 4097, 16385, 100003]
@pytest.fixture(params=cuda_targets.target_params(), scope="module")
def target(request):
    return cuda_targets.get(request.param)


record = cuda_targets.record


def assert_close(target, what, got, exp, tol, equal_nan=False):
    """assert_close with rtol = atol = tol, recording the deviation."""
    got, exp = got.cpu(), exp.cpu()
    record(target, what, exp.dtype, got.double(), exp.double(), tol * (1 + exp.double().abs()))
    torch.testing.assert_close(got, exp, rtol=tol, atol=tol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


CPU = torch.ops.elra  # the reference: the CPU kernels (native, or pure torch without elra._C)


def elem_tol(dtype):
    """Element-wise: a few units in the last place of the storage type (float32 and float64:
    more, as the GPU fuses multiply-adds that can cancel)."""
    return (4 if dtype in HALF else 16) * torch.finfo(dtype).eps


def segments(rng, max_segs=5):
    return [int(rng.choice(SIZES)) for _ in range(int(rng.integers(1, max_segs + 1)))]


def bounds_of(seg):
    return [0] + [int(b) for b in np.cumsum(seg)]


def randn(n, dtype, gen, scale=1.0):
    return (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)


def offsets(rng, k, mixed):
    """Storage offsets for k buffers: all equal (pack path) or not (scalar path)."""
    if mixed:
        return [int(o) for o in rng.choice([0, 1, 2, 3, 5], size=k)]
    return [int(rng.choice([0, 1, 3, 5]))] * k


def assert_sums_close(target, what, dtype, got, exp, scale, tol):
    got, exp, scale = (np.asarray(v, dtype=np.float64) for v in (got, exp, scale))
    record(target, what, dtype, got, exp, tol * scale)
    err = np.abs(got - exp)
    bad = err > tol * scale + 1e-300
    assert not bad.any(), (f"sums differ at {np.flatnonzero(bad)}: device {got[bad]}, "
                           f"cpu {exp[bad]}, allowed {tol * scale[bad]}")


def f64(target, n):
    return torch.full((n,), math.nan, dtype=torch.float64, device=target.device)


# --- reduce --------------------------------------------------------------------------------------
def reduce_scale(g, d, x, bounds, with_x):
    G, D, X = (t.double().numpy() for t in (g, d, x))
    out = []
    for k in range(len(bounds) - 1):
        s = slice(bounds[k], bounds[k + 1])
        out += [np.abs(G[s] * D[s]).sum(), (G[s] ** 2).sum()]
        out += ([np.abs(X[s] * D[s]).sum(), np.abs(G[s] * X[s]).sum(), (X[s] ** 2).sum()]
                if with_x else [0.0, 0.0, 0.0])
    return np.array(out)


def check_reduce(target, seg, dtype, with_x, seed, mixed):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n, bounds = sum(seg), bounds_of(seg)
    g, d, x = (randn(n, dtype, gen) for _ in range(3))
    gg, dg, xg = (target.put(t, o) for t, o in zip((g, d, x), offsets(rng, 3, mixed)))
    out_cpu = torch.full((5 * len(seg),), math.nan, dtype=torch.float64)
    out_dev = f64(target, 5 * len(seg))
    CPU.reduce(g, d, x, bounds, with_x, out_cpu)
    target.ops.reduce(gg, dg, xg, bounds, with_x, out_dev)
    got = out_dev.cpu()
    assert_sums_close(target, "reduce", dtype, got, out_cpu, reduce_scale(g, d, x, bounds, with_x),
                      SUM_TOL[dtype])
    if not with_x:
        assert (got.view(-1, 5)[:, 2:] == 0).all()
    # deterministic: the same sums, bit for bit, on a second call
    again = torch.full_like(out_dev, math.nan)
    target.ops.reduce(gg, dg, xg, bounds, with_x, again)
    assert torch.equal(again, out_dev)
    # inputs untouched
    for a, b in ((g, gg), (d, dg), (x, xg)):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_x", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_reduce_matches_cpu(target, dtype, with_x, mixed, seed):
    rng = np.random.default_rng(1000 + seed)
    check_reduce(target, segments(rng), dtype, with_x, seed, mixed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_sizes_0_1_and_many_segments(target, dtype):
    check_reduce(target, [0], dtype, True, 1, False)
    check_reduce(target, [1], dtype, True, 2, False)
    check_reduce(target, [0, 1, 0, 3, 0], dtype, True, 3, True)
    rng = np.random.default_rng(4)
    seg = [int(rng.choice([0, 1, 5, 17, 300])) for _ in range(MAX_SEGMENTS)]
    check_reduce(target, seg, dtype, True, 5, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reduce_past_the_block_cap(target, dtype):
    # more than one grid pass: the blocks of the segment walk it more than once
    check_reduce(target, [2 * target.grid_pass(dtype) + 1001, 3], dtype, True, 6, False)


# --- collect -------------------------------------------------------------------------------------
def check_collect(target, n, dtype, first, seed, mixed, scale=1.0, bad=None):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    g, c = randn(n, dtype, gen, scale), randn(n, dtype, gen)
    if bad is not None and n:
        g[int(rng.integers(n))] = bad
    o1, o2 = offsets(rng, 2, mixed)
    gg, cg = target.put(g, o1), target.put(c, o2)
    half = dtype in HALF
    scal = torch.arange(NUM_SLOTS, dtype=torch.float64) + 0.5
    scal_g = target.copy(scal)
    CPU.collect(c, g, 0.3, 0.5, first, half, scal)
    target.ops.collect(cg, gg, 0.3, 0.5, first, half, scal_g)
    assert_close(target, "collect", cg, c, elem_tol(dtype), equal_nan=True)
    got = scal_g.cpu()
    assert got[STATUS] == scal[STATUS]
    others = [i for i in range(NUM_SLOTS) if i not in (STATUS, GRAD_SQ)]
    assert torch.equal(got[others], scal[others])  # only the two slots are written
    if math.isfinite(scal[GRAD_SQ]):
        ref = 0.25 * float((g.double() ** 2).sum())
        assert_sums_close(target, "collect |g|^2", dtype, [got[GRAD_SQ]], [scal[GRAD_SQ]],
                          [ref], SUM_TOL[dtype])
    else:
        assert not math.isfinite(got[GRAD_SQ])
    return int(got[STATUS])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
def test_collect_matches_cpu(target, dtype, first, mixed):
    for i, n in enumerate([0, 1, 7, 16, 17, 1000, 100003]):
        assert check_collect(target, n, dtype, first, 10 * i + int(first), mixed) == ST_OK


@pytest.mark.parametrize("dtype", DTYPES)
def test_collect_flags_bad_gradients(target, dtype):
    assert check_collect(target, 1001, dtype, False, 3, False, bad=math.inf) == ST_BAD_GRADIENT
    assert check_collect(target, 1001, dtype, True, 4, False, bad=math.nan) == ST_BAD_GRADIENT
    if dtype in HALF:  # |inv * g| >= 65e3 is too large for a half-precision buffer
        assert check_collect(target, 1001, dtype, False, 5, False, scale=6e3) == ST_BAD_GRADIENT


def test_collect_past_the_block_cap(target):
    n = 2 * target.grid_pass(torch.float32) + 1001
    assert check_collect(target, n, torch.float32, False, 7, False) == ST_OK


# --- finalize ------------------------------------------------------------------------------------
def finalize_case(rng, nseg):
    """Random reductions, slots and host parameters covering finalize's branches."""
    red = rng.normal(size=(nseg, 5)) * rng.choice([1e-3, 1.0, 1e3])
    red[:, 1] = np.abs(red[:, 1])  # |g|^2, |x|^2
    red[:, 4] = np.abs(red[:, 4])
    if rng.random() < 0.15:
        red[int(rng.integers(nseg)), int(rng.integers(5))] = rng.choice([math.nan, math.inf])
    scal = np.zeros(NUM_SLOTS)
    scal[ALPHA], scal[LR], scal[STEP] = rng.uniform(1e-3, 1.0, size=3)
    scal[MEAN_ANGLE], scal[MIN_ANGLE] = -rng.uniform(0, 1), -rng.uniform(0, 0.2)
    scal[NORM_SUM] = rng.uniform(0, 10)
    scal[DIR_SQ] = rng.choice([0.0, rng.uniform(0.1, 100)])
    scal[DIR_SCALE] = rng.choice([1.0, 0.7, -0.3])
    scal[GNA] = rng.choice([0.0, 1.5])
    scal[STATUS], scal[MODE] = 3, 1
    kind = int(rng.integers(4))  # KIND_*; 3: after step_fused
    wd = [float(v) for v in rng.choice([0.0, 1e-4, 1e-2], size=nseg)] if rng.integers(2) else []
    params = dict(growth=float(rng.choice([1.3, 3.0])), lr_schedule=rng.uniform(1e-6, 0.5),
                  lr_warmup=rng.uniform(1e-6, 0.5), inv=float(rng.choice([1.0, 0.5, 2.0 ** -10])),
                  momentum=float(rng.choice([0.0, 0.9])), f=rng.normal(), f_last=rng.normal(),
                  spec=rng.uniform(1e-5, 0.5),  # the step step_fused applied
                  stochastic=bool(rng.integers(2)), half=bool(rng.integers(2)),
                  keep_copy=bool(rng.integers(2)))
    return red.ravel(), scal, kind, wd, params


def test_finalize_matches_cpu(target):
    rng = np.random.default_rng(11)
    for case in range(300):
        nseg = int(rng.choice([1, 2, 5, MAX_SEGMENTS]))
        red, scal, kind, wd, params = finalize_case(rng, nseg)
        tensors = []
        for ops, dev in ((CPU, torch.device("cpu")), (target.ops, target.device)):
            r = torch.tensor(red, dtype=torch.float64, device=dev)
            s = torch.tensor(scal, dtype=torch.float64, device=dev)
            c = torch.full((nseg,), math.nan, dtype=torch.float64, device=dev)
            ops.finalize(r, s, c, kind, wd, **params)
            tensors.append((s.cpu(), c.cpu()))
        for cpu, dev, what in zip(tensors[0], tensors[1], ("slots", "coef")):
            record(target, f"finalize {what}", torch.float64, dev, cpu, 1e-13 + 1e-10 * cpu.abs())
            torch.testing.assert_close(dev, cpu, rtol=1e-10, atol=1e-13, equal_nan=True,
                                       msg=lambda m: f"case {case} ({what}, params {params}): {m}")


# --- update --------------------------------------------------------------------------------------
def check_update(target, seg, dtype, mode, momentum, use_xg, seed, mixed):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n, bounds = sum(seg), bounds_of(seg)
    x, d, g, xg = (randn(n, dtype, gen) for _ in range(4))
    coef = torch.tensor([rng.choice([0.0, 0.01, -0.2]) for _ in seg], dtype=torch.float64)
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
    scal[MODE], scal[MOVE_S], scal[MOVE_T], scal[INV] = mode, 0.3, 0.5, 0.75
    on_dev = [target.put(t, o) for t, o in zip((x, d, g, xg), offsets(rng, 4, mixed))]
    before = [t.clone() for t in (x, d, g, xg)]
    CPU.update(x, d, g, xg if use_xg else None, scal, coef, bounds, momentum)
    X, D, G, XG = on_dev
    target.ops.update(X, D, G, XG if use_xg else None, target.copy(scal), target.copy(coef),
                      bounds, momentum)
    for name, cpu, dev in zip("x d g xg".split(), (x, d, g, xg), on_dev):
        if mode == 0:  # MODE_NONE: nothing moves
            assert torch.equal(dev.cpu(), cpu), name
        assert_close(target, f"update {name}", dev, cpu, elem_tol(dtype))
    assert torch.equal(G.cpu(), before[2])  # g is only read


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("use_xg", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
def test_update_matches_cpu(target, dtype, mode, momentum, use_xg, mixed):
    if mode == 2 and not use_xg:
        pytest.skip("a copy retrace needs the copy (see test_copy_retrace_without_copy)")
    rng = np.random.default_rng(100 * mode + 10 * int(use_xg) + int(mixed))
    for i in range(3):
        check_update(target, segments(rng), dtype, mode, momentum, use_xg, i, mixed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_sizes_0_1_and_many_segments(target, dtype):
    rng = np.random.default_rng(5)
    seg = [int(rng.choice([0, 1, 5, 17, 300])) for _ in range(MAX_SEGMENTS)]
    for mode in (1, 2, 3):
        check_update(target, [0], dtype, mode, 0.0, True, 1, False)
        check_update(target, [1], dtype, mode, 0.5, True, 2, False)
        check_update(target, [0, 1, 0, 3, 0], dtype, mode, 0.0, True, 3, True)
        check_update(target, seg, dtype, mode, 0.5, True, 4, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_past_the_block_cap(target, dtype):
    check_update(target, [2 * target.grid_pass(dtype) + 1001, 5], dtype, 1, 0.9, True, 7, False)


# --- step_fused and fixup --------------------------------------------------------------------
def check_fused(target, seg, dtype, momentum, seed, mixed, bad=False, decay=False):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n, bounds = sum(seg), bounds_of(seg)
    x, dp, g = (randn(n, dtype, gen) for _ in range(3))
    if bad and n:
        g[int(rng.integers(n))] = rng.choice([math.nan, math.inf])
    dn = torch.full((n,), math.nan, dtype=dtype)
    X, DP, DN, G = (target.put(t, o) for t, o in zip((x, dp, dn, g), offsets(rng, 4, mixed)))
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
    scal[GNA], scal[XX_CACHE] = 1.5, 3.0 + n
    wd = [float(v) for v in rng.choice([0.0, 1e-3, 2e-2], size=len(seg))] if decay else []
    out_cpu = torch.full((5 * len(seg),), math.nan, dtype=torch.float64)
    out_dev = f64(target, 5 * len(seg))
    CPU.step_fused(x, dp, dn, g, scal, bounds, 0.75, momentum, 0.3, wd, out_cpu)
    target.ops.step_fused(X, DP, DN, G, target.copy(scal), bounds, 0.75, momentum, 0.3, wd,
                          out_dev)
    if not bad:
        assert_sums_close(target, "step_fused sums", dtype, out_dev.cpu(), out_cpu,
                          reduce_scale(g, dp, x, bounds, decay), SUM_TOL[dtype])
    tol = elem_tol(dtype)
    for name, cpu, dev in (("x", x, X), ("d_new", dn, DN)):
        assert_close(target, f"step_fused {name}", dev, cpu, tol, equal_nan=True)
    coef = torch.tensor([rng.choice([0.0, 0.01, -0.2]) for _ in seg], dtype=torch.float64)
    for mode in (4, 5, 6):  # MODE_SHIFT, MODE_UNDO_RETRACE, MODE_REDO
        scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
        scal[MODE], scal[MOVE_S], scal[MOVE_T] = mode, 0.3, -0.2
        a = [t.clone() for t in (x, dp, dn, g)]
        b = [t.clone() for t in (X, DP, DN, G)]
        CPU.fixup(*a, scal, coef, bounds, momentum)
        target.ops.fixup(*b, target.copy(scal), target.copy(coef), bounds, momentum)
        for name, cpu, dev in zip(("x", "d_prev", "d_new", "g"), a, b):
            assert_close(target, f"fixup {mode} {name}", dev, cpu, tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("decay", [False, True])
def test_step_fused_and_fixup_match_cpu(target, dtype, momentum, mixed, bad, decay):
    rng = np.random.default_rng(77)
    for seed in range(3):
        check_fused(target, segments(rng), dtype, momentum, seed, mixed, bad, decay)
    check_fused(target, [0], dtype, momentum, 1, mixed, bad, decay)
    check_fused(target, [1] * MAX_SEGMENTS, dtype, momentum, 2, mixed, bad, decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_fused_past_the_block_cap(target, dtype):
    check_fused(target, [2 * target.grid_pass(dtype) + 1001, 3], dtype, 0.9, 8, False, True, True)


layouts = st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 17, 31, 1001, 4097, 12289]), min_size=1,
                   max_size=6)


@settings(max_examples=25, deadline=None)
@given(seg=layouts, dtype=st.sampled_from(DTYPES), momentum=st.sampled_from([0.0, 0.9]),
       seed=st.integers(0, 2**16), mixed=st.booleans(), bad=st.booleans(), decay=st.booleans())
def test_step_fused_and_fixup_on_any_layout(target, seg, dtype, momentum, seed, mixed, bad, decay):
    check_fused(target, seg, dtype, momentum, seed, mixed, bad, decay)


@settings(max_examples=25, deadline=None)
@given(seg=layouts, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       mixed=st.booleans(), with_x=st.booleans(), mode=st.sampled_from([1, 3]))
def test_reduce_and_update_on_any_layout(target, seg, dtype, seed, mixed, with_x, mode):
    check_reduce(target, seg, dtype, with_x, seed, mixed)
    check_update(target, seg, dtype, mode, 0.5, True, seed, mixed)


def test_copy_retrace_without_copy(target):
    """The CPU op raises; the CUDA kernel reads the mode on the device and leaves x alone."""
    x, d, g = (torch.randn(100) for _ in range(3))
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64)
    scal[MODE], scal[MOVE_S] = 2, 0.3
    coef = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="copy"):
        CPU.update(x, d, g, None, scal, coef, [0, 100], 0.0)
    X, D, G = (target.copy(t) for t in (x, d, g))
    target.ops.update(X, D, G, None, target.copy(scal), target.copy(coef), [0, 100], 0.0)
    assert torch.equal(X.cpu(), x) and torch.equal(D.cpu(), d)


# --- schemas, checks, and a whole optimizer on the target ----------------------------------------
def test_opcheck_all_ops(target):
    from torch.library import opcheck

    dev, ops = target.device, target.ops
    g, d, x = (torch.randn(37, device=dev) for _ in range(3))
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64, device=dev)
    scal[ALPHA], scal[LR], scal[DIR_SCALE] = 0.1, 0.1, 1.0
    red = torch.zeros(10, dtype=torch.float64, device=dev)
    coef = torch.zeros(2, dtype=torch.float64, device=dev)
    opcheck(ops.reduce.default, (g, d, x, [0, 20, 37], True, red))
    opcheck(ops.finalize.default, (red, scal, coef, KIND_ACCEPT, [0.01, 0.0], 1.0, 0.4, 3.0,
                                   1.0, 0.0, 1.0, 1.0, 0.0, True, False, False))
    opcheck(ops.update.default, (x, d, g, None, scal, coef, [0, 20, 37], 0.0))
    opcheck(ops.collect.default, (torch.zeros(37, device=dev), g, 0.5, 1.0, True, False, scal))
    dn = torch.zeros(37, device=dev)
    scal[GNA], scal[XX_CACHE] = 1.5, 40.0
    opcheck(ops.step_fused.default, (x, d, dn, g, scal, [0, 20, 37], 1.0, 0.0, 0.3, [], red))
    opcheck(ops.step_fused.default, (x, d, dn, g, scal, [0, 20, 37], 1.0, 0.5, 0.3,
                                     [0.01, 0.0], red))
    scal[MODE], scal[MOVE_S], scal[MOVE_T] = 6, 0.3, 0.1
    opcheck(ops.fixup.default, (x, d, dn, g, scal, coef, [0, 20, 37], 0.5))


def test_bad_inputs_raise_clear_errors(target):
    dev, ops = target.device, target.ops
    g, d, x = (torch.randn(37, device=dev) for _ in range(3))
    out = torch.zeros(5, dtype=torch.float64, device=dev)
    scal = torch.zeros(NUM_SLOTS, dtype=torch.float64, device=dev)
    coef = torch.zeros(1, dtype=torch.float64, device=dev)
    with pytest.raises(RuntimeError, match="bounds"):
        ops.reduce(g, d, x, [0, 30], False, out)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.reduce(g, d.double(), x, [0, 37], False, out)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.reduce(g, torch.randn(74, device=dev)[::2], x, [0, 37], False, out)
    with pytest.raises(RuntimeError, match="float64"):
        ops.reduce(g, d, x, [0, 37], False, torch.zeros(5, device=dev))
    with pytest.raises(RuntimeError, match="coef"):
        ops.update(x, d, g, None, scal, coef[:0], [0, 37], 0.0)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.update(x.int(), d.int(), g.int(), None, scal, coef, [0, 37], 0.0)
    if dev.type == "cuda":  # the emulated target's tensors all live on the CPU
        with pytest.raises(RuntimeError, match="must be on"):
            ops.reduce(g, d, x, [0, 37], False, out.cpu())
        with pytest.raises(RuntimeError, match="must be on"):
            ops.update(x, d, g, None, scal.cpu(), coef, [0, 37], 0.0)
