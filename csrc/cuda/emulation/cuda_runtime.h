// cuda_runtime.h (emulation): the part of the CUDA runtime that elra_cuda.cu uses, executed on
// the CPU, so that the host compiler builds the unchanged kernels and the tests run them.
//
// Put this folder first on the include path (-I csrc/cuda/emulation) and compile elra_cuda.cu
// as C++ (g++ -x c++, or a .cpp that includes it), with emu_runtime.cpp. Not for production:
// nothing here is fast, it is for tests only (tests/cuda_targets.py builds it).
//
// [note: the emulated execution model]
// A launch runs its blocks one after another, in order. The threads of a block are fibers
// (cooperative user-space threads, emu_runtime.cpp) on the calling thread: each runs until it
// reaches __syncthreads() or a warp shuffle, then another one runs (warp by warp, see
// [note: schedule] in emu_runtime.cpp). __syncthreads() waits for
// all threads of the block, a shuffle for the 32 lanes of its warp (both report a deadlock, as a
// launch error, when some threads can never arrive: a barrier in divergent code). __shared__
// variables are function statics: one copy that every block reuses (blocks do not overlap).
// Launches are serialized by a global lock; streams are ignored (everything is synchronous).
// Under ThreadSanitizer the fibers are announced as threads that synchronize only at the
// barriers, so a missing __syncthreads() shows as a data race (emu_runtime.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// --- the CUDA keywords ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace elra_emu {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaDeviceSynchronize();
const char* cudaGetErrorString(cudaError_t e);

namespace detail {

// What the current fiber (a thread of the running block) sees.
struct ThreadCtx {
  uint3 thread_idx;
  unsigned shfl_parity = 0;  // which of the two exchange slots of its warp the next shuffle uses
};
struct LaunchCtx {
  uint3 block_idx;
  dim3 grid_dim, block_dim;
};
// (atomic: written by the scheduler, read by the fibers, which TSan sees as threads)
extern thread_local std::atomic<ThreadCtx*> current_thread;
inline ThreadCtx* thread_ctx() { return current_thread.load(std::memory_order_relaxed); }
extern LaunchCtx launch_ctx;

// Runs body(thread) for every thread of every block (see the note above); returns the status.
using Body = void (*)(void* closure);
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, Body body, void* closure);

void sync_block();
// Lanes put 8 bytes each into the warp's exchange slot, wait for the warp, read lane `src`.
uint64_t warp_exchange(unsigned mask, uint64_t bits, int src_lane, bool in_range);
void fail(cudaError_t e, const char* why);

template <typename T>
T shfl(unsigned mask, T v, int src, bool in_range) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(mask, bits, src, in_range);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned lane_id() { return thread_ctx()->thread_idx.x & 31u; }

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  cudaError_t operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with a wrong argument count");
    // the parameters are copied once, converted to the kernel's types, as a launch does
    struct Closure {
      void (*kernel)(P...);
      std::tuple<typename std::decay<P>::type...> params;
    } c{kernel, std::tuple<typename std::decay<P>::type...>(std::forward<A>(args)...)};
    return run_grid(grid, block, smem, [](void* p) {
      auto* cl = static_cast<Closure*>(p);
      std::apply(cl->kernel, cl->params);  // every thread gets the same parameters
    }, &c);
  }
};

}  // namespace detail

template <typename... P>
detail::Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                            cudaStream_t) {
  return detail::Launch<P...>{kernel, grid, block, smem};
}

// --- built-in variables and functions ------------------------------------------------------------
#define threadIdx (::elra_emu::detail::thread_ctx()->thread_idx)
#define blockIdx (::elra_emu::detail::launch_ctx.block_idx)
#define blockDim (::elra_emu::detail::launch_ctx.block_dim)
#define gridDim (::elra_emu::detail::launch_ctx.grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { detail::sync_block(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = static_cast<int>(detail::lane_id());
  const int base = lane & ~(width - 1);
  return detail::shfl(mask, v, base + (src & (width - 1)), true);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(detail::lane_id());
  const int src = lane + static_cast<int>(delta);
  return detail::shfl(mask, v, src, (src & ~(width - 1)) == (lane & ~(width - 1)));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(detail::lane_id());
  const int src = lane - static_cast<int>(delta);
  return detail::shfl(mask, v, src, src >= (lane & ~(width - 1)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(detail::lane_id());
  const int src = lane ^ lane_mask;
  return detail::shfl(mask, v, src, (src & ~(width - 1)) == (lane & ~(width - 1)));
}

// Loads and stores with cache hints: plain accesses here, after the alignment check of a GPU
// (a misaligned vector access is a launch error there, cudaErrorMisalignedAddress).
namespace detail {
template <typename T>
bool aligned(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) == 0) return true;
  fail(cudaErrorMisalignedAddress, "misaligned address (a vector access off its alignment)");
  return false;
}
}  // namespace detail
template <typename T>
T __ldg(const T* p) { return detail::aligned(p) ? *p : T{}; }
template <typename T>
T __ldca(const T* p) { return detail::aligned(p) ? *p : T{}; }
template <typename T>
void __stwb(T* p, T v) {
  if (detail::aligned(p)) *p = v;
}

// Atomics: the threads of a block never run at the same time, so a plain update is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

}  // namespace elra_emu

using elra_emu::cudaError_t;
using elra_emu::cudaStream_t;
using elra_emu::dim3;
using elra_emu::uint3;
using elra_emu::uint4;
using elra_emu::cudaSuccess;
using elra_emu::cudaErrorInvalidValue;
using elra_emu::cudaErrorInvalidConfiguration;
using elra_emu::cudaErrorMisalignedAddress;
using elra_emu::cudaErrorLaunchFailure;
using elra_emu::cudaGetLastError;
using elra_emu::cudaPeekAtLastError;
using elra_emu::cudaDeviceSynchronize;
using elra_emu::cudaGetErrorString;
using elra_emu::warpSize;
using elra_emu::__syncthreads;
using elra_emu::__shfl_sync;
using elra_emu::__shfl_down_sync;
using elra_emu::__shfl_up_sync;
using elra_emu::__shfl_xor_sync;
using elra_emu::__ldg;
using elra_emu::__ldca;
using elra_emu::__stwb;
using elra_emu::atomicAdd;

// The kernel launch of elra_cuda.h: `ELRA_LAUNCH(grid, block, smem, stream, kernel)(args...)`.
#define ELRA_LAUNCH(grid, block, smem, stream, ...) \
  ::elra_emu::launch(__VA_ARGS__, grid, block, smem, stream)
