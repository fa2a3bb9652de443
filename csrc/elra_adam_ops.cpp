// elra_adam_ops.cpp: the CPU kernels of the elra_adam:: operators (ElraAdam).
//
// The schemas are declared in elra/adam_ops.py, the pure-torch kernels (the ground truth of the
// tests) are in elra/adam_kernels_torch.py; importing elra._C registers these for CPU tensors.
//
// [note: ElraAdam's one pass]
// step reads x, m, v, D and g and writes x, m, v and D (9 streams of the parameters' size; fused
// Adam moves 7): per element the moments, the two sums <g, D> (D before the step) and
// <g, s g>, the move x <- x (1 - alpha wd) - alpha u and the drift D <- beta_a D - alpha u, with
// the alpha of the last step (elra/adam_engine.py, [note: one pass, last step's alpha]). An
// element whose gradient is not finite is left as it was. Sums are formed per fixed-size chunk
// (independent of the thread count) and the chunk sums added in order in double.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "elra_adam_checks.h"
#include "elra_cpu.h"

namespace elra {
namespace {

constexpr int64_t ADAM_CHUNK = 1 << 14;
constexpr int ADAM_LANES = 8;

// The coefficients of one segment in the opmath type: the step a, the decay keep = 1 - a wd,
// w1 = 1 - beta1, beta1, beta2, w2 = 1 - beta2, 1 / sqrt(bc2), eps, 1 / bc1, beta_a.
template <typename Acc>
struct Coef {
  Acc a, keep, w1, b1, b2, w2, isb2, eps, ibc1, ba;
};

template <typename Acc>
Coef<Acc> coef_of(double alpha, double wd, double bc1, double bc2, double beta1, double beta2,
                  double eps, double beta_a) {
  return {static_cast<Acc>(alpha), static_cast<Acc>(1.0 - alpha * wd),
          static_cast<Acc>(1.0 - beta1), static_cast<Acc>(beta1), static_cast<Acc>(beta2),
          static_cast<Acc>(1.0 - beta2), static_cast<Acc>(1.0 / std::sqrt(bc2)),
          static_cast<Acc>(eps), static_cast<Acc>(1.0 / bc1), static_cast<Acc>(beta_a)};
}

// One element of step: the sums into gd, gn; x, m, v, d updated where g is finite.
template <typename T, typename Acc>
inline void step_element(T& x, T& m, T& v, T& d, T g, const Coef<Acc>& c, Acc& gd, Acc& gn) {
  const Acc gv = static_cast<Acc>(g), dv = static_cast<Acc>(d);
  const Acc mv = static_cast<Acc>(m), vv = static_cast<Acc>(v), xv = static_cast<Acc>(x);
  gd += gv * dv;
  const Acc mn = mv + c.w1 * (gv - mv);
  const Acc vn = vv * c.b2 + c.w2 * gv * gv;
  const Acc r = Acc(1) / (std::sqrt(vn) * c.isb2 + c.eps);
  gn += gv * r * gv;
  const Acc u = mn * r * c.ibc1;
  if (gv - gv == Acc(0)) {  // g finite
    x = static_cast<T>(xv * c.keep - c.a * u);
    m = static_cast<T>(mn);
    v = static_cast<T>(vn);
    d = static_cast<T>(dv * c.ba - c.a * u);
  }
}

template <typename T>
void step_chunk(T* __restrict__ x, T* __restrict__ m, T* __restrict__ v, T* __restrict__ d,
                const T* __restrict__ g, int64_t b, int64_t e,
                const Coef<at::opmath_type<T>>& c, double* sums) {
  using Acc = at::opmath_type<T>;
  Acc gd[ADAM_LANES] = {}, gn[ADAM_LANES] = {};
  int64_t i = b;
  for (; i + ADAM_LANES <= e; i += ADAM_LANES)
    for (int l = 0; l < ADAM_LANES; ++l)
      step_element<T, Acc>(x[i + l], m[i + l], v[i + l], d[i + l], g[i + l], c, gd[l], gn[l]);
  for (; i < e; ++i) step_element<T, Acc>(x[i], m[i], v[i], d[i], g[i], c, gd[0], gn[0]);
  for (int l = 0; l < ADAM_LANES; ++l) {
    sums[0] += gd[l];
    sums[1] += gn[l];
  }
}

#ifdef ELRA_HAVE_AVX2_PATH
// step for float32 with AVX2+FMA, 8 elements at a time (the tail in step_element); the same
// operations as step_element, blends keeping the elements whose gradient is not finite.
__attribute__((target("avx2,fma"))) void step_chunk_avx2(float* __restrict__ x,
                                                         float* __restrict__ m,
                                                         float* __restrict__ v,
                                                         float* __restrict__ d,
                                                         const float* __restrict__ g, int64_t b,
                                                         int64_t e, const Coef<float>& c,
                                                         double* sums) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 a = _mm256_set1_ps(c.a), keep = _mm256_set1_ps(c.keep), w1 = _mm256_set1_ps(c.w1);
  const __m256 b2 = _mm256_set1_ps(c.b2), w2 = _mm256_set1_ps(c.w2);
  const __m256 isb2 = _mm256_set1_ps(c.isb2), eps = _mm256_set1_ps(c.eps);
  const __m256 ibc1 = _mm256_set1_ps(c.ibc1), ba = _mm256_set1_ps(c.ba);
  __m256 gd = zero, gn = zero;
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256 g0 = _mm256_loadu_ps(g + i), d0 = _mm256_loadu_ps(d + i);
    const __m256 m0 = _mm256_loadu_ps(m + i), v0 = _mm256_loadu_ps(v + i);
    const __m256 x0 = _mm256_loadu_ps(x + i);
    gd = _mm256_fmadd_ps(g0, d0, gd);
    const __m256 mn = _mm256_fmadd_ps(w1, _mm256_sub_ps(g0, m0), m0);
    const __m256 vn = _mm256_fmadd_ps(_mm256_mul_ps(w2, g0), g0, _mm256_mul_ps(v0, b2));
    const __m256 r = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_sqrt_ps(vn), isb2, eps));
    gn = _mm256_fmadd_ps(_mm256_mul_ps(g0, r), g0, gn);
    const __m256 au = _mm256_mul_ps(a, _mm256_mul_ps(_mm256_mul_ps(mn, r), ibc1));
    const __m256 ok = _mm256_cmp_ps(_mm256_sub_ps(g0, g0), zero, _CMP_EQ_OQ);
    _mm256_storeu_ps(x + i, _mm256_blendv_ps(x0, _mm256_fmsub_ps(x0, keep, au), ok));
    _mm256_storeu_ps(m + i, _mm256_blendv_ps(m0, mn, ok));
    _mm256_storeu_ps(v + i, _mm256_blendv_ps(v0, vn, ok));
    _mm256_storeu_ps(d + i, _mm256_blendv_ps(d0, _mm256_fmsub_ps(d0, ba, au), ok));
  }
  float lanes[16];
  _mm256_storeu_ps(lanes, gd);
  _mm256_storeu_ps(lanes + 8, gn);
  for (int l = 0; l < 8; ++l) {
    sums[0] += lanes[l];
    sums[1] += lanes[8 + l];
  }
  float gd1 = 0.0f, gn1 = 0.0f;
  for (; i < e; ++i) step_element<float, float>(x[i], m[i], v[i], d[i], g[i], c, gd1, gn1);
  sums[0] += gd1;
  sums[1] += gn1;
}

// 16 elements of the AVX-512 kernel below (a function of its own: a lambda would not inherit
// the target attribute the intrinsics need); masked stores keep the elements whose gradient is
// not finite.
struct Coef512 {
  __m512 a, keep, w1, b2, w2, isb2, eps, ibc1, ba;
};

__attribute__((target("avx512f"), always_inline)) inline void step_vec512(
    float* __restrict__ x, float* __restrict__ m, float* __restrict__ v, float* __restrict__ d,
    const float* __restrict__ g, int64_t j, const Coef512& c, __m512& gd, __m512& gn) {
  const __m512 g0 = _mm512_loadu_ps(g + j), d0 = _mm512_loadu_ps(d + j);
  const __m512 m0 = _mm512_loadu_ps(m + j), v0 = _mm512_loadu_ps(v + j);
  const __m512 x0 = _mm512_loadu_ps(x + j);
  gd = _mm512_fmadd_ps(g0, d0, gd);
  const __m512 mn = _mm512_fmadd_ps(c.w1, _mm512_sub_ps(g0, m0), m0);
  const __m512 vn = _mm512_fmadd_ps(_mm512_mul_ps(c.w2, g0), g0, _mm512_mul_ps(v0, c.b2));
  const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                 _mm512_fmadd_ps(_mm512_sqrt_ps(vn), c.isb2, c.eps));
  gn = _mm512_fmadd_ps(_mm512_mul_ps(g0, r), g0, gn);
  const __m512 au = _mm512_mul_ps(c.a, _mm512_mul_ps(_mm512_mul_ps(mn, r), c.ibc1));
  const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(g0, g0), _mm512_setzero_ps(), _CMP_EQ_OQ);
  _mm512_mask_storeu_ps(x + j, ok, _mm512_fmsub_ps(x0, c.keep, au));
  _mm512_mask_storeu_ps(m + j, ok, mn);
  _mm512_mask_storeu_ps(v + j, ok, vn);
  _mm512_mask_storeu_ps(d + j, ok, _mm512_fmsub_ps(d0, c.ba, au));
}

// step for float32 with AVX-512, two vectors per iteration (the tail in step_element).
__attribute__((target("avx512f"))) void step_chunk_avx512(float* __restrict__ x,
                                                          float* __restrict__ m,
                                                          float* __restrict__ v,
                                                          float* __restrict__ d,
                                                          const float* __restrict__ g, int64_t b,
                                                          int64_t e, const Coef<float>& c,
                                                          double* sums) {
  const Coef512 k{_mm512_set1_ps(c.a),  _mm512_set1_ps(c.keep), _mm512_set1_ps(c.w1),
                  _mm512_set1_ps(c.b2), _mm512_set1_ps(c.w2),   _mm512_set1_ps(c.isb2),
                  _mm512_set1_ps(c.eps), _mm512_set1_ps(c.ibc1), _mm512_set1_ps(c.ba)};
  __m512 gd0 = _mm512_setzero_ps(), gn0 = gd0, gd1 = gd0, gn1 = gd0;
  int64_t i = b;
  for (; i + 32 <= e; i += 32) {
    step_vec512(x, m, v, d, g, i, k, gd0, gn0);
    step_vec512(x, m, v, d, g, i + 16, k, gd1, gn1);
  }
  float lanes[32];
  _mm512_storeu_ps(lanes, _mm512_add_ps(gd0, gd1));
  _mm512_storeu_ps(lanes + 16, _mm512_add_ps(gn0, gn1));
  for (int l = 0; l < 16; ++l) {
    sums[0] += lanes[l];
    sums[1] += lanes[16 + l];
  }
  float gdt = 0.0f, gnt = 0.0f;
  for (; i < e; ++i) step_element<float, float>(x[i], m[i], v[i], d[i], g[i], c, gdt, gnt);
  sums[0] += gdt;
  sums[1] += gnt;
}
#endif

// One segment of step: per chunk in parallel, the chunk sums added in order into out2.
template <typename T>
void step_range(T* x, T* m, T* v, T* d, const T* g, int64_t n,
                const Coef<at::opmath_type<T>>& c, double* out2) {
  const int64_t nchunks = (n + ADAM_CHUNK - 1) / ADAM_CHUNK;
  std::vector<double> partial(static_cast<size_t>(nchunks) * 2, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      const int64_t lo = ch * ADAM_CHUNK, hi = std::min(n, lo + ADAM_CHUNK);
      double* sums = partial.data() + 2 * ch;
#ifdef ELRA_HAVE_AVX2_PATH
      if constexpr (std::is_same_v<T, float>) {
        if (cpu_has_avx512()) {
          step_chunk_avx512(x, m, v, d, g, lo, hi, c, sums);
          continue;
        }
        if (cpu_has_avx2()) {
          step_chunk_avx2(x, m, v, d, g, lo, hi, c, sums);
          continue;
        }
      }
#endif
      step_chunk<T>(x, m, v, d, g, lo, hi, c, sums);
    }
  });
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    out2[0] += partial[2 * ch];
    out2[1] += partial[2 * ch + 1];
  }
}

void step_cpu(at::Tensor& x, at::Tensor& m, at::Tensor& v, at::Tensor& d, const at::Tensor& g,
              at::IntArrayRef bounds, at::ArrayRef<double> wd, double alpha, double bc1,
              double bc2, double beta1, double beta2, double eps, double beta_a,
              at::Tensor& out) {
  const int nseg = check_adam_step(x, m, v, d, g, bounds, wd, out);
  double* o = out.data_ptr<double>();
  o[0] = o[1] = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elra_adam_step", [&] {
    using Acc = at::opmath_type<scalar_t>;
    scalar_t *xp = x.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>();
    scalar_t *vp = v.data_ptr<scalar_t>(), *dp = d.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    for (int k = 0; k < nseg; ++k) {
      const int64_t b = bounds[k], n = bounds[k + 1] - b;
      if (n == 0) continue;
      const auto c = coef_of<Acc>(alpha, wd[k], bc1, bc2, beta1, beta2, eps, beta_a);
      step_range<scalar_t>(xp + b, mp + b, vp + b, dp + b, gp + b, n, c, o);
    }
  });
}

// One element of undo: back over a step of a (u from the current m, v); with the step's
// gradient g (only where it is finite) m and v go back too.
template <typename T, typename Acc>
inline void undo_element(T& x, T& m, T& v, T& d, const T* g, const Coef<Acc>& c) {
  const Acc mv = static_cast<Acc>(m), vv = static_cast<Acc>(v);
  if (g != nullptr && !(static_cast<Acc>(*g) - static_cast<Acc>(*g) == Acc(0))) return;
  const Acc r = Acc(1) / (std::sqrt(vv) * c.isb2 + c.eps);
  const Acc au = c.a * (mv * r * c.ibc1);
  x = static_cast<T>((static_cast<Acc>(x) + au) / c.keep);
  d = static_cast<T>((static_cast<Acc>(d) + au) / c.ba);
  if (g != nullptr) {
    const Acc gv = static_cast<Acc>(*g);
    m = static_cast<T>((mv - c.w1 * gv) / c.b1);
    v = static_cast<T>(std::max((vv - c.w2 * gv * gv) / c.b2, Acc(0)));
  }
}

void undo_cpu(at::Tensor& x, at::Tensor& m, at::Tensor& v, at::Tensor& d,
              const std::optional<at::Tensor>& g, at::IntArrayRef bounds,
              at::ArrayRef<double> wd, double alpha, double bc1, double bc2, double beta1,
              double beta2, double eps, double beta_a) {
  const int nseg = check_adam(x, m, v, d, g.has_value() ? &*g : nullptr, bounds, wd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "elra_adam_undo", [&] {
    using Acc = at::opmath_type<scalar_t>;
    scalar_t *xp = x.data_ptr<scalar_t>(), *mp = m.data_ptr<scalar_t>();
    scalar_t *vp = v.data_ptr<scalar_t>(), *dp = d.data_ptr<scalar_t>();
    const scalar_t* gp = g.has_value() ? g->data_ptr<scalar_t>() : nullptr;
    for (int k = 0; k < nseg; ++k) {
      const auto c = coef_of<Acc>(alpha, wd[k], bc1, bc2, beta1, beta2, eps, beta_a);
      at::parallel_for(bounds[k], bounds[k + 1], ADAM_CHUNK, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          undo_element<scalar_t, Acc>(xp[i], mp[i], vp[i], dp[i], gp ? gp + i : nullptr, c);
      });
    }
  });
}

}  // namespace
}  // namespace elra

// The schemas are declared in Python (elra/adam_ops.py).
TORCH_LIBRARY_IMPL(elra_adam, CPU, m) {
  m.impl("step", &elra::step_cpu);
  m.impl("undo", &elra::undo_cpu);
}
