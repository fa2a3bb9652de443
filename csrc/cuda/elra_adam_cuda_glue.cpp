// elra_adam_cuda_glue.cpp: the CUDA implementations of ElraAdam's elra_adam:: operators
// (schemas: elra/adam_ops.py). Checks the tensors as the CPU kernels do (../elra_adam_checks.h),
// allocates the reduction workspace and calls the launchers of elra_adam_cuda.cu on the current
// stream; nothing here waits for the device (the host reads the two sums afterwards).
//
// Built only in a CUDA build (setup.py with a CUDA torch); needs the CUDA headers of torch.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../elra_adam_checks.h"
#include "elra_adam_cuda.h"
#include "elra_cuda_torch.h"

namespace elra {
namespace cuda {
namespace {

AdamCoefs coefs(double alpha, double bc1, double bc2, double beta1, double beta2, double eps,
                double beta_a) {
  return AdamCoefs{alpha, bc1, bc2, beta1, beta2, eps, beta_a};
}

void adam_step_cuda(at::Tensor& x, at::Tensor& m, at::Tensor& v, at::Tensor& d,
                    const at::Tensor& g, at::IntArrayRef bounds, at::ArrayRef<double> wd,
                    double alpha, double bc1, double bc2, double beta1, double beta2, double eps,
                    double beta_a, at::Tensor& out) {
  check_adam_step(x, m, v, d, g, bounds, wd, out);
  check_cuda(x);
  const DType dt = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const Segments seg = segments_of(bounds);
  const size_t bytes = adam_workspace_bytes(dt, seg);
  at::Tensor work = workspace(bytes, out);
  C10_CUDA_CHECK(launch_adam_step(dt, x.data_ptr(), m.data_ptr(), v.data_ptr(), d.data_ptr(),
                                  g.data_ptr(), seg, wd.data(),
                                  coefs(alpha, bc1, bc2, beta1, beta2, eps, beta_a),
                                  out.data_ptr<double>(), work.data_ptr(), bytes, stream()));
}

void adam_undo_cuda(at::Tensor& x, at::Tensor& m, at::Tensor& v, at::Tensor& d,
                    const std::optional<at::Tensor>& g, at::IntArrayRef bounds,
                    at::ArrayRef<double> wd, double alpha, double bc1, double bc2, double beta1,
                    double beta2, double eps, double beta_a) {
  check_adam(x, m, v, d, g.has_value() ? &*g : nullptr, bounds, wd);
  check_cuda(x);
  const DType dt = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  C10_CUDA_CHECK(launch_adam_undo(dt, x.data_ptr(), m.data_ptr(), v.data_ptr(), d.data_ptr(),
                                  g.has_value() ? g->data_ptr() : nullptr, segments_of(bounds),
                                  wd.data(), coefs(alpha, bc1, bc2, beta1, beta2, eps, beta_a),
                                  stream()));
}

}  // namespace
}  // namespace cuda
}  // namespace elra

TORCH_LIBRARY_IMPL(elra_adam, CUDA, m) {
  m.impl("step", &elra::cuda::adam_step_cuda);
  m.impl("undo", &elra::cuda::adam_undo_cuda);
}
