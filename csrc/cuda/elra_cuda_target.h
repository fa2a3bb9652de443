// elra_cuda_target.h: what the torch glue (elra_cuda_glue.cpp) needs of the device it drives.
//
// A CUDA build: CUDA tensors, the current CUDA stream, a device guard, the elra:: ops.
// ELRA_CUDA_EMULATION (the tests' build, tests/cuda_targets.py): the same glue and kernels on the
// CPU emulation of csrc/cuda/emulation, for CPU tensors, registered as the ops of the namespace
// ELRA_TARGET_NAMESPACE (elra_emu), so that the glue under test is the shipped one.
#pragma once

#include <ATen/ATen.h>

#if defined(ELRA_CUDA_EMULATION)

#include <cuda_runtime.h>  // emulation/cuda_runtime.h (first on the include path)

#ifndef ELRA_TARGET_NAMESPACE
#define ELRA_TARGET_NAMESPACE elra_emu
#endif
#define ELRA_TARGET_KEY CPU

namespace elra {
namespace cuda {
inline bool on_target(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* TARGET_NAME = "CPU (CUDA emulation)";
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
}  // namespace cuda
}  // namespace elra

#define ELRA_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    const cudaError_t elra_err_ = (expr);                                                   \
    TORCH_CHECK(elra_err_ == cudaSuccess, "elra: emulated CUDA error: ",                   \
                cudaGetErrorString(elra_err_));                                              \
  } while (0)

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#define ELRA_TARGET_NAMESPACE elra
#define ELRA_TARGET_KEY CUDA

namespace elra {
namespace cuda {
inline bool on_target(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* TARGET_NAME = "CUDA";
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
}  // namespace cuda
}  // namespace elra

#define ELRA_CUDA_CHECK(expr) C10_CUDA_CHECK(expr)

#endif
