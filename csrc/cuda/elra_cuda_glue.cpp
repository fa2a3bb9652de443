// elra_cuda_glue.cpp: the CUDA implementations of the elra:: operators (schemas: elra/_ops.py).
//
// Checks the tensors as the CPU kernels do (plus their device), allocates the reduction
// workspace, and calls the launchers of elra_cuda.cu on the current stream. Nothing here waits
// for the device: bounds and finalize's parameters travel by value in the kernel parameters, the
// mode and step sizes of update are read by the kernel from the scalar tensor.
//
// Built in a CUDA build (setup.py with a CUDA torch; needs the CUDA headers of torch), and by
// the tests on the CPU emulation of the kernels: elra_cuda_torch.h says which.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../elra_checks.h"
#include "elra_cuda.h"
#include "elra_cuda_torch.h"

namespace elra {
namespace cuda {
namespace {

void reduce_cuda(const at::Tensor& g, const at::Tensor& d, const at::Tensor& x,
                 at::IntArrayRef bounds, bool with_x, at::Tensor& out) {
  check_reduce(g, d, x, bounds, out);
  check_cuda(g);
  const at::Device dev = g.device();
  const DType dt = dtype_of(g);
  const DeviceGuard guard(dev);
  const Segments seg = segments_of(bounds);
  const size_t bytes = reduce_workspace_bytes(dt, seg);
  at::Tensor work = workspace(bytes, out);
  ELRA_CUDA_CHECK(launch_reduce(dt, g.data_ptr(), d.data_ptr(), x.data_ptr(), seg, with_x,
                               out.data_ptr<double>(), work.data_ptr(), bytes, stream()));
}

void collect_cuda(at::Tensor& coll, const at::Tensor& g, double weight, double inv, bool first,
                  bool half, at::Tensor& scal) {
  check_collect(coll, g, scal);
  check_cuda(g);
  const at::Device dev = g.device();
  const DType dt = dtype_of(g);
  const DeviceGuard guard(dev);
  const size_t bytes = collect_workspace_bytes(dt, g.numel());
  at::Tensor work = workspace(bytes, scal);
  ELRA_CUDA_CHECK(launch_collect(dt, coll.data_ptr(), g.data_ptr(), g.numel(), weight, inv, first,
                                half, scal.data_ptr<double>(), work.data_ptr(), bytes, stream()));
}

void finalize_cuda(const at::Tensor& red, at::Tensor& scal, at::Tensor& coef, int64_t kind,
                   at::ArrayRef<double> wd, double growth, double lr_schedule, double lr_warmup,
                   double inv, double momentum, double f, double f_last, double spec,
                   bool stochastic, bool half, bool keep_copy) {
  const FinalizeParams p = finalize_params(red, scal, coef, kind, wd, growth, lr_schedule,
                                           lr_warmup, inv, momentum, f, f_last, spec, stochastic,
                                           half, keep_copy);
  check_cuda(scal);
  const DeviceGuard guard(scal.device());
  ELRA_CUDA_CHECK(launch_finalize(red.data_ptr<double>(), scal.data_ptr<double>(),
                                 coef.data_ptr<double>(), p, stream()));
}

void update_cuda(at::Tensor& x, at::Tensor& d, const at::Tensor& g,
                 const std::optional<at::Tensor>& xg, const at::Tensor& scal,
                 const at::Tensor& coef, at::IntArrayRef bounds, double momentum) {
  check_update(x, d, g, xg, scal, coef, bounds);
  check_cuda(x);
  const at::Device dev = x.device();
  const DType dt = dtype_of(x);
  const DeviceGuard guard(dev);
  ELRA_CUDA_CHECK(launch_update(dt, x.data_ptr(), d.data_ptr(), g.data_ptr(),
                               xg.has_value() ? xg->data_ptr() : nullptr,
                               scal.data_ptr<double>(), coef.data_ptr<double>(),
                               segments_of(bounds), momentum, stream()));
}

void step_fused_cuda(at::Tensor& x, const at::Tensor& dp, at::Tensor& dn, const at::Tensor& g,
                     const at::Tensor& scal, at::IntArrayRef bounds, double inv, double momentum,
                     double step, at::ArrayRef<double> wd, at::Tensor& out) {
  check_step_fused(x, dp, dn, g, scal, bounds, wd.size(), out);
  check_cuda(x);
  const at::Device dev = x.device();
  const DType dt = dtype_of(x);
  const DeviceGuard guard(dev);
  const Segments seg = segments_of(bounds);
  const size_t bytes = reduce_workspace_bytes(dt, seg);
  at::Tensor work = workspace(bytes, out);
  ELRA_CUDA_CHECK(launch_step_fused(dt, x.data_ptr(), dp.data_ptr(), dn.data_ptr(), g.data_ptr(),
                                   seg, scal.data_ptr<double>(), wd.data(),
                                   static_cast<int>(wd.size()), inv, momentum, step,
                                   out.data_ptr<double>(), work.data_ptr(), bytes, stream()));
}

void fixup_cuda(at::Tensor& x, const at::Tensor& dp, at::Tensor& dn, const at::Tensor& g,
                const at::Tensor& scal, const at::Tensor& coef, at::IntArrayRef bounds,
                double momentum) {
  check_fixup(x, dp, dn, g, scal, coef, bounds);
  check_cuda(x);
  const at::Device dev = x.device();
  const DType dt = dtype_of(x);
  const DeviceGuard guard(dev);
  ELRA_CUDA_CHECK(launch_fixup(dt, x.data_ptr(), dp.data_ptr(), dn.data_ptr(), g.data_ptr(),
                              segments_of(bounds), scal.data_ptr<double>(),
                              coef.data_ptr<double>(), momentum, stream()));
}

}  // namespace
}  // namespace cuda
}  // namespace elra

TORCH_LIBRARY_IMPL(ELRA_TARGET_NAMESPACE, ELRA_TARGET_KEY, m) {
  m.impl("reduce", &elra::cuda::reduce_cuda);
  m.impl("collect", &elra::cuda::collect_cuda);
  m.impl("finalize", &elra::cuda::finalize_cuda);
  m.impl("update", &elra::cuda::update_cuda);
  m.impl("step_fused", &elra::cuda::step_fused_cuda);
  m.impl("fixup", &elra::cuda::fixup_cuda);
}
