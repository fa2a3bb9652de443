// elra_adam_cuda.cu: the CUDA kernels of ElraAdam's elra_adam:: ops and their launchers
// (interface and notes: elra_adam_cuda.h). CUDA runtime headers only, no torch: compiles with
// plain nvcc. Each segment is walked by a grid-stride loop of its own blocks; the math per
// element is that of the CPU kernels (csrc/elra_adam_ops.cpp) in the opmath type.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elra_adam_cuda.h"

namespace elra {
namespace cuda {
namespace {

constexpr int ADAM_THREADS = 256;
constexpr int ADAM_WARPS = ADAM_THREADS / 32;
constexpr int ADAM_ELEMS_PER_THREAD = 8;  // at least, before a segment gets another block
constexpr int ADAM_MAX_BLOCKS = 1024;     // per segment

// Conversions to and from the opmath type (float for the half types).
template <typename T>
struct Op {
  using acc = T;
  __device__ static T load(T v) { return v; }
  __device__ static T store(T v) { return v; }
};
template <>
struct Op<__half> {
  using acc = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Op<__nv_bfloat16> {
  using acc = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Per segment: its bounds, its first block and its decay keep = 1 - alpha wd (by value).
struct AdamLayout {
  int nseg;
  int first_block[MAX_SEGMENTS + 1];
  long long bound[MAX_SEGMENTS + 1];
  double keep[MAX_SEGMENTS];
};

int blocks_for(long long n) {
  if (n <= 0) return 0;
  const long long per = static_cast<long long>(ADAM_THREADS) * ADAM_ELEMS_PER_THREAD;
  const long long nb = (n + per - 1) / per;
  return static_cast<int>(nb < ADAM_MAX_BLOCKS ? nb : ADAM_MAX_BLOCKS);
}

bool make_layout(const Segments& s, const double* wd, double alpha, AdamLayout* L) {
  if (s.nseg < 1 || s.nseg > MAX_SEGMENTS || s.bound[0] != 0) return false;
  L->nseg = s.nseg;
  int total = 0;
  for (int k = 0; k < s.nseg; ++k) {
    if (s.bound[k + 1] < s.bound[k]) return false;
    L->first_block[k] = total;
    L->bound[k] = s.bound[k];
    L->keep[k] = 1.0 - alpha * wd[k];
    total += blocks_for(s.bound[k + 1] - s.bound[k]);
  }
  L->first_block[s.nseg] = total;
  L->bound[s.nseg] = s.bound[s.nseg];
  return true;
}

// This block's segment, first element, length, thread index and stride within the segment.
struct Range {
  int k;
  long long base, n, tid, stride;
};

__device__ __forceinline__ Range block_range(const AdamLayout& L) {
  const int b = static_cast<int>(blockIdx.x);
  int k = 0;
  while (k + 1 < L.nseg && L.first_block[k + 1] <= b) ++k;
  Range r;
  r.k = k;
  r.base = L.bound[k];
  r.n = L.bound[k + 1] - r.base;
  r.tid = static_cast<long long>(b - L.first_block[k]) * ADAM_THREADS + threadIdx.x;
  r.stride = static_cast<long long>(L.first_block[k + 1] - L.first_block[k]) * ADAM_THREADS;
  return r;
}

// Sums v[0..1] over the block in a fixed order (valid in thread 0); ends with a barrier.
__device__ __forceinline__ void block_sum2(double (&v)[2]) {
  __shared__ double sh[2][ADAM_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int c = 0; c < 2; ++c)
    for (int off = 16; off > 0; off >>= 1) v[c] += __shfl_down_sync(0xffffffffu, v[c], off);
  if (lane == 0)
    for (int c = 0; c < 2; ++c) sh[c][warp] = v[c];
  __syncthreads();
  if (warp == 0)
    for (int c = 0; c < 2; ++c) {
      v[c] = lane < ADAM_WARPS ? sh[c][lane] : 0.0;
      for (int off = 16; off > 0; off >>= 1) v[c] += __shfl_down_sync(0xffffffffu, v[c], off);
    }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(ADAM_THREADS)
    adam_step_kernel(T* __restrict__ x, T* __restrict__ m, T* __restrict__ v,
                     T* __restrict__ d, const T* __restrict__ g, AdamLayout L, AdamCoefs c,
                     double* __restrict__ partials) {
  using A = typename Op<T>::acc;
  const Range r = block_range(L);
  const A a = static_cast<A>(c.alpha), keep = static_cast<A>(L.keep[r.k]);
  const A w1 = static_cast<A>(1.0 - c.beta1), b2 = static_cast<A>(c.beta2);
  const A w2 = static_cast<A>(1.0 - c.beta2), isb2 = static_cast<A>(1.0 / sqrt(c.bc2));
  const A eps = static_cast<A>(c.eps), ibc1 = static_cast<A>(1.0 / c.bc1);
  const A ba = static_cast<A>(c.beta_a);
  A gd = 0, gn = 0;
  for (long long j = r.tid; j < r.n; j += r.stride) {
    const long long i = r.base + j;
    const A gv = Op<T>::load(g[i]), dv = Op<T>::load(d[i]);
    const A mv = Op<T>::load(m[i]), vv = Op<T>::load(v[i]);
    gd += gv * dv;
    const A mn = mv + w1 * (gv - mv);
    const A vn = vv * b2 + w2 * gv * gv;
    const A rr = A(1) / (sqrt(vn) * isb2 + eps);
    gn += gv * rr * gv;
    const A au = a * (mn * rr * ibc1);
    if (gv - gv == A(0)) {  // g finite
      x[i] = Op<T>::store(Op<T>::load(x[i]) * keep - au);
      m[i] = Op<T>::store(mn);
      v[i] = Op<T>::store(vn);
      d[i] = Op<T>::store(dv * ba - au);
    }
  }
  double s[2] = {static_cast<double>(gd), static_cast<double>(gn)};
  block_sum2(s);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = s[0];
    partials[2 * blockIdx.x + 1] = s[1];
  }
}

// One block: out[0..1] = the sums of all partials, in a fixed order.
__global__ void __launch_bounds__(ADAM_THREADS)
    adam_finish_kernel(const double* __restrict__ partials, int nblocks,
                       double* __restrict__ out) {
  double s[2] = {0.0, 0.0};
  for (int b = threadIdx.x; b < nblocks; b += ADAM_THREADS) {
    s[0] += partials[2 * b];
    s[1] += partials[2 * b + 1];
  }
  block_sum2(s);
  if (threadIdx.x == 0) {
    out[0] = s[0];
    out[1] = s[1];
  }
}

template <typename T>
__global__ void __launch_bounds__(ADAM_THREADS)
    adam_undo_kernel(T* __restrict__ x, T* __restrict__ m, T* __restrict__ v,
                     T* __restrict__ d, const T* __restrict__ g, AdamLayout L, AdamCoefs c) {
  using A = typename Op<T>::acc;
  const Range r = block_range(L);
  const A a = static_cast<A>(c.alpha), keep = static_cast<A>(L.keep[r.k]);
  const A w1 = static_cast<A>(1.0 - c.beta1), b1 = static_cast<A>(c.beta1);
  const A w2 = static_cast<A>(1.0 - c.beta2), b2 = static_cast<A>(c.beta2);
  const A isb2 = static_cast<A>(1.0 / sqrt(c.bc2)), eps = static_cast<A>(c.eps);
  const A ibc1 = static_cast<A>(1.0 / c.bc1), ba = static_cast<A>(c.beta_a);
  for (long long j = r.tid; j < r.n; j += r.stride) {
    const long long i = r.base + j;
    A gv = 0;
    if (g != nullptr) {
      gv = Op<T>::load(g[i]);
      if (!(gv - gv == A(0))) continue;
    }
    const A mv = Op<T>::load(m[i]), vv = Op<T>::load(v[i]);
    const A au = a * (mv * (A(1) / (sqrt(vv) * isb2 + eps)) * ibc1);
    x[i] = Op<T>::store((Op<T>::load(x[i]) + au) / keep);
    d[i] = Op<T>::store((Op<T>::load(d[i]) + au) / ba);
    if (g != nullptr) {
      m[i] = Op<T>::store((mv - w1 * gv) / b1);
      const A vo = (vv - w2 * gv * gv) / b2;
      v[i] = Op<T>::store(vo > A(0) ? vo : A(0));
    }
  }
}

template <typename T>
cudaError_t step_as(void* x, void* m, void* v, void* d, const void* g, const AdamLayout& L,
                    const AdamCoefs& c, double* out, void* workspace, cudaStream_t stream) {
  const int blocks = L.first_block[L.nseg];
  double* partials = static_cast<double*>(workspace);
  if (blocks > 0) {
    adam_step_kernel<T><<<blocks, ADAM_THREADS, 0, stream>>>(
        static_cast<T*>(x), static_cast<T*>(m), static_cast<T*>(v), static_cast<T*>(d),
        static_cast<const T*>(g), L, c, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  adam_finish_kernel<<<1, ADAM_THREADS, 0, stream>>>(partials, blocks, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t undo_as(void* x, void* m, void* v, void* d, const void* g, const AdamLayout& L,
                    const AdamCoefs& c, cudaStream_t stream) {
  const int blocks = L.first_block[L.nseg];
  if (blocks == 0) return cudaSuccess;
  adam_undo_kernel<T><<<blocks, ADAM_THREADS, 0, stream>>>(
      static_cast<T*>(x), static_cast<T*>(m), static_cast<T*>(v), static_cast<T*>(d),
      static_cast<const T*>(g), L, c);
  return cudaGetLastError();
}

}  // namespace

size_t adam_workspace_bytes(DType, const Segments& seg) {
  size_t blocks = 0;
  for (int k = 0; k < seg.nseg; ++k) blocks += blocks_for(seg.bound[k + 1] - seg.bound[k]);
  return blocks * 2 * sizeof(double);
}

cudaError_t launch_adam_step(DType dtype, void* x, void* m, void* v, void* d, const void* g,
                             const Segments& seg, const double* wd, const AdamCoefs& c,
                             double* out, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  AdamLayout L{};
  if (!make_layout(seg, wd, c.alpha, &L) || workspace_bytes < adam_workspace_bytes(dtype, seg))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float32: return step_as<float>(x, m, v, d, g, L, c, out, workspace, stream);
    case DType::Float64: return step_as<double>(x, m, v, d, g, L, c, out, workspace, stream);
    case DType::Float16: return step_as<__half>(x, m, v, d, g, L, c, out, workspace, stream);
    case DType::BFloat16:
      return step_as<__nv_bfloat16>(x, m, v, d, g, L, c, out, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_adam_undo(DType dtype, void* x, void* m, void* v, void* d, const void* g,
                             const Segments& seg, const double* wd, const AdamCoefs& c,
                             cudaStream_t stream) {
  AdamLayout L{};
  if (!make_layout(seg, wd, c.alpha, &L)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float32: return undo_as<float>(x, m, v, d, g, L, c, stream);
    case DType::Float64: return undo_as<double>(x, m, v, d, g, L, c, stream);
    case DType::Float16: return undo_as<__half>(x, m, v, d, g, L, c, stream);
    case DType::BFloat16: return undo_as<__nv_bfloat16>(x, m, v, d, g, L, c, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace elra
