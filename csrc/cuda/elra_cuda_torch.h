// elra_cuda_torch.h: what the torch glue of the CUDA kernels (elra_cuda_glue.cpp,
// elra_adam_cuda_glue.cpp) shares: the device check, dtypes and segments as the launchers take
// them, the current stream, a device guard, the launch check and the workspace.
//
// Two targets. A CUDA build (needs the CUDA headers of torch): CUDA tensors, the current CUDA
// stream, the ops of the elra:: namespace. ELRA_CUDA_EMULATION (the tests' build,
// tests/cuda_targets.py): the same glue and kernels on the CPU emulation of csrc/cuda/emulation,
// for CPU tensors, registered as the ops of ELRA_TARGET_NAMESPACE (elra_emu::), so that the
// glue under test is the shipped one.
#pragma once

#include <ATen/ATen.h>

#include "elra_cuda.h"

#if defined(ELRA_CUDA_EMULATION)

#ifndef ELRA_TARGET_NAMESPACE
#define ELRA_TARGET_NAMESPACE elra_emu
#endif
#define ELRA_TARGET_KEY CPU
#define ELRA_CUDA_CHECK(expr)                                                                \
  do {                                                                                        \
    const cudaError_t elra_err_ = (expr);                                                     \
    TORCH_CHECK(elra_err_ == cudaSuccess, "elra: emulated CUDA error: ",                     \
                cudaGetErrorString(elra_err_));                                                \
  } while (0)

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define ELRA_TARGET_NAMESPACE elra
#define ELRA_TARGET_KEY CUDA
#define ELRA_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)

#endif

namespace elra {
namespace cuda {

#if defined(ELRA_CUDA_EMULATION)
inline bool on_target(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* TARGET_NAME = "CPU (CUDA emulation)";
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
inline cudaStream_t stream() { return nullptr; }
#else
inline bool on_target(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* TARGET_NAME = "CUDA";
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// The CUDA kernel of an op runs when any argument is a CUDA tensor; the shared checks
// (../elra_checks.h) then make sure all of them are on that device.
inline void check_cuda(const at::Tensor& t) {
  TORCH_CHECK(on_target(t), "elra: expected ", TARGET_NAME, " tensors, got one on ", t.device());
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: break;
  }
  TORCH_CHECK(false, "elra: no CUDA kernel for dtype ", t.scalar_type(),
              " (float32, float64, float16 and bfloat16 are supported)");
  return DType::Float32;  // not reached
}

inline Segments segments_of(at::IntArrayRef bounds) {
  Segments s{};
  s.nseg = static_cast<int>(bounds.size()) - 1;
  for (size_t i = 0; i < bounds.size(); ++i) s.bound[i] = bounds[i];
  return s;
}

// A device workspace of at least `bytes` (float64 elements; lives until the kernels ran: the
// caching allocator reuses it only for later work on the same stream).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  const int64_t n = static_cast<int64_t>((bytes + sizeof(double) - 1) / sizeof(double));
  return at::empty({n}, like.options().dtype(at::kDouble));
}

}  // namespace cuda
}  // namespace elra
