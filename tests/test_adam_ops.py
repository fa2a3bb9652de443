"""The elra_adam:: ops (ElraAdam's one pass and undo): opcheck, every kernel against a float64
reference written from the formulas, native against pure torch, and properties (hypothesis).

Layouts as in tests/test_ops.py: sizes 0, 1, odd, past the vector width and the chunk size,
several segments with their own decay.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elra import _ops, adam_kernels_torch as akt, adam_ops, native_status
from elra.adam_control import BETA1, BETA2, BETA_A, EPS

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
HAVE_NATIVE = native_status()["cpu"]
# the pure-torch kernels in a namespace of their own, so that opcheck tests them and not the
# native kernels registered for elra_adam::
_TEST_LIB = _ops.define("elra_adam_torchtest", schemas=adam_ops.SCHEMAS, checks=adam_ops._CHECKS,
                        kernels=akt)
TABLES = {"torch": adam_ops.AdamKernels("torch", akt.step, akt.undo)}
if HAVE_NATIVE:
    TABLES["native"] = adam_ops.dispatched()
KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not HAVE_NATIVE, reason=f"native kernels not built: {native_status()['error']}"))]
sizes = st.lists(st.sampled_from([0, 1, 3, 7, 8, 9, 17, 1000, 16385, 40000]), min_size=1,
                 max_size=4)


@pytest.fixture(params=KERNELS, scope="module")
def k(request):
    return TABLES[request.param]


def layout(seg_sizes, dtype, seed=0, t=5):
    """Buffers x, m, v, D, g, bounds, per-segment decays and the step's coefficients."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(seg_sizes)
    x, m, d, g = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(4))
    v = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    bounds = [0]
    for s in seg_sizes:
        bounds.append(bounds[-1] + s)
    wd = [0.0 if i % 2 else 0.1 for i in range(len(seg_sizes))]
    bc1, bc2 = 1 - BETA1 ** t, 1 - BETA2 ** t
    coef = dict(alpha=0.03, bc1=bc1, bc2=bc2, beta1=BETA1, beta2=BETA2, eps=EPS, beta_a=BETA_A)
    return [t.to(dtype) for t in (x, m, v, d, g)], bounds, wd, coef


def reference_step(bufs, bounds, wd, c):
    """The formulas of the op's docstring in float64 (the new x, m, v, D and the two sums)."""
    x, m, v, d, g = (b.double() for b in bufs)
    gd = float((g * d).sum())
    m = m + (1 - c["beta1"]) * (g - m)
    v = c["beta2"] * v + (1 - c["beta2"]) * g * g
    s = 1 / (torch.sqrt(v / c["bc2"]) + c["eps"])
    u = m * s / c["bc1"]
    keep = torch.cat([torch.full((b - a,), 1 - c["alpha"] * w, dtype=torch.float64)
                      for (a, b), w in zip(zip(bounds, bounds[1:]), wd)])
    return [x * keep - c["alpha"] * u, m, v, c["beta_a"] * d - c["alpha"] * u], \
        [gd, float((g * s * g).sum())]


def call_step(k, bufs, bounds, wd, c):
    out = torch.zeros(2, dtype=torch.float64)
    x, m, v, d, g = bufs
    k.step(x, m, v, d, g, bounds, wd, c["alpha"], c["bc1"], c["bc2"], c["beta1"], c["beta2"],
           c["eps"], c["beta_a"], out)
    return out.tolist()


def call_undo(k, bufs, bounds, wd, c, with_grad):
    x, m, v, d, g = bufs
    k.undo(x, m, v, d, g if with_grad else None, bounds, wd, c["alpha"], c["bc1"], c["bc2"],
           c["beta1"], c["beta2"], c["eps"], c["beta_a"])


def close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("namespace", ["elra_adam_torchtest", pytest.param(
    "elra_adam", marks=pytest.mark.skipif(not HAVE_NATIVE, reason="native kernels not built"))])
def test_opcheck(namespace):
    """Schemas, fake kernels (torch.compile), mutation annotations: torch.library.opcheck."""
    from torch.library import opcheck

    ops = getattr(torch.ops, namespace)
    bufs, bounds, wd, c = layout([20, 17], torch.float32)
    coefs = tuple(c[n] for n in ("alpha", "bc1", "bc2", "beta1", "beta2", "eps", "beta_a"))
    opcheck(ops.step.default, (*bufs, bounds, wd, *coefs, torch.zeros(2, dtype=torch.float64)))
    x, m, v, d, g = bufs
    opcheck(ops.undo.default, (x, m, v, d, g, bounds, wd, *coefs))
    opcheck(ops.undo.default, (x, m, v, d, None, bounds, wd, *coefs))


@SETTINGS
@given(seg=sizes, dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 2**16))
def test_step_is_the_formula(k, seg, dtype, seed):
    bufs, bounds, wd, c = layout(seg, dtype, seed)
    want, sums = reference_step(bufs, bounds, wd, c)
    got = call_step(k, bufs, bounds, wd, c)
    for t, w in zip(bufs[:4], want):
        close(t, w, dtype)
    scale = sum(abs(b.double()).sum().item() for b in bufs) + 1.0
    assert got == pytest.approx(sums, rel=TOL[dtype], abs=TOL[dtype] * scale)


@SETTINGS
@given(seg=sizes, seed=st.integers(0, 2**16), with_grad=st.booleans())
def test_undo_inverts_step(k, seg, seed, with_grad):
    """undo with the step's gradient takes x, m, v and D back (to rounding); without it, x and D
    go back over the step computed from the current moments."""
    bufs, bounds, wd, c = layout(seg, torch.float64, seed)
    before = [t.clone() for t in bufs]
    if with_grad:
        call_step(k, bufs, bounds, wd, c)
        call_undo(k, bufs, bounds, wd, c, True)
        for t, b in zip(bufs, before):
            close(t, b, torch.float64)
        return
    call_undo(k, bufs, bounds, wd, c, False)
    x, m, v, d, _ = before
    u = m / (v.sqrt() / math.sqrt(c["bc2"]) + c["eps"]) / c["bc1"]
    keep = torch.cat([torch.full((b - a,), 1 - c["alpha"] * w, dtype=torch.float64)
                      for (a, b), w in zip(zip(bounds, bounds[1:]), wd)])
    close(bufs[0], (x + c["alpha"] * u) / keep, torch.float64)
    close(bufs[3], (d + c["alpha"] * u) / c["beta_a"], torch.float64)
    assert torch.equal(bufs[1], m) and torch.equal(bufs[2], v)


@SETTINGS
@given(n=st.sampled_from([1, 9, 40000]), dtype=st.sampled_from([torch.float32, torch.float64]),
       bad=st.lists(st.integers(0, 10**6), min_size=1, max_size=5),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_gradient_elements_are_left_alone(k, n, dtype, bad, value):
    """Where g is not finite nothing is written, the sums are not finite, and undo with the
    gradient brings the other elements back: nothing non-finite anywhere."""
    bufs, bounds, wd, c = layout([n], dtype)
    idx = sorted({b % n for b in bad})
    bufs[4][idx] = value
    before = [t.clone() for t in bufs[:4]]
    sums = call_step(k, bufs, bounds, wd, c)
    assert not all(math.isfinite(s) for s in sums)
    for t, b in zip(bufs[:4], before):
        assert torch.equal(t[idx], b[idx]) and torch.isfinite(t).all()
    call_undo(k, bufs, bounds, wd, c, True)
    for t, b in zip(bufs[:4], before):
        close(t, b, dtype)
        assert torch.isfinite(t).all()


@pytest.mark.skipif(not HAVE_NATIVE, reason="native kernels not built")
@SETTINGS
@given(seg=sizes, dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 2**16))
def test_native_is_pure_torch(seg, dtype, seed):
    """The native kernels against the pure-torch ones on the same inputs."""
    a, bounds, wd, c = layout(seg, dtype, seed)
    b = [t.clone() for t in a]
    sa = call_step(TABLES["native"], a, bounds, wd, c)
    sb = call_step(TABLES["torch"], b, bounds, wd, c)
    for ta, tb in zip(a, b):
        close(ta, tb, dtype)
    scale = sum(abs(t.double()).sum().item() for t in a) + 1.0
    assert sa == pytest.approx(sb, rel=TOL[dtype], abs=TOL[dtype] * scale)
    call_undo(TABLES["native"], a, bounds, wd, c, False)
    call_undo(TABLES["torch"], b, bounds, wd, c, False)
    for ta, tb in zip(a, b):
        close(ta, tb, dtype)


HAVE_CUDA = torch.cuda.is_available() and native_status()["cuda"]


@pytest.mark.skipif(not HAVE_CUDA, reason="no GPU, or no CUDA kernels in this build")
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("seg", [[1], [17, 0, 40000], [16385, 3]])
def test_cuda_is_pure_torch(seg, dtype):
    """The CUDA kernels (csrc/cuda/elra_adam_cuda.cu) against the pure-torch ones."""
    a, bounds, wd, c = layout(seg, dtype)
    b = [t.cuda() for t in a]
    a[4][1 % len(a[4])] = math.nan
    b[4].copy_(a[4])
    sa = call_step(TABLES["torch"], a, bounds, wd, c)
    sb = call_step(adam_ops.dispatched(), b, bounds, wd, c)
    for ta, tb in zip(a, b):
        close(ta, tb.cpu(), dtype)
    assert not any(math.isfinite(s) for s in sb[:1]) and not math.isfinite(sa[0])
    for kernels, bufs in ((TABLES["torch"], a), (adam_ops.dispatched(), b)):
        call_undo(kernels, bufs, bounds, wd, c, True)
    for ta, tb in zip(a, b):
        close(ta, tb.cpu(), dtype)


@pytest.mark.skipif(not HAVE_NATIVE, reason="native kernels not built")
def test_native_sums_do_not_depend_on_threads():
    bufs, bounds, wd, c = layout([100000, 50001], torch.float32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            copy = [t.clone() for t in bufs]
            results.append((call_step(TABLES["native"], copy, bounds, wd, c), copy))
    finally:
        torch.set_num_threads(threads)
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("bad", ["size", "dtype", "wd", "out", "bounds"])
def test_bad_arguments_are_rejected(k, bad):
    bufs, bounds, wd, c = layout([20, 17], torch.float32)
    out = torch.zeros(2, dtype=torch.float64)
    if bad == "size":
        bufs[2] = torch.zeros(36)
    elif bad == "dtype":
        bufs[1] = bufs[1].double()
    elif bad == "wd":
        wd = [0.0]
    elif bad == "out":
        out = torch.zeros(1, dtype=torch.float64)
    else:
        bounds = [0, 40, 37]
    with pytest.raises(RuntimeError):
        k.step(*bufs, bounds, wd, c["alpha"], c["bc1"], c["bc2"], c["beta1"], c["beta2"],
               c["eps"], c["beta_a"], out)


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("ELRA_CPU_ISA")), reason="already inside a capped run")
@pytest.mark.skipif(not HAVE_NATIVE, reason="native kernels not built")
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_cpu_code_path(isa):
    """The float32 step picks AVX-512, AVX2 or the generic loop at run time; the others run
    only when capped (ELRA_CPU_ISA): the native tests again under each cap."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", "native"], env=dict(os.environ, ELRA_CPU_ISA=isa),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout
