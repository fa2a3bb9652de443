// elra_cuda.cu: the CUDA kernels of the elra:: operators (reduce, collect, finalize, update,
// step_fused, fixup).
//
// Compiles with plain nvcc: no torch, ATen or c10 headers (the torch glue is elra_cuda_glue.cpp).
// The scalar and element-wise math is the one of ../elra_math.h, shared with the CPU kernels of
// ../elra_ops.cpp, whose semantics these kernels follow (see the notes in elra_cuda.h).
//
// [note: kernel shape]
// One 1-d grid covers all segments of a call: segment k owns the blocks
// [first_block[k], first_block[k+1]), at least THREADS * PACK * MIN_PACKS_PER_THREAD elements per
// block and at most MAX_BLOCKS_PER_SEGMENT blocks, which walk the segment with a grid-stride loop
// (64-bit indices). Inside a segment the elements before the first 16-byte boundary (the head)
// and after the last one (the tail) are handled one by one; the body is read and written in
// 16-byte packs (float4 for float32, 2 doubles, 8 halves) when all the buffers a kernel touches
// share their offset modulo 16 bytes, else the whole segment goes one by one.
//
// [note: half types]
// __half and __nv_bfloat16 are wrapped in half_t / bf16_t, which convert to and from float with
// round-to-nearest-even (as c10::Half / c10::BFloat16 do on the CPU). The wrappers work whether
// or not the __CUDA_NO_HALF_CONVERSIONS__ family of macros (set by torch's extension builder) is
// defined. The opmath type is float for them, double for double, as in torch.
//
// [note: rounding]
// nvcc contracts a * b + c into fused multiply-adds (as the AVX2 float32 paths of the CPU kernels
// do explicitly, the generic CPU paths do not), and the sums go in another order than on the
// CPU, so the two devices agree to rounding, not bit for bit. No fast-math: subnormals are kept
// and divisions and square roots are IEEE, as on the CPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../elra_math.h"
#include "elra_cuda.h"

namespace elra {
namespace cuda {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int PACK_BYTES = 16;
constexpr int MIN_PACKS_PER_THREAD = 4;
#ifdef ELRA_CUDA_MAX_BLOCKS_PER_SEGMENT  // lowered by the emulated tests: many grid-stride passes
constexpr int MAX_BLOCKS_PER_SEGMENT = ELRA_CUDA_MAX_BLOCKS_PER_SEGMENT;
#else
constexpr int MAX_BLOCKS_PER_SEGMENT = 1024;
#endif
// update: at most 64 registers per thread (4 blocks, half the threads of an SM resident); left
// alone, the compiler unrolls the pack loop of the float32 step to over 90 and 2 blocks
constexpr int UPDATE_MIN_BLOCKS = 4;
static_assert(THREADS % 32 == 0 && WARPS <= 32, "block size");

// --- element types ------------------------------------------------------------------------------
struct half_t {
  __half v;
  half_t() = default;
  __host__ __device__ __forceinline__ explicit half_t(float f) : v(__float2half_rn(f)) {}
  __host__ __device__ __forceinline__ explicit operator float() const { return __half2float(v); }
};

struct bf16_t {
  __nv_bfloat16 v;
  bf16_t() = default;
  __host__ __device__ __forceinline__ explicit bf16_t(float f) : v(__float2bfloat16_rn(f)) {}
  __host__ __device__ __forceinline__ explicit operator float() const {
    return __bfloat162float(v);
  }
};

static_assert(sizeof(half_t) == 2 && sizeof(bf16_t) == 2, "half wrappers must not add padding");

template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<half_t> {
  using type = float;
};
template <>
struct OpMath<bf16_t> {
  using type = float;
};
template <typename T>
using acc_t = typename OpMath<T>::type;

// 16 bytes of elements, loaded and stored as one 128-bit access.
template <typename T>
struct alignas(PACK_BYTES) Pack {
  static constexpr int N = PACK_BYTES / static_cast<int>(sizeof(T));
  T v[N];
};

// The accesses go through the uint4 load/store intrinsics: a plain copy of the struct may be
// split by the compiler into narrower accesses (seen for the half types). load_pack_ro is for
// buffers that the kernel does not write (read-only data cache).
template <typename T>
__device__ __forceinline__ Pack<T> from_bits(const uint4& u) {
  Pack<T> v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return from_bits<T>(__ldca(reinterpret_cast<const uint4*>(p)));
}

template <typename T>
__device__ __forceinline__ Pack<T> load_pack_ro(const T* p) {
  return from_bits<T>(__ldg(reinterpret_cast<const uint4*>(p)));
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
  uint4 u;
  memcpy(&u, &v, sizeof(u));
  __stwb(reinterpret_cast<uint4*>(p), u);
}

__device__ __forceinline__ unsigned misalign(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) % PACK_BYTES);
}

// Elements before the first pack boundary of a segment of n elements starting at p (n when the
// segment cannot use packs).
template <typename T>
__device__ __forceinline__ int64_t head_of(const T* p, int64_t n, bool packs) {
  if (!packs) return n;
  const unsigned mis = misalign(p) / static_cast<unsigned>(sizeof(T));
  const int64_t h = mis == 0 ? 0 : Pack<T>::N - static_cast<int64_t>(mis);
  return h < n ? h : n;
}

// --- block layout -------------------------------------------------------------------------------
struct Layout {
  int nseg;
  int first_block[MAX_SEGMENTS + 1];  // first_block[nseg] = number of blocks
  int64_t bound[MAX_SEGMENTS + 1];
};

int blocks_for(int64_t n, int pack) {
  if (n <= 0) return 0;
  const int64_t per_block = static_cast<int64_t>(THREADS) * pack * MIN_PACKS_PER_THREAD;
  const int64_t nb = (n + per_block - 1) / per_block;
  return static_cast<int>(nb < MAX_BLOCKS_PER_SEGMENT ? nb : MAX_BLOCKS_PER_SEGMENT);
}

bool valid(const Segments& s) {
  if (s.nseg < 1 || s.nseg > MAX_SEGMENTS || s.bound[0] != 0) return false;
  for (int k = 0; k < s.nseg; ++k)
    if (s.bound[k + 1] < s.bound[k]) return false;
  return true;
}

Layout make_layout(const Segments& s, int pack) {
  Layout L{};
  L.nseg = s.nseg;
  int total = 0;
  for (int k = 0; k < s.nseg; ++k) {
    L.first_block[k] = total;
    L.bound[k] = s.bound[k];
    total += blocks_for(s.bound[k + 1] - s.bound[k], pack);
  }
  L.first_block[s.nseg] = total;
  L.bound[s.nseg] = s.bound[s.nseg];
  return L;
}

int pack_of(DType t) {
  switch (t) {
    case DType::Float32: return Pack<float>::N;
    case DType::Float64: return Pack<double>::N;
    case DType::Float16: return Pack<half_t>::N;
    case DType::BFloat16: return Pack<bf16_t>::N;
  }
  return 0;
}

// Where this block works: segment k, elements [base, base + n), thread `tid` of `stride` threads.
struct Range {
  int k;
  int64_t base, n, tid, stride;
};

__device__ __forceinline__ Range block_range(const Layout& L) {
  const int b = static_cast<int>(blockIdx.x);
  int k = 0;
  while (k + 1 < L.nseg && L.first_block[k + 1] <= b) ++k;  // skips empty segments
  Range r;
  r.k = k;
  r.base = L.bound[k];
  r.n = L.bound[k + 1] - r.base;
  r.tid = static_cast<int64_t>(b - L.first_block[k]) * THREADS + threadIdx.x;
  r.stride = static_cast<int64_t>(L.first_block[k + 1] - L.first_block[k]) * THREADS;
  return r;
}

// --- deterministic block sums -------------------------------------------------------------------
// Sums v over the block in a fixed order; the result is valid in thread 0. Ends with a barrier so
// that it can be called again right away.
template <int K>
__device__ __forceinline__ void block_sum(double (&v)[K]) {
  __shared__ double sh[K][WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < K; ++c)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[c] += __shfl_down_sync(0xffffffffu, v[c], off);
  if (lane == 0)
#pragma unroll
    for (int c = 0; c < K; ++c) sh[c][warp] = v[c];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int c = 0; c < K; ++c) {
      v[c] = lane < WARPS ? sh[c][lane] : 0.0;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v[c] += __shfl_down_sync(0xffffffffu, v[c], off);
    }
  }
  __syncthreads();
}

// --- reduce -------------------------------------------------------------------------------------
template <typename T, bool WITH_X>
struct ReduceAcc {
  using Acc = acc_t<T>;
  Acc gd = 0, gg = 0, xd = 0, gx = 0, xx = 0;
  __device__ __forceinline__ void add(T g, T d, T x) {
    const Acc gv = static_cast<Acc>(g), dv = static_cast<Acc>(d);
    gd += gv * dv;
    gg += gv * gv;
    if constexpr (WITH_X) {
      const Acc xv = static_cast<Acc>(x);
      xd += xv * dv;
      gx += gv * xv;
      xx += xv * xv;
    }
  }
  // The block's sums (in double, fixed order) into its row of partials; all threads call it.
  __device__ __forceinline__ void store_block_sums(double* __restrict__ partials) const {
    double v[RED_WIDTH] = {static_cast<double>(gd), static_cast<double>(gg),
                           static_cast<double>(xd), static_cast<double>(gx),
                           static_cast<double>(xx)};
    block_sum(v);
    if (threadIdx.x == 0)
#pragma unroll
      for (int c = 0; c < RED_WIDTH; ++c)
        partials[static_cast<int64_t>(blockIdx.x) * RED_WIDTH + c] = v[c];
  }
};

template <typename T, bool WITH_X>
__global__ void __launch_bounds__(THREADS)
    reduce_kernel(const T* __restrict__ g, const T* __restrict__ d, const T* __restrict__ x,
                  Layout L, double* __restrict__ partials) {
  constexpr int N = Pack<T>::N;
  const Range r = block_range(L);
  g += r.base;
  d += r.base;
  if constexpr (WITH_X) x += r.base;
  bool packs = misalign(g) == misalign(d);
  if constexpr (WITH_X) packs = packs && misalign(g) == misalign(x);
  const int64_t head = head_of(g, r.n, packs);
  const int64_t npacks = (r.n - head) / N;
  const int64_t tail = head + npacks * N;

  ReduceAcc<T, WITH_X> a;
  for (int64_t i = r.tid; i < head; i += r.stride) a.add(g[i], d[i], WITH_X ? x[i] : T());
  for (int64_t j = r.tid; j < npacks; j += r.stride) {
    const int64_t i = head + j * N;
    const Pack<T> gp = load_pack_ro(g + i), dp = load_pack_ro(d + i);
    Pack<T> xp{};
    if constexpr (WITH_X) xp = load_pack_ro(x + i);
#pragma unroll
    for (int l = 0; l < N; ++l) a.add(gp.v[l], dp.v[l], xp.v[l]);
  }
  for (int64_t i = tail + r.tid; i < r.n; i += r.stride) a.add(g[i], d[i], WITH_X ? x[i] : T());

  a.store_block_sums(partials);
}

// One block: out[5k + c] = sum of the partials of segment k, in a fixed order.
__global__ void __launch_bounds__(THREADS)
    reduce_finish_kernel(const double* __restrict__ partials, Layout L, bool with_x,
                         double* __restrict__ out) {
  for (int k = 0; k < L.nseg; ++k) {
    double v[RED_WIDTH] = {};
    for (int b = L.first_block[k] + static_cast<int>(threadIdx.x); b < L.first_block[k + 1];
         b += THREADS)
#pragma unroll
      for (int c = 0; c < RED_WIDTH; ++c)
        v[c] += partials[static_cast<int64_t>(b) * RED_WIDTH + c];
    block_sum(v);
    if (threadIdx.x == 0)
#pragma unroll
      for (int c = 0; c < RED_WIDTH; ++c)
        out[k * RED_WIDTH + c] = (c >= 2 && !with_x) ? 0.0 : v[c];
  }
}

template <typename T>
cudaError_t reduce_typed(const void* g, const void* d, const void* x, const Segments& seg,
                         bool with_x, double* out, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  const Layout L = make_layout(seg, Pack<T>::N);
  const int blocks = L.first_block[L.nseg];
  if (workspace_bytes < static_cast<size_t>(blocks) * RED_WIDTH * sizeof(double))
    return cudaErrorInvalidValue;
  double* partials = static_cast<double*>(workspace);
  const T* gp = static_cast<const T*>(g);
  const T* dp = static_cast<const T*>(d);
  const T* xp = static_cast<const T*>(x);
  if (blocks > 0) {
    if (with_x)
      ELRA_LAUNCH(blocks, THREADS, 0, stream, reduce_kernel<T, true>)(gp, dp, xp, L, partials);
    else
      ELRA_LAUNCH(blocks, THREADS, 0, stream, reduce_kernel<T, false>)(gp, dp, nullptr, L,
                                                                       partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ELRA_LAUNCH(1, THREADS, 0, stream, reduce_finish_kernel)(partials, L, with_x, out);
  return cudaGetLastError();
}

// --- step_fused -----------------------------------------------------------------------------------
// One pass of a normal stochastic step (see [note: the one-pass stochastic step] in elra_math.h):
// the sums <g, d_prev>, |g|^2 (and with weight decay <x, d_prev>, <g, x>, |x|^2) into per-block
// partials (finished by reduce_finish_kernel), d_new <- b d_prev + (1 - b)(inv g + c x) with
// c = wd[k] spec_kappa (from the scalar slots), x <- x - s d_new where g is finite.
struct SegWd {
  double wd[MAX_SEGMENTS];
};

template <typename T, bool WITH_X>
__global__ void __launch_bounds__(THREADS)
    fused_kernel(T* __restrict__ x, const T* __restrict__ dp, T* __restrict__ dn,
                 const T* __restrict__ g, Layout L, SegWd W, const double* __restrict__ scal,
                 acc_t<T> inv, acc_t<T> b, acc_t<T> s, double* __restrict__ partials) {
  using Acc = acc_t<T>;
  constexpr int N = Pack<T>::N;
  const Range r = block_range(L);
  const Acc c = WITH_X ? static_cast<Acc>(W.wd[r.k] * spec_kappa(scal)) : Acc(0);
  x += r.base;
  dp += r.base;
  dn += r.base;
  g += r.base;
  const bool packs = misalign(x) == misalign(dp) && misalign(x) == misalign(dn) &&
                     misalign(x) == misalign(g);
  const int64_t head = head_of(x, r.n, packs);
  const int64_t npacks = (r.n - head) / N;
  const int64_t tail = head + npacks * N;
  ReduceAcc<T, WITH_X> a;
  auto one = [&](int64_t i) {
    const T gt = g[i], dpt = dp[i];
    T xv = x[i], dnv;
    a.add(gt, dpt, xv);
    fused_element<T, Acc>(xv, dpt, dnv, gt, inv, c, b, s);
    x[i] = xv;
    dn[i] = dnv;
  };
  for (int64_t i = r.tid; i < head; i += r.stride) one(i);
  for (int64_t j = r.tid; j < npacks; j += r.stride) {
    const int64_t i = head + j * N;
    Pack<T> xp = load_pack(x + i), dnp;
    const Pack<T> dpp = load_pack_ro(dp + i), gp = load_pack_ro(g + i);
#pragma unroll
    for (int l = 0; l < N; ++l) {
      a.add(gp.v[l], dpp.v[l], xp.v[l]);
      fused_element<T, Acc>(xp.v[l], dpp.v[l], dnp.v[l], gp.v[l], inv, c, b, s);
    }
    store_pack(x + i, xp);
    store_pack(dn + i, dnp);
  }
  for (int64_t i = tail + r.tid; i < r.n; i += r.stride) one(i);

  a.store_block_sums(partials);
}

template <typename T>
cudaError_t fused_typed(void* x, const void* dp, void* dn, const void* g, const Segments& seg,
                        const double* scal, const double* wd, int nwd, double inv,
                        double momentum, double step, double* out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const Layout L = make_layout(seg, Pack<T>::N);
  const int blocks = L.first_block[L.nseg];
  if (workspace_bytes < static_cast<size_t>(blocks) * RED_WIDTH * sizeof(double))
    return cudaErrorInvalidValue;
  if (nwd != 0 && nwd != seg.nseg) return cudaErrorInvalidValue;
  SegWd W{};
  for (int k = 0; k < nwd; ++k) W.wd[k] = wd[k];
  const bool with_x = nwd > 0;
  double* partials = static_cast<double*>(workspace);
  if (blocks > 0) {
    T* xt = static_cast<T*>(x);
    const T* dpt = static_cast<const T*>(dp);
    T* dnt = static_cast<T*>(dn);
    const T* gt = static_cast<const T*>(g);
    const Acc ai = static_cast<Acc>(inv), ab = static_cast<Acc>(momentum);
    const Acc as = static_cast<Acc>(step);
    if (with_x)
      ELRA_LAUNCH(blocks, THREADS, 0, stream, fused_kernel<T, true>)(xt, dpt, dnt, gt, L, W,
                                                                     scal, ai, ab, as, partials);
    else
      ELRA_LAUNCH(blocks, THREADS, 0, stream, fused_kernel<T, false>)(xt, dpt, dnt, gt, L, W,
                                                                      scal, ai, ab, as, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ELRA_LAUNCH(1, THREADS, 0, stream, reduce_finish_kernel)(partials, L, with_x, out);
  return cudaGetLastError();
}

// --- fixup --------------------------------------------------------------------------------------
// Rare (a clipped step, a bad gradient or a stale kappa after step_fused): element by element,
// mode and coefficients from the scalar slots, the segment's correction dc from coef.
template <typename T>
__global__ void __launch_bounds__(THREADS)
    fixup_kernel(T* __restrict__ x, const T* __restrict__ dp, T* __restrict__ dn,
                 const T* __restrict__ g, Layout L, const double* __restrict__ scal,
                 const double* __restrict__ coef, acc_t<T> b) {
  using Acc = acc_t<T>;
  const int mode = static_cast<int>(scal[MODE]);
  if (mode != MODE_SHIFT && mode != MODE_UNDO_RETRACE && mode != MODE_REDO) return;
  const Range r = block_range(L);
  const Acc u = static_cast<Acc>(scal[MOVE_S]), rr = static_cast<Acc>(scal[MOVE_T]);
  const Acc dc = static_cast<Acc>(coef[r.k]);
  for (int64_t j = r.tid; j < r.n; j += r.stride) {
    const int64_t i = r.base + j;
    T xv = x[i], dnv = dn[i];
    fixup_element<T, Acc>(mode, xv, dp[i], dnv, g[i], u, rr, dc, b);
    x[i] = xv;
    dn[i] = dnv;
  }
}

template <typename T>
cudaError_t fixup_typed(void* x, const void* dp, void* dn, const void* g, const Segments& seg,
                        const double* scal, const double* coef, double momentum,
                        cudaStream_t stream) {
  const Layout L = make_layout(seg, 1);
  const int blocks = L.first_block[L.nseg];
  if (blocks == 0) return cudaSuccess;
  ELRA_LAUNCH(blocks, THREADS, 0, stream, fixup_kernel<T>)(
      static_cast<T*>(x), static_cast<const T*>(dp), static_cast<T*>(dn),
      static_cast<const T*>(g), L, scal, coef, static_cast<acc_t<T>>(momentum));
  return cudaGetLastError();
}

// --- collect ------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(THREADS)
    collect_kernel(T* __restrict__ coll, const T* __restrict__ g, int64_t n, double weight,
                   bool first, double* __restrict__ partials) {
  using Acc = acc_t<T>;
  constexpr int N = Pack<T>::N;
  const Acc w = static_cast<Acc>(weight);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * THREADS;
  const int64_t head = head_of(g, n, misalign(g) == misalign(coll));
  const int64_t npacks = (n - head) / N;
  const int64_t tail = head + npacks * N;
  Acc acc = 0;
  auto one = [&](T& c, T gt) {
    const Acc gv = static_cast<Acc>(gt);
    acc += gv * gv;
    c = static_cast<T>((first ? Acc(0) : static_cast<Acc>(c)) + w * gv);
  };
  for (int64_t i = tid; i < head; i += stride) one(coll[i], g[i]);
  for (int64_t j = tid; j < npacks; j += stride) {
    const int64_t i = head + j * N;
    const Pack<T> gp = load_pack_ro(g + i);
    Pack<T> cp{};
    if (!first) cp = load_pack(coll + i);  // with first, coll is only written
#pragma unroll
    for (int l = 0; l < N; ++l) one(cp.v[l], gp.v[l]);
    store_pack(coll + i, cp);
  }
  for (int64_t i = tail + tid; i < n; i += stride) one(coll[i], g[i]);
  double v[1] = {static_cast<double>(acc)};
  block_sum(v);
  if (threadIdx.x == 0) partials[blockIdx.x] = v[0];
}

__global__ void __launch_bounds__(THREADS)
    collect_finish_kernel(const double* __restrict__ partials, int blocks, double inv, bool is_half,
                          double* __restrict__ s) {
  double v[1] = {0.0};
  for (int b = static_cast<int>(threadIdx.x); b < blocks; b += THREADS) v[0] += partials[b];
  block_sum(v);
  if (threadIdx.x == 0) {
    const double gg = v[0] * (inv * inv);  // as the CPU op rounds it
    s[GRAD_SQ] = gg;
    const bool ok = finite(gg) && !(is_half && sqrt(gg) >= HALF_GRAD_NORM_LIMIT);
    s[STATUS] = ok ? ST_OK : ST_BAD_GRADIENT;
  }
}

template <typename T>
cudaError_t collect_typed(void* coll, const void* g, int64_t n, double weight, double inv,
                          bool first, bool is_half, double* scal, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
  const int blocks = blocks_for(n, Pack<T>::N);
  if (workspace_bytes < static_cast<size_t>(blocks) * sizeof(double)) return cudaErrorInvalidValue;
  double* partials = static_cast<double*>(workspace);
  if (blocks > 0) {
    ELRA_LAUNCH(blocks, THREADS, 0, stream, collect_kernel<T>)(
        static_cast<T*>(coll), static_cast<const T*>(g), n, weight, first, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  ELRA_LAUNCH(1, THREADS, 0, stream, collect_finish_kernel)(partials, blocks, inv, is_half, scal);
  return cudaGetLastError();
}

// --- finalize -----------------------------------------------------------------------------------
__global__ void finalize_kernel(const double* __restrict__ red, double* __restrict__ s,
                                double* __restrict__ coef, FinalizeParams p) {
  elra::finalize(red, s, coef, p);
}

// --- update -------------------------------------------------------------------------------------
// Which buffers each mode touches (update_element of elra_math.h):
//   MODE_STEP:              reads x, g (and d with momentum); writes x, d (and xg with a copy)
//   MODE_RETRACE_COPY:      reads xg, d; writes x
//   MODE_RETRACE_ALGEBRAIC: reads x, d; writes x
template <typename T, int MODE>
__device__ __forceinline__ void update_segment(T* __restrict__ x, T* __restrict__ d,
                                               const T* __restrict__ g, T* __restrict__ xg,
                                               const Range& r, acc_t<T> inv, acc_t<T> c,
                                               acc_t<T> b, acc_t<T> s, acc_t<T> t) {
  using Acc = acc_t<T>;
  constexpr int N = Pack<T>::N;
  const bool reads_d = MODE != MODE_STEP || b != Acc(0);
  bool packs = misalign(x) == misalign(d);
  if (MODE == MODE_STEP) packs = packs && misalign(x) == misalign(g);
  if (xg) packs = packs && misalign(x) == misalign(xg);
  const int64_t head = head_of(x, r.n, packs);
  const int64_t npacks = (r.n - head) / N;
  const int64_t tail = head + npacks * N;

  auto one = [&](int64_t i) {
    update_element<T, Acc>(MODE, x[i], d[i], xg ? xg + i : nullptr,
                           MODE == MODE_STEP ? g[i] : T(), inv, c, b, s, t);
  };
  for (int64_t i = r.tid; i < head; i += r.stride) one(i);
  for (int64_t j = r.tid; j < npacks; j += r.stride) {
    const int64_t i = head + j * N;
    Pack<T> xp{}, dp{}, gp{}, cp{};
    if (MODE != MODE_RETRACE_COPY) xp = load_pack(x + i);
    if (reads_d) dp = load_pack(d + i);
    if (MODE == MODE_STEP) gp = load_pack_ro(g + i);
    if (MODE == MODE_RETRACE_COPY) cp = load_pack_ro(xg + i);
    // the step's copy of x is stored here rather than by update_element: the pointer to a pack
    // element would otherwise be null or not at run time, which keeps the packs out of registers
    if (MODE == MODE_STEP && xg) store_pack(xg + i, xp);
#pragma unroll
    for (int l = 0; l < N; ++l)
      update_element<T, Acc>(MODE, xp.v[l], dp.v[l], MODE == MODE_RETRACE_COPY ? &cp.v[l] : nullptr,
                             gp.v[l], inv, c, b, s, t);
    if (MODE == MODE_STEP) store_pack(d + i, dp);
    store_pack(x + i, xp);
  }
  for (int64_t i = tail + r.tid; i < r.n; i += r.stride) one(i);
}

template <typename T>
__global__ void __launch_bounds__(THREADS, UPDATE_MIN_BLOCKS)
    update_kernel(T* __restrict__ x, T* __restrict__ d, const T* __restrict__ g,
                  T* __restrict__ xg, const double* __restrict__ scal,
                  const double* __restrict__ coef, Layout L, double momentum) {
  using Acc = acc_t<T>;
  const int mode = static_cast<int>(scal[MODE]);
  if (mode == MODE_NONE) return;
  // The CPU op raises for a copy retrace without a copy; here the mode is known only on the
  // device, so the kernel leaves x alone instead (the engine never asks for it).
  if (mode == MODE_RETRACE_COPY && xg == nullptr) return;
  const Range r = block_range(L);
  const Acc inv = static_cast<Acc>(scal[INV]), c = static_cast<Acc>(coef[r.k]),
            b = static_cast<Acc>(momentum), s = static_cast<Acc>(scal[MOVE_S]),
            t = static_cast<Acc>(scal[MOVE_T]);
  x += r.base;
  d += r.base;
  g += r.base;
  if (xg) xg += r.base;
  switch (mode) {
    case MODE_STEP:
      update_segment<T, MODE_STEP>(x, d, g, xg, r, inv, c, b, s, t);
      break;
    case MODE_RETRACE_COPY:
      update_segment<T, MODE_RETRACE_COPY>(x, d, g, xg, r, inv, c, b, s, t);
      break;
    case MODE_RETRACE_ALGEBRAIC:
      update_segment<T, MODE_RETRACE_ALGEBRAIC>(x, d, g, xg, r, inv, c, b, s, t);
      break;
    default:  // unknown modes do nothing, as update_element does
      break;
  }
}

template <typename T>
cudaError_t update_typed(void* x, void* d, const void* g, void* xg, const double* scal,
                         const double* coef, const Segments& seg, double momentum,
                         cudaStream_t stream) {
  const Layout L = make_layout(seg, Pack<T>::N);
  const int blocks = L.first_block[L.nseg];
  if (blocks == 0) return cudaSuccess;
  ELRA_LAUNCH(blocks, THREADS, 0, stream, update_kernel<T>)(
      static_cast<T*>(x), static_cast<T*>(d), static_cast<const T*>(g), static_cast<T*>(xg), scal,
      coef, L, momentum);
  return cudaGetLastError();
}

// Calls f with a tag of the element type of dtype: f(Tag<float>{}), ...
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(Tag<float>{});
    case DType::Float64: return f(Tag<double>{});
    case DType::Float16: return f(Tag<half_t>{});
    case DType::BFloat16: return f(Tag<bf16_t>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// --- the launchers (elra_cuda.h) ----------------------------------------------------------------
size_t reduce_workspace_bytes(DType dtype, const Segments& seg) {
  if (!valid(seg)) return 0;
  const Layout L = make_layout(seg, pack_of(dtype));
  return static_cast<size_t>(L.first_block[L.nseg]) * RED_WIDTH * sizeof(double);
}

cudaError_t launch_reduce(DType dtype, const void* g, const void* d, const void* x,
                          const Segments& seg, bool with_x, double* out, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(seg)) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return reduce_typed<T>(g, d, x, seg, with_x, out, workspace, workspace_bytes, stream);
  });
}

cudaError_t launch_step_fused(DType dtype, void* x, const void* dp, void* dn, const void* g,
                              const Segments& seg, const double* scal, const double* wd, int nwd,
                              double inv, double momentum, double step, double* out,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(seg)) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return fused_typed<T>(x, dp, dn, g, seg, scal, wd, nwd, inv, momentum, step, out, workspace,
                          workspace_bytes, stream);
  });
}

cudaError_t launch_fixup(DType dtype, void* x, const void* dp, void* dn, const void* g,
                         const Segments& seg, const double* scal, const double* coef,
                         double momentum, cudaStream_t stream) {
  if (!valid(seg)) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return fixup_typed<T>(x, dp, dn, g, seg, scal, coef, momentum, stream);
  });
}

size_t collect_workspace_bytes(DType dtype, int64_t n) {
  return static_cast<size_t>(blocks_for(n, pack_of(dtype))) * sizeof(double);
}

cudaError_t launch_collect(DType dtype, void* coll, const void* g, int64_t n, double weight,
                           double inv, bool first, bool is_half, double* scal, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return collect_typed<T>(coll, g, n, weight, inv, first, is_half, scal, workspace,
                            workspace_bytes, stream);
  });
}

cudaError_t launch_finalize(const double* red, double* scal, double* coef,
                            const FinalizeParams& p, cudaStream_t stream) {
  if (p.nseg < 0 || p.nseg > MAX_SEGMENTS) return cudaErrorInvalidValue;
  ELRA_LAUNCH(1, 1, 0, stream, finalize_kernel)(red, scal, coef, p);
  return cudaGetLastError();
}

cudaError_t launch_update(DType dtype, void* x, void* d, const void* g, void* xg,
                          const double* scal, const double* coef, const Segments& seg,
                          double momentum, cudaStream_t stream) {
  if (!valid(seg)) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return update_typed<T>(x, d, g, xg, scal, coef, seg, momentum, stream);
  });
}

}  // namespace cuda
}  // namespace elra
