// elra_cuda_torch.h: what the torch glue of the CUDA kernels (elra_cuda_glue.cpp,
// elra_adam_cuda_glue.cpp) shares: the device check, dtypes and segments as the launchers take
// them, the current stream and the workspace. Needs the CUDA headers of torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "elra_cuda.h"

namespace elra {
namespace cuda {

// The CUDA kernel of an op runs when any argument is a CUDA tensor; the shared checks
// (../elra_checks.h) then make sure all of them are on that device.
inline void check_cuda(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "elra: expected CUDA tensors, got one on ", t.device());
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

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A device workspace of at least `bytes` (float64 elements; lives until the kernels ran: the
// caching allocator reuses it only for later work on the same stream).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  const int64_t n = static_cast<int64_t>((bytes + sizeof(double) - 1) / sizeof(double));
  return at::empty({n}, like.options().dtype(at::kDouble));
}

}  // namespace cuda
}  // namespace elra
