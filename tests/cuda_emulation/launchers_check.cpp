// launchers_check.cpp: the launchers of csrc/cuda/elra_cuda.cu, run on the CPU emulation
// (csrc/cuda/emulation), against sums and element updates computed in double.
//
// Built without torch by tests/test_cuda_emulation.py, under AddressSanitizer + UBSan and under
// ThreadSanitizer, with the block cap lowered (-DELRA_CUDA_MAX_BLOCKS_PER_SEGMENT) so that the
// segments take several grid-stride passes. Buffers end exactly at their last element (and the
// elements before a misaligned start are poisoned under ASan), so a read past a segment's head or
// tail is reported. First checks the emulation itself (shuffles, barriers, launch errors, half
// conversions). Prints one line per dtype and "OK" at the end; exits 1 on a mismatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "elra_cuda.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

using namespace elra;
using namespace elra::cuda;

namespace {

template <typename T>
struct Ty;
template <>
struct Ty<float> {
  static constexpr DType dt = DType::Float32;
  static constexpr double eps = 1.1920929e-07, sum_tol = 2e-5;
  static double get(float v) { return v; }
  static float put(double v) { return static_cast<float>(v); }
  static const char* name() { return "float32"; }
};
template <>
struct Ty<double> {
  static constexpr DType dt = DType::Float64;
  static constexpr double eps = 2.220446049250313e-16, sum_tol = 1e-12;
  static double get(double v) { return v; }
  static double put(double v) { return v; }
  static const char* name() { return "float64"; }
};
template <>
struct Ty<__half> {
  static constexpr DType dt = DType::Float16;
  static constexpr double eps = 9.765625e-4, sum_tol = 2e-5;
  static double get(__half v) { return __half2float(v); }
  static __half put(double v) { return __float2half_rn(static_cast<float>(v)); }
  static const char* name() { return "float16"; }
};
template <>
struct Ty<__nv_bfloat16> {
  static constexpr DType dt = DType::BFloat16;
  static constexpr double eps = 7.8125e-3, sum_tol = 2e-5;
  static double get(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __nv_bfloat16 put(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
  static const char* name() { return "bfloat16"; }
};

std::mt19937_64 rng(12345);
int failures = 0;
double worst = 0.0;  // the largest deviation seen, in units of its tolerance

// n elements starting `off` elements into an allocation that ends right after them.
template <typename T>
struct Buf {
  void* base = nullptr;
  T* p = nullptr;
  size_t off = 0;
  Buf(size_t n, size_t off_) : off(off_) {
    if (posix_memalign(&base, 64, (n + off) * sizeof(T) + (n + off == 0)) != 0) std::abort();
    p = static_cast<T*>(base) + off;
    POISON(base, off * sizeof(T));
  }
  ~Buf() {
    UNPOISON(base, off * sizeof(T));
    std::free(base);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

template <typename T>
void fill(T* p, int64_t n, double scale = 1.0) {
  std::uniform_real_distribution<double> u(-scale, scale);
  for (int64_t i = 0; i < n; ++i) p[i] = Ty<T>::put(u(rng));
}

void expect(bool ok, const char* what, const char* dtype, int64_t i, double got, double want,
            double tol) {
  const double dev = std::fabs(got - want) / (tol > 0 ? tol : 1e-300);
  if (dev > worst && std::isfinite(dev)) worst = dev;
  if (!ok || !(std::fabs(got - want) <= tol)) {
    if (++failures <= 20)
      std::printf("MISMATCH %s %s at %lld: got %.17g want %.17g (tol %.3g)\n", what, dtype,
                  static_cast<long long>(i), got, want, tol);
  }
}

void check_status(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("ERROR %s: launch returned %d (%s)\n", what, static_cast<int>(e),
                cudaGetErrorString(e));
    ++failures;
  }
}

Segments segments_of(const std::vector<int64_t>& sizes) {
  Segments s{};
  s.nseg = static_cast<int>(sizes.size());
  s.bound[0] = 0;
  for (size_t k = 0; k < sizes.size(); ++k) s.bound[k + 1] = s.bound[k] + sizes[k];
  return s;
}

// reduce (with and without x) and step_fused + fixup on one layout.
template <typename T>
void check_reduce_fused(const std::vector<int64_t>& sizes, const size_t off[4]) {
  const char* nm = Ty<T>::name();
  const Segments seg = segments_of(sizes);
  const int64_t n = seg.bound[seg.nseg];
  Buf<T> g(n, off[0]), d(n, off[1]), x(n, off[2]), dn(n, off[3]);
  fill(g.p, n);
  fill(d.p, n);
  fill(x.p, n);
  const size_t wbytes = reduce_workspace_bytes(Ty<T>::dt, seg);
  std::vector<double> work(wbytes / sizeof(double) + 1), out(RED_WIDTH * seg.nseg);
  std::vector<double> x0(n), d0(n), g0(n);
  for (int64_t i = 0; i < n; ++i) {
    x0[i] = Ty<T>::get(x.p[i]);
    d0[i] = Ty<T>::get(d.p[i]);
    g0[i] = Ty<T>::get(g.p[i]);
  }
  auto check_sums = [&](const char* what, bool with_x) {
    for (int k = 0; k < seg.nseg; ++k) {
      double ref[5] = {}, scale[5] = {};
      for (int64_t i = seg.bound[k]; i < seg.bound[k + 1]; ++i) {
        const double t[5] = {g0[i] * d0[i], g0[i] * g0[i], x0[i] * d0[i], g0[i] * x0[i],
                             x0[i] * x0[i]};
        for (int c = 0; c < 5; ++c) {
          ref[c] += t[c];
          scale[c] += std::fabs(t[c]);
        }
      }
      for (int c = 0; c < 5; ++c) {
        const double want = (c >= 2 && !with_x) ? 0.0 : ref[c];
        expect(true, what, nm, k * 5 + c, out[k * 5 + c], want, Ty<T>::sum_tol * scale[c]);
      }
    }
  };
  for (bool with_x : {false, true}) {
    std::fill(out.begin(), out.end(), NAN);
    check_status(launch_reduce(Ty<T>::dt, g.p, d.p, with_x ? x.p : nullptr, seg, with_x,
                               out.data(), work.data(), wbytes, nullptr),
                 "reduce");
    check_sums("reduce", with_x);
  }
  // step_fused without decay: d_new = b d + (1 - b) inv g, x -= s d_new
  const double inv = 0.75, b = 0.5, s = 0.3;
  std::vector<double> scal(NUM_SLOTS, 0.0);
  std::fill(out.begin(), out.end(), NAN);
  check_status(launch_step_fused(Ty<T>::dt, x.p, d.p, dn.p, g.p, seg, scal.data(), nullptr, 0,
                                 inv, b, s, out.data(), work.data(), wbytes, nullptr),
               "step_fused");
  check_sums("step_fused", false);
  const double etol = 8 * Ty<T>::eps;
  for (int64_t i = 0; i < n; ++i) {
    const double dref = b * d0[i] + (1 - b) * inv * g0[i];
    const double dgot = Ty<T>::get(dn.p[i]);
    expect(true, "step_fused d_new", nm, i, dgot, dref, etol * (1 + std::fabs(dref)));
    const double xref = x0[i] - s * dgot;
    expect(true, "step_fused x", nm, i, Ty<T>::get(x.p[i]), xref, etol * (1 + std::fabs(xref)));
  }
  // fixup MODE_SHIFT: x += u d_new
  std::vector<double> x1(n), coef(seg.nseg, 0.0);
  for (int64_t i = 0; i < n; ++i) x1[i] = Ty<T>::get(x.p[i]);
  scal[MODE] = MODE_SHIFT;
  scal[MOVE_S] = 0.125;
  check_status(launch_fixup(Ty<T>::dt, x.p, d.p, dn.p, g.p, seg, scal.data(), coef.data(), b,
                            nullptr),
               "fixup");
  for (int64_t i = 0; i < n; ++i) {
    const double xref = x1[i] + 0.125 * Ty<T>::get(dn.p[i]);
    expect(true, "fixup x", nm, i, Ty<T>::get(x.p[i]), xref, etol * (1 + std::fabs(xref)));
  }
}

// update MODE_STEP with a retrace copy and per-segment decay.
template <typename T>
void check_update(const std::vector<int64_t>& sizes, const size_t off[4]) {
  const char* nm = Ty<T>::name();
  const Segments seg = segments_of(sizes);
  const int64_t n = seg.bound[seg.nseg];
  Buf<T> x(n, off[0]), d(n, off[1]), g(n, off[2]), xg(n, off[3]);
  fill(x.p, n);
  fill(d.p, n);
  fill(g.p, n);
  std::vector<double> x0(n), d0(n), g0(n), coef(seg.nseg);
  for (int k = 0; k < seg.nseg; ++k) coef[k] = 0.01 * (k % 3);
  for (int64_t i = 0; i < n; ++i) {
    x0[i] = Ty<T>::get(x.p[i]);
    d0[i] = Ty<T>::get(d.p[i]);
    g0[i] = Ty<T>::get(g.p[i]);
  }
  std::vector<double> scal(NUM_SLOTS, 0.0);
  scal[MODE] = MODE_STEP;
  scal[MOVE_S] = 0.3;
  scal[INV] = 0.75;
  const double b = 0.9;
  check_status(launch_update(Ty<T>::dt, x.p, d.p, g.p, xg.p, scal.data(), coef.data(), seg, b,
                             nullptr),
               "update");
  const double etol = 8 * Ty<T>::eps;
  for (int k = 0; k < seg.nseg; ++k)
    for (int64_t i = seg.bound[k]; i < seg.bound[k + 1]; ++i) {
      const double dref = b * d0[i] + (1 - b) * (0.75 * g0[i] + coef[k] * x0[i]);
      const double dgot = Ty<T>::get(d.p[i]);
      expect(true, "update d", nm, i, dgot, dref, etol * (1 + std::fabs(dref)));
      const double xref = x0[i] - 0.3 * dgot;
      expect(true, "update x", nm, i, Ty<T>::get(x.p[i]), xref, etol * (1 + std::fabs(xref)));
      expect(true, "update xg", nm, i, Ty<T>::get(xg.p[i]), x0[i], 0.0);
    }
}

// collect: coll += w g over n elements, |g|^2 inv^2 into the slots.
template <typename T>
void check_collect(int64_t n, const size_t off[2]) {
  const char* nm = Ty<T>::name();
  Buf<T> c(n, off[0]), g(n, off[1]);
  fill(c.p, n);
  fill(g.p, n);
  std::vector<double> c0(n);
  double gg = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    c0[i] = Ty<T>::get(c.p[i]);
    gg += Ty<T>::get(g.p[i]) * Ty<T>::get(g.p[i]);
  }
  const size_t wbytes = collect_workspace_bytes(Ty<T>::dt, n);
  std::vector<double> work(wbytes / sizeof(double) + 1), scal(NUM_SLOTS, 0.0);
  check_status(launch_collect(Ty<T>::dt, c.p, g.p, n, 0.3, 0.5, false, false, scal.data(),
                              work.data(), wbytes, nullptr),
               "collect");
  expect(scal[STATUS] == ST_OK, "collect status", nm, 0, scal[STATUS], ST_OK, 0.0);
  expect(true, "collect |g|^2", nm, 0, scal[GRAD_SQ], 0.25 * gg, Ty<T>::sum_tol * 0.25 * gg);
  for (int64_t i = 0; i < n; ++i) {
    const double ref = c0[i] + 0.3 * Ty<T>::get(g.p[i]);
    expect(true, "collect", nm, i, Ty<T>::get(c.p[i]), ref, 8 * Ty<T>::eps * (1 + std::fabs(ref)));
  }
}

template <typename T>
void check_dtype(const std::vector<std::vector<int64_t>>& layouts,
                 const std::vector<int64_t>& collect_sizes) {
  const int before = failures;
  const double worst_before = worst;
  worst = 0.0;
  const size_t same[4] = {1, 1, 1, 1}, zero[4] = {0, 0, 0, 0}, mixed[4] = {0, 1, 3, 2};
  for (const auto& sizes : layouts)
    for (const size_t* off : {zero, same, mixed}) {
      check_reduce_fused<T>(sizes, off);
      check_update<T>(sizes, off);
    }
  for (int64_t n : collect_sizes)
    for (const size_t* off : {zero, same, mixed}) check_collect<T>(n, off);
  std::printf("%-8s %s (max deviation %.3g of the tolerance)\n", Ty<T>::name(),
              failures == before ? "ok" : "MISMATCHES", worst);
  worst = worst > worst_before ? worst : worst_before;
}

}  // namespace

// --- the emulation itself ----------------------------------------------------------------------
__global__ void shuffle_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  int v = __shfl_down_sync(0xffffffffu, t, 3);  // lane + 3, or its own past lane 31
  v += 100 * __shfl_xor_sync(0xffffffffu, t, 5);
  v += 10000 * __shfl_up_sync(0xffffffffu, t, 1);  // lane - 1, or its own at lane 0
  v += 1000000 * __shfl_sync(0xffffffffu, t, 7);  // lane 7 of the warp
  __shared__ int sh[64];
  sh[t] = v;
  __syncthreads();
  out[t] = sh[63 - t];  // another warp's value: through shared memory and the barrier
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();  // the other threads never arrive
  out[threadIdx.x] = 1;
}

__global__ void misaligned_kernel(const float* p, float* out) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p + 1));
  out[0] = static_cast<float>(u.x);
}

void expect_int(bool ok, const char* what) {
  if (!ok) {
    std::printf("EMULATION %s: wrong\n", what);
    ++failures;
  }
}

// The emulated shuffles, barriers, launch errors and half conversions against known answers.
void check_emulation() {
  std::vector<int> out(64, -1);
  ELRA_LAUNCH(1, 64, 0, nullptr, shuffle_kernel)(out.data());
  expect_int(cudaGetLastError() == cudaSuccess, "shuffle launch");
  for (int t = 0; t < 64; ++t) {
    const int r = 63 - t, lane = r & 31, base = r - lane;
    const int down = lane + 3 < 32 ? r + 3 : r, up = lane >= 1 ? r - 1 : r;
    const int want = down + 100 * (base + (lane ^ 5)) + 10000 * up + 1000000 * (base + 7);
    expect_int(out[t] == want, "shuffles");
  }
  ELRA_LAUNCH(1, 32, 0, nullptr, divergent_barrier_kernel)(out.data());
  expect_int(cudaGetLastError() == cudaErrorLaunchFailure, "divergent __syncthreads reported");
  alignas(16) float buf[8] = {};
  ELRA_LAUNCH(1, 1, 0, nullptr, misaligned_kernel)(buf, buf);
  expect_int(cudaGetLastError() == cudaErrorMisalignedAddress, "misaligned access reported");
  ELRA_LAUNCH(0, 32, 0, nullptr, divergent_barrier_kernel)(out.data());
  expect_int(cudaGetLastError() == cudaErrorInvalidConfiguration, "empty grid reported");
  expect_int(cudaGetLastError() == cudaSuccess, "error cleared once read");
  // round to nearest even: 1 + 2^-11 is a tie (to 1), 1 + 3 2^-11 rounds up to 1 + 2^-9
  const struct { float in, half; } cases[] = {
      {1.0f + 0x1p-11f, 1.0f}, {1.0f + 3 * 0x1p-11f, 1.0f + 0x1p-9f}, {65519.0f, 65504.0f},
      {65520.0f, INFINITY}, {0x1p-25f, 0.0f}, {0x1.8p-25f, 0x1p-24f}, {-0x1p-20f, -0x1p-20f},
      {0x1.4p-23f, 0x1p-23f}, {0x1.cp-23f, 0x1p-22f}};  // subnormal ties
  for (const auto& c : cases) expect_int(__half2float(__float2half_rn(c.in)) == c.half, "half");
  expect_int(std::isnan(__half2float(__float2half_rn(NAN))), "half NaN");
  expect_int(__bfloat162float(__float2bfloat16_rn(1.0f + 0x1p-8f)) == 1.0f, "bfloat16 tie");
  expect_int(__bfloat162float(__float2bfloat16_rn(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f,
             "bfloat16 round up");
  expect_int(std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))), "bfloat16 NaN");
  std::printf("emulation %s\n", failures ? "MISMATCHES" : "ok");
}

// launchers_check [--quick | --big]: --quick (for ThreadSanitizer, which is slow) checks fewer
// layouts, in float32 and float16; --big (for a build with the GPU's block cap) one layout whose
// segment needs more blocks (and partial sums) than a block has threads.
int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool quick = mode == "--quick";
  // per segment: empty, 1, odd, several blocks, more than one grid pass (the cap is lowered);
  // and MAX_SEGMENTS small ones
  std::vector<std::vector<int64_t>> layouts = {{0}, {1}, {3, 0, 17, 4097}, {40003, 5}};
  std::vector<int64_t> many, collect_sizes = {0, 1, 17, 4099, 40003};
  for (int k = 0; k < MAX_SEGMENTS; ++k) many.push_back((k * 37) % 101);
  layouts.push_back(many);
  if (quick) {
    layouts = {{1}, {3, 0, 17, 4097}, {13001, 5}};
    collect_sizes = {17, 13001};
  }
  if (mode == "--big") {  // built with the GPU's block cap: more partials than threads to sum
    layouts = {{256 * 4096 * 2 + 77, 3}};
    collect_sizes = {256 * 4096 * 2 + 77};
  }
  check_emulation();
  check_dtype<float>(layouts, collect_sizes);
  check_dtype<__half>(layouts, collect_sizes);
  if (!quick && mode != "--big") {
    check_dtype<double>(layouts, collect_sizes);
    check_dtype<__nv_bfloat16>(layouts, collect_sizes);
  }
  if (failures) {
    std::printf("FAILED: %d mismatches\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
