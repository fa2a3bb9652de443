// elra_ops.cpp: the CPU kernels of the elra:: operators, and the Python module elra._C.
//
// The op schemas are declared once, in elra/_ops.py (importing elra._C registers these kernels
// for them); the numbers both sides agree on are in elra_contract.h (from elra/_contract.py).
//
// [note: passes over memory]
// A normal stochastic step is one pass (step_fused; [note: the one-pass stochastic step] in
// elra_math.h): it reads x, g and the previous direction and writes x and the new direction
// into the engine's second direction buffer (5 streams). The other steps take two passes:
//   reduce: reads g and d (and x when weight decay is on)          -> per-segment sums
//   finalize: scalars only (the step-size update of elra_math.h)
//   update: reads x and g (and d with momentum), writes x and d (and the retrace copy xg)
// The retrace point is recovered algebraically in the stochastic regime (see the note in
// elra/engine.py).
//
// [note: why the gradient buffer does not become the direction]
// Taking the gradient buffer itself as the next direction (swapping it with the direction
// buffer) would save the write of the new direction, one more stream (4 instead of 5). It is not
// done, because p.grad would then alias the direction after every step, and in-place zeroing of
// gradients (model.zero_grad(set_to_none=False), p.grad.zero_(), frameworks that do either)
// would silently destroy the direction with no way to recover it. The two direction buffers of
// the one-pass step belong to the engine alone. (Measured while deciding, at 32M float32
// parameters on 2 cores: the two-pass step ran at 0.93-0.99x fused Adam, its reduction pass at
// about 1.07x the time of torch.dot(g, d); more accumulators and software prefetch did not
// change that, and the one pass brought the step to about 0.72x.)
//
// [note: deterministic reductions]
// Sums are formed per fixed-size chunk (independent of the thread count) in the opmath type and
// the chunk sums are added in order in double, so results do not depend on threading.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <Python.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "elra_checks.h"
#include "elra_cpu.h"
#include "elra_math.h"

namespace elra {
namespace {

constexpr int64_t CHUNK = 1 << 14;
constexpr int LANES = 8;


#ifdef ELRA_HAVE_AVX2_PATH  // (elra_cpu.h)

// float32 sums with AVX2: two 8-wide accumulators per sum (the auto-vectorizer does not
// reassociate float sums, so these are written out), tail in scalar code.
template <bool WITH_X>
__attribute__((target("avx2,fma"))) void reduce_chunk_avx2(const float* __restrict__ g,
                                                           const float* __restrict__ d,
                                                           const float* __restrict__ x,
                                                           int64_t b, int64_t e, double* sums) {
  __m256 gd0 = _mm256_setzero_ps(), gd1 = gd0, gg0 = gd0, gg1 = gd0;
  __m256 xd0 = gd0, xd1 = gd0, gx0 = gd0, gx1 = gd0, xx0 = gd0, xx1 = gd0;
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    const __m256 g0 = _mm256_loadu_ps(g + i), g1 = _mm256_loadu_ps(g + i + 8);
    const __m256 d0 = _mm256_loadu_ps(d + i), d1 = _mm256_loadu_ps(d + i + 8);
    gd0 = _mm256_fmadd_ps(g0, d0, gd0);
    gd1 = _mm256_fmadd_ps(g1, d1, gd1);
    gg0 = _mm256_fmadd_ps(g0, g0, gg0);
    gg1 = _mm256_fmadd_ps(g1, g1, gg1);
    if constexpr (WITH_X) {
      const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
      xd0 = _mm256_fmadd_ps(x0, d0, xd0);
      xd1 = _mm256_fmadd_ps(x1, d1, xd1);
      gx0 = _mm256_fmadd_ps(g0, x0, gx0);
      gx1 = _mm256_fmadd_ps(g1, x1, gx1);
      xx0 = _mm256_fmadd_ps(x0, x0, xx0);
      xx1 = _mm256_fmadd_ps(x1, x1, xx1);
    }
  }
  const __m256 acc[5] = {_mm256_add_ps(gd0, gd1), _mm256_add_ps(gg0, gg1), _mm256_add_ps(xd0, xd1),
                         _mm256_add_ps(gx0, gx1), _mm256_add_ps(xx0, xx1)};
  float lanes[8];
  for (int k = 0; k < RED_WIDTH; ++k) {
    _mm256_storeu_ps(lanes, acc[k]);
    for (int l = 0; l < 8; ++l) sums[k] += lanes[l];
  }
  for (; i < e; ++i) {
    const float gv = g[i], dv = d[i];
    sums[0] += gv * dv;
    sums[1] += gv * gv;
    if constexpr (WITH_X) {
      const float xv = x[i];
      sums[2] += xv * dv;
      sums[3] += gv * xv;
      sums[4] += xv * xv;
    }
  }
}

// The float32 step without momentum: d <- inv g + c x; [xg <- x]; x <- x - s d.
// d and xg are written with streaming stores when the buffer is large: they are read again only
// in the next step, long after they would have left the caches, and streaming spares the read
// that a normal store of a cache line costs (about 40% of this pass at 32M parameters here).
__attribute__((target("avx2,fma"))) void step_chunk_avx2(float* __restrict__ x,
                                                         float* __restrict__ d,
                                                         float* __restrict__ xg,
                                                         const float* __restrict__ g, int64_t b,
                                                         int64_t e, float inv, float c, float s,
                                                         bool stream) {
  int64_t i = b;
  auto scalar = [&](int64_t k) {
    const float xo = x[k];
    const float dt = inv * g[k] + c * xo;
    d[k] = dt;
    if (xg) xg[k] = xo;
    x[k] = xo - s * dt;
  };
  if (stream)  // streaming stores need 32-byte aligned addresses: peel to d's alignment
    for (; i < e && (reinterpret_cast<uintptr_t>(d + i) & 31) != 0; ++i) scalar(i);
  const bool xg_aligned = xg && ((reinterpret_cast<uintptr_t>(xg + i) & 31) == 0);
  const __m256 vi = _mm256_set1_ps(inv), vc = _mm256_set1_ps(c), vs = _mm256_set1_ps(s);
  for (; i + 8 <= e; i += 8) {
    const __m256 xo = _mm256_loadu_ps(x + i);
    __m256 dt = _mm256_mul_ps(vi, _mm256_loadu_ps(g + i));
    if (c != 0.0f) dt = _mm256_fmadd_ps(vc, xo, dt);
    if (stream) {
      _mm256_stream_ps(d + i, dt);
      if (xg) {
        if (xg_aligned)
          _mm256_stream_ps(xg + i, xo);
        else
          _mm256_storeu_ps(xg + i, xo);
      }
    } else {
      _mm256_storeu_ps(d + i, dt);
      if (xg) _mm256_storeu_ps(xg + i, xo);
    }
    _mm256_storeu_ps(x + i, _mm256_fnmadd_ps(vs, dt, xo));
  }
  for (; i < e; ++i) scalar(i);
  if (stream) _mm_sfence();
}

// One element of the float32 step_fused kernels below (their alignment peel and tail).
template <bool WITH_X>
inline void fused_scalar(float* x, const float* dp, float* dn, const float* g, int64_t k,
                         float inv, float c, float mb, float s, double* sums) {
  const float gv = g[k], xv = x[k];
  sums[0] += gv * dp[k];
  sums[1] += gv * gv;
  if constexpr (WITH_X) {
    sums[2] += xv * dp[k];
    sums[3] += gv * xv;
    sums[4] += xv * xv;
  }
  fused_element<float, float>(x[k], dp[k], dn[k], gv, inv, c, mb, s);
}

// step_fused for float32: the sums <g, d_prev> and |g|^2 (and with weight decay <x, d_prev>,
// <g, x>, |x|^2; one 8-wide accumulator each, in the order of the elements after the alignment
// peel), dn <- inv g (+ c x), with momentum mb dn <- mb d_prev + (1 - mb) dn, into d_new
// (streamed, as in step_chunk_avx2), x <- x - s dn where g is finite.
template <bool WITH_X>
__attribute__((target("avx2,fma"))) void fused_chunk_avx2(float* __restrict__ x,
                                                          const float* __restrict__ dp,
                                                          float* __restrict__ dn,
                                                          const float* __restrict__ g, int64_t b,
                                                          int64_t e, float inv, float c, float mb,
                                                          float s, bool stream, double* sums) {
  int64_t i = b;
  auto scalar = [&](int64_t k) { fused_scalar<WITH_X>(x, dp, dn, g, k, inv, c, mb, s, sums); };
  if (stream)
    for (; i < e && (reinterpret_cast<uintptr_t>(dn + i) & 31) != 0; ++i) scalar(i);
  const __m256 vi = _mm256_set1_ps(inv), vc = _mm256_set1_ps(c), vs = _mm256_set1_ps(s);
  const __m256 vb = _mm256_set1_ps(mb), v1b = _mm256_set1_ps(1.0f - mb);
  const bool with_b = mb != 0.0f;
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[RED_WIDTH] = {zero, zero, zero, zero, zero};
  for (; i + 8 <= e; i += 8) {
    const __m256 g0 = _mm256_loadu_ps(g + i), x0 = _mm256_loadu_ps(x + i);
    const __m256 d0 = _mm256_loadu_ps(dp + i);
    acc[0] = _mm256_fmadd_ps(g0, d0, acc[0]);
    acc[1] = _mm256_fmadd_ps(g0, g0, acc[1]);
    __m256 dt = _mm256_mul_ps(vi, g0);
    if constexpr (WITH_X) {
      acc[2] = _mm256_fmadd_ps(x0, d0, acc[2]);
      acc[3] = _mm256_fmadd_ps(g0, x0, acc[3]);
      acc[4] = _mm256_fmadd_ps(x0, x0, acc[4]);
      dt = _mm256_fmadd_ps(vc, x0, dt);
    }
    if (with_b) dt = _mm256_fmadd_ps(vb, d0, _mm256_mul_ps(v1b, dt));
    const __m256 ok = _mm256_cmp_ps(_mm256_sub_ps(g0, g0), zero, _CMP_EQ_OQ);  // g finite
    _mm256_storeu_ps(x + i, _mm256_blendv_ps(x0, _mm256_fnmadd_ps(vs, dt, x0), ok));
    if (stream)
      _mm256_stream_ps(dn + i, dt);
    else
      _mm256_storeu_ps(dn + i, dt);
  }
  float lanes[8];
  for (int k = 0; k < (WITH_X ? RED_WIDTH : 2); ++k) {
    _mm256_storeu_ps(lanes, acc[k]);
    for (int l = 0; l < 8; ++l) sums[k] += lanes[l];
  }
  for (; i < e; ++i) scalar(i);
  if (stream) _mm_sfence();
}

// 16 elements of the AVX-512 kernel below (a function of its own: a lambda would not inherit
// the target attribute that the intrinsics need).
template <bool WITH_X>
__attribute__((target("avx512f"), always_inline)) inline void fused_vec512(
    float* __restrict__ x, const float* __restrict__ dp, float* __restrict__ dn,
    const float* __restrict__ g, int64_t j, __m512 vi, __m512 vc, __m512 vb, __m512 v1b,
    bool with_b, __m512 vs, bool stream, __m512* acc) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 g0 = _mm512_loadu_ps(g + j), x0 = _mm512_loadu_ps(x + j);
  const __m512 d0 = _mm512_loadu_ps(dp + j);
  acc[0] = _mm512_fmadd_ps(g0, d0, acc[0]);
  acc[1] = _mm512_fmadd_ps(g0, g0, acc[1]);
  __m512 t0 = _mm512_mul_ps(vi, g0);
  if constexpr (WITH_X) {
    acc[2] = _mm512_fmadd_ps(x0, d0, acc[2]);
    acc[3] = _mm512_fmadd_ps(g0, x0, acc[3]);
    acc[4] = _mm512_fmadd_ps(x0, x0, acc[4]);
    t0 = _mm512_fmadd_ps(vc, x0, t0);
  }
  if (with_b) t0 = _mm512_fmadd_ps(vb, d0, _mm512_mul_ps(v1b, t0));
  const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(g0, g0), zero, _CMP_EQ_OQ);
  _mm512_mask_storeu_ps(x + j, ok, _mm512_fnmadd_ps(vs, t0, x0));
  if (stream)
    _mm512_stream_ps(dn + j, t0);
  else
    _mm512_storeu_ps(dn + j, t0);
}

// The same with AVX-512, two vectors per iteration: masked stores keep x where g is not finite
// (cheaper than the blend; at 32M parameters about 7% faster than the AVX2 version here).
template <bool WITH_X>
__attribute__((target("avx512f"))) void fused_chunk_avx512(float* __restrict__ x,
                                                          const float* __restrict__ dp,
                                                          float* __restrict__ dn,
                                                          const float* __restrict__ g, int64_t b,
                                                          int64_t e, float inv, float c, float mb,
                                                          float s, bool stream, double* sums) {
  int64_t i = b;
  auto scalar = [&](int64_t k) { fused_scalar<WITH_X>(x, dp, dn, g, k, inv, c, mb, s, sums); };
  if (stream)
    for (; i < e && (reinterpret_cast<uintptr_t>(dn + i) & 63) != 0; ++i) scalar(i);
  const __m512 vi = _mm512_set1_ps(inv), vc = _mm512_set1_ps(c), vs = _mm512_set1_ps(s);
  const __m512 vb = _mm512_set1_ps(mb), v1b = _mm512_set1_ps(1.0f - mb);
  const bool with_b = mb != 0.0f;
  const __m512 zero = _mm512_setzero_ps();
  __m512 a0[RED_WIDTH] = {zero, zero, zero, zero, zero};
  __m512 a1[RED_WIDTH] = {zero, zero, zero, zero, zero};
  for (; i + 32 <= e; i += 32) {
    fused_vec512<WITH_X>(x, dp, dn, g, i, vi, vc, vb, v1b, with_b, vs, stream, a0);
    fused_vec512<WITH_X>(x, dp, dn, g, i + 16, vi, vc, vb, v1b, with_b, vs, stream, a1);
  }
  float lanes[16];
  for (int k = 0; k < (WITH_X ? RED_WIDTH : 2); ++k) {
    _mm512_storeu_ps(lanes, _mm512_add_ps(a0[k], a1[k]));
    for (int l = 0; l < 16; ++l) sums[k] += lanes[l];
  }
  for (; i < e; ++i) scalar(i);
  if (stream) _mm_sfence();
}
#endif

// Sums of g*d, g*g (and x*d, g*x, x*x) over [b, e) in the opmath type, into sums[5].
template <typename T, bool WITH_X>
ELRA_CLONES void reduce_chunk(const T* __restrict__ g, const T* __restrict__ d,
                              const T* __restrict__ x, int64_t b, int64_t e, double* sums) {
  using Acc = at::opmath_type<T>;
  Acc gd[LANES] = {}, gg[LANES] = {}, xd[LANES] = {}, gx[LANES] = {}, xx[LANES] = {};
  int64_t i = b;
  for (; i + LANES <= e; i += LANES) {
    for (int l = 0; l < LANES; ++l) {
      const Acc gv = static_cast<Acc>(g[i + l]), dv = static_cast<Acc>(d[i + l]);
      gd[l] += gv * dv;
      gg[l] += gv * gv;
      if constexpr (WITH_X) {
        const Acc xv = static_cast<Acc>(x[i + l]);
        xd[l] += xv * dv;
        gx[l] += gv * xv;
        xx[l] += xv * xv;
      }
    }
  }
  for (; i < e; ++i) {
    const Acc gv = static_cast<Acc>(g[i]), dv = static_cast<Acc>(d[i]);
    gd[0] += gv * dv;
    gg[0] += gv * gv;
    if constexpr (WITH_X) {
      const Acc xv = static_cast<Acc>(x[i]);
      xd[0] += xv * dv;
      gx[0] += gv * xv;
      xx[0] += xv * xv;
    }
  }
  for (int l = 0; l < LANES; ++l) {
    sums[0] += gd[l];
    sums[1] += gg[l];
    sums[2] += xd[l];
    sums[3] += gx[l];
    sums[4] += xx[l];
  }
}

// Per fixed-size chunk in parallel, chunk sums added in order (deterministic).
template <typename T, bool WITH_X>
void reduce_range(const T* g, const T* d, const T* x, int64_t n, double* out5) {
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(static_cast<size_t>(nchunks) * RED_WIDTH, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * CHUNK, e = std::min(n, (c + 1) * CHUNK);
#ifdef ELRA_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx2()) {
          reduce_chunk_avx2<WITH_X>(g, d, x, b, e, partial.data() + c * RED_WIDTH);
          continue;
        }
      }
#endif
      reduce_chunk<T, WITH_X>(g, d, x, b, e, partial.data() + c * RED_WIDTH);
    }
  });
  for (int64_t c = 0; c < nchunks; ++c)
    for (int k = 0; k < RED_WIDTH; ++k) out5[k] += partial[c * RED_WIDTH + k];
}

void reduce_cpu(const at::Tensor& g, const at::Tensor& d, const at::Tensor& x,
                at::IntArrayRef bounds, bool with_x, at::Tensor& out) {
  const int nseg = check_reduce(g, d, x, bounds, out);
  double* o = out.data_ptr<double>();
  for (int k = 0; k < nseg * RED_WIDTH; ++k) o[k] = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "elra_reduce", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int k = 0; k < nseg; ++k) {
      const int64_t b = bounds[k], n = bounds[k + 1] - b;
      if (with_x)
        reduce_range<scalar_t, true>(gp + b, dp + b, xp + b, n, o + k * RED_WIDTH);
      else
        reduce_range<scalar_t, false>(gp + b, dp + b, nullptr, n, o + k * RED_WIDTH);
    }
  });
}

void collect_cpu(at::Tensor& coll, const at::Tensor& g, double weight, double inv, bool first,
                 bool half, at::Tensor& scal) {
  check_collect(coll, g, scal);
  const int64_t n = g.numel();
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(static_cast<size_t>(nchunks), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "elra_collect", [&] {
    using Acc = at::opmath_type<scalar_t>;
    scalar_t* cp = coll.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const Acc w = static_cast<Acc>(weight);
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t b = c * CHUNK, e = std::min(n, b + CHUNK);
        Acc acc[LANES] = {};
        int64_t i = b;
        for (; i + LANES <= e; i += LANES)
          for (int l = 0; l < LANES; ++l) {
            const Acc gv = static_cast<Acc>(gp[i + l]);
            acc[l] += gv * gv;
            cp[i + l] = static_cast<scalar_t>((first ? Acc(0) : static_cast<Acc>(cp[i + l])) + w * gv);
          }
        for (; i < e; ++i) {
          const Acc gv = static_cast<Acc>(gp[i]);
          acc[0] += gv * gv;
          cp[i] = static_cast<scalar_t>((first ? Acc(0) : static_cast<Acc>(cp[i])) + w * gv);
        }
        double sum = 0.0;
        for (int l = 0; l < LANES; ++l) sum += acc[l];
        partial[c] = sum;
      }
    });
  });
  double gg = 0.0;
  for (double v : partial) gg += v;
  gg *= inv * inv;
  double* s = scal.data_ptr<double>();
  s[GRAD_SQ] = gg;
  const bool ok = finite(gg) && !(half && std::sqrt(gg) >= HALF_GRAD_NORM_LIMIT);
  s[STATUS] = ok ? ST_OK : ST_BAD_GRADIENT;
}

void finalize_cpu(const at::Tensor& red, at::Tensor& scal, at::Tensor& coef, int64_t kind,
                  at::ArrayRef<double> wd, double growth, double lr_schedule, double lr_warmup,
                  double inv, double momentum, double f, double f_last, double spec,
                  bool stochastic, bool half, bool keep_copy) {
  const FinalizeParams p = finalize_params(red, scal, coef, kind, wd, growth, lr_schedule,
                                           lr_warmup, inv, momentum, f, f_last, spec, stochastic,
                                           half, keep_copy);
  finalize(red.data_ptr<double>(), scal.data_ptr<double>(), coef.data_ptr<double>(), p);
}

// d <- inv g; x <- x - s d: the common stochastic step, kept simple so that it vectorizes.
template <typename T>
ELRA_CLONES void plain_step_chunk(T* __restrict__ x, T* __restrict__ d, const T* __restrict__ g,
                                  int64_t b, int64_t e, at::opmath_type<T> inv,
                                  at::opmath_type<T> s) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = b; i < e; ++i) {
    const T dt = static_cast<T>(inv * static_cast<Acc>(g[i]));
    d[i] = dt;
    x[i] = static_cast<T>(static_cast<Acc>(x[i]) - s * static_cast<Acc>(dt));
  }
}

template <typename T>
ELRA_CLONES void update_chunk(int mode, T* __restrict__ x, T* __restrict__ d,
                              T* __restrict__ xg, const T* __restrict__ g, int64_t b, int64_t e,
                              at::opmath_type<T> inv, at::opmath_type<T> c,
                              at::opmath_type<T> mb, at::opmath_type<T> s,
                              at::opmath_type<T> t) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = b; i < e; ++i)
    update_element<T, Acc>(mode, x[i], d[i], xg ? xg + i : nullptr, g[i], inv, c, mb, s, t);
}

template <typename T>
void update_range(int mode, T* x, T* d, T* xg, const T* g, int64_t n, double inv, double c,
                  double b, double s, double t) {
  using Acc = at::opmath_type<T>;
  const Acc ai = static_cast<Acc>(inv), ac = static_cast<Acc>(c), ab = static_cast<Acc>(b),
            as = static_cast<Acc>(s), at_ = static_cast<Acc>(t);
  const bool plain = mode == MODE_STEP && xg == nullptr && ab == Acc(0) && ac == Acc(0);
  constexpr int64_t STREAM_FROM = int64_t(1) << 22;  // elements (16 MB fp32): smaller stay cached
  at::parallel_for(0, n, CHUNK, [&](int64_t lo, int64_t hi) {
#ifdef ELRA_HAVE_AVX2_PATH
    if constexpr (std::is_same_v<T, float>) {
      if (mode == MODE_STEP && ab == Acc(0) && cpu_has_avx2()) {
        step_chunk_avx2(x, d, xg, g, lo, hi, ai, ac, as, n >= STREAM_FROM);
        return;
      }
    }
#endif
    if (plain)
      plain_step_chunk<T>(x, d, g, lo, hi, ai, as);
    else
      update_chunk<T>(mode, x, d, xg, g, lo, hi, ai, ac, ab, as, at_);
  });
}

// step_fused over [b, e) for any dtype and momentum: sums in the opmath type (LANES lanes).
template <typename T, bool WITH_X>
ELRA_CLONES void fused_chunk(T* __restrict__ x, const T* __restrict__ dp, T* __restrict__ dn,
                             const T* __restrict__ g, int64_t b, int64_t e,
                             at::opmath_type<T> inv, at::opmath_type<T> c,
                             at::opmath_type<T> mb, at::opmath_type<T> s, double* sums) {
  using Acc = at::opmath_type<T>;
  Acc gd[LANES] = {}, gg[LANES] = {}, xd[LANES] = {}, gx[LANES] = {}, xx[LANES] = {};
  auto one = [&](int64_t i, int l) {
    const Acc gv = static_cast<Acc>(g[i]), dv = static_cast<Acc>(dp[i]);
    gd[l] += gv * dv;
    gg[l] += gv * gv;
    if constexpr (WITH_X) {
      const Acc xv = static_cast<Acc>(x[i]);
      xd[l] += xv * dv;
      gx[l] += gv * xv;
      xx[l] += xv * xv;
    }
    fused_element<T, Acc>(x[i], dp[i], dn[i], g[i], inv, c, mb, s);
  };
  int64_t i = b;
  for (; i + LANES <= e; i += LANES)
    for (int l = 0; l < LANES; ++l) one(i + l, l);
  for (; i < e; ++i) one(i, 0);
  for (int l = 0; l < LANES; ++l) {
    sums[0] += gd[l];
    sums[1] += gg[l];
    sums[2] += xd[l];
    sums[3] += gx[l];
    sums[4] += xx[l];
  }
}

// One segment of step_fused: per fixed-size chunk in parallel, chunk sums added in order.
template <typename T, bool WITH_X>
void fused_range(T* x, const T* dp, T* dn, const T* g, int64_t n, double inv, double c, double b,
                 double s, double* out5) {
  using Acc = at::opmath_type<T>;
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(static_cast<size_t>(nchunks) * RED_WIDTH, 0.0);
  constexpr int64_t STREAM_FROM = int64_t(1) << 22;  // as in update_range
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t lo = ch * CHUNK, hi = std::min(n, lo + CHUNK);
      double* sums = partial.data() + RED_WIDTH * ch;
#ifdef ELRA_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<T, float>) {
        const float fi = static_cast<float>(inv), fc = static_cast<float>(c);
        const float fb = static_cast<float>(b), fs = static_cast<float>(s);
        if (cpu_has_avx512()) {
          fused_chunk_avx512<WITH_X>(x, dp, dn, g, lo, hi, fi, fc, fb, fs, n >= STREAM_FROM,
                                     sums);
          continue;
        }
        if (cpu_has_avx2()) {
          fused_chunk_avx2<WITH_X>(x, dp, dn, g, lo, hi, fi, fc, fb, fs, n >= STREAM_FROM, sums);
          continue;
        }
      }
#endif
      fused_chunk<T, WITH_X>(x, dp, dn, g, lo, hi, static_cast<Acc>(inv), static_cast<Acc>(c),
                             static_cast<Acc>(b), static_cast<Acc>(s), sums);
    }
  });
  for (int64_t ch = 0; ch < nchunks; ++ch)
    for (int k = 0; k < RED_WIDTH; ++k) out5[k] += partial[RED_WIDTH * ch + k];
}

void step_fused_cpu(at::Tensor& x, const at::Tensor& dp, at::Tensor& dn, const at::Tensor& g,
                    const at::Tensor& scal, at::IntArrayRef bounds, double inv, double momentum,
                    double step, at::ArrayRef<double> wd, at::Tensor& out) {
  const int nseg = check_step_fused(x, dp, dn, g, scal, bounds, wd.size(), out);
  const bool with_x = !wd.empty();
  const double kappa = with_x ? spec_kappa(scal.data_ptr<double>()) : 0.0;
  double* o = out.data_ptr<double>();
  for (int k = 0; k < nseg * RED_WIDTH; ++k) o[k] = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elra_step_fused", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dpp = dp.data_ptr<scalar_t>();
    scalar_t* dnp = dn.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    for (int k = 0; k < nseg; ++k) {
      const int64_t b = bounds[k], n = bounds[k + 1] - b;
      if (n == 0) continue;
      if (with_x)
        fused_range<scalar_t, true>(xp + b, dpp + b, dnp + b, gp + b, n, inv, wd[k] * kappa,
                                    momentum, step, o + k * RED_WIDTH);
      else
        fused_range<scalar_t, false>(xp + b, dpp + b, dnp + b, gp + b, n, inv, 0.0, momentum,
                                     step, o + k * RED_WIDTH);
    }
  });
}

template <typename T>
ELRA_CLONES void fixup_chunk(int mode, T* __restrict__ x, const T* __restrict__ dp,
                             T* __restrict__ dn, const T* __restrict__ g, int64_t b, int64_t e,
                             at::opmath_type<T> u, at::opmath_type<T> r, at::opmath_type<T> dc,
                             at::opmath_type<T> mb) {
  using Acc = at::opmath_type<T>;
  for (int64_t i = b; i < e; ++i)
    fixup_element<T, Acc>(mode, x[i], dp[i], dn[i], g[i], u, r, dc, mb);
}

void fixup_cpu(at::Tensor& x, const at::Tensor& dp, at::Tensor& dn, const at::Tensor& g,
               const at::Tensor& scal, const at::Tensor& coef, at::IntArrayRef bounds,
               double momentum) {
  const int nseg = check_fixup(x, dp, dn, g, scal, coef, bounds);
  const double* s = scal.data_ptr<double>();
  const double* cf = coef.data_ptr<double>();
  const int mode = static_cast<int>(s[MODE]);
  if (mode != MODE_SHIFT && mode != MODE_UNDO_RETRACE && mode != MODE_REDO) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elra_fixup", [&] {
    using Acc = at::opmath_type<scalar_t>;
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dpp = dp.data_ptr<scalar_t>();
    scalar_t* dnp = dn.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const Acc u = static_cast<Acc>(s[MOVE_S]), r = static_cast<Acc>(s[MOVE_T]);
    const Acc mb = static_cast<Acc>(momentum);
    for (int k = 0; k < nseg; ++k) {
      const int64_t b = bounds[k], e = bounds[k + 1];
      const Acc dc = static_cast<Acc>(cf[k]);
      at::parallel_for(b, e, CHUNK, [&](int64_t lo, int64_t hi) {
        fixup_chunk<scalar_t>(mode, xp, dpp, dnp, gp, lo, hi, u, r, dc, mb);
      });
    }
  });
}

void update_cpu(at::Tensor& x, at::Tensor& d, const at::Tensor& g,
                const std::optional<at::Tensor>& xg, const at::Tensor& scal,
                const at::Tensor& coef, at::IntArrayRef bounds, double momentum) {
  const int nseg = check_update(x, d, g, xg, scal, coef, bounds);
  const double* s = scal.data_ptr<double>();
  const double* cf = coef.data_ptr<double>();
  const int mode = static_cast<int>(s[MODE]);
  if (mode == MODE_NONE) return;
  TORCH_CHECK(mode != MODE_RETRACE_COPY || xg.has_value(), "elra: retrace needs the copy");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elra_update", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dp = d.data_ptr<scalar_t>();
    scalar_t* xgp = xg.has_value() ? xg->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    for (int k = 0; k < nseg; ++k) {
      const int64_t b = bounds[k], n = bounds[k + 1] - b;
      if (n == 0) continue;
      update_range<scalar_t>(mode, xp + b, dp + b, xgp ? xgp + b : nullptr, gp + b, n, s[INV],
                             cf[k], momentum, s[MOVE_S], s[MOVE_T]);
    }
  });
}

}  // namespace
}  // namespace elra

// The schemas are declared in Python (elra/_ops.py), which loads this module after them.
TORCH_LIBRARY_IMPL(elra, CPU, m) {
  m.impl("reduce", &elra::reduce_cpu);
  m.impl("collect", &elra::collect_cpu);
  m.impl("finalize", &elra::finalize_cpu);
  m.impl("update", &elra::update_cpu);
  m.impl("step_fused", &elra::step_fused_cpu);
  m.impl("fixup", &elra::fixup_cpu);
}

// The instruction set the float32 kernels use on this CPU (after ELRA_CPU_ISA's cap).
static const char* cpu_isa_in_use() {
#ifdef ELRA_HAVE_AVX2_PATH
  if (elra::cpu_has_avx512()) return "avx512";  // step_fused; the others then use AVX2
  if (elra::cpu_has_avx2()) return "avx2";
#endif
  return "generic";
}

#ifndef ELRA_CUDA_ARCHS
#define ELRA_CUDA_ARCHS ""
#endif
#ifndef ELRA_BUILD_TORCH
#define ELRA_BUILD_TORCH ""
#endif

// The compiler, by name and version (__VERSION__ alone is only the number with GCC).
#if defined(__clang__)
#define ELRA_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define ELRA_COMPILER "gcc " __VERSION__
#elif defined(_MSC_VER)
#define ELRA_COMPILER "msvc"
#else
#define ELRA_COMPILER "unknown"
#endif

// Importing elra._C registers the operators above. The module itself only says what this
// build is: the CPU instruction set in use, the CUDA architectures compiled for (empty in a CPU
// build), the compiler and the torch it was built against (elra.native_status()).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "cpu_isa", cpu_isa_in_use()) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", ELRA_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(m, "compiler", ELRA_COMPILER) < 0 ||
      PyModule_AddStringConstant(m, "built_against_torch", ELRA_BUILD_TORCH) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
