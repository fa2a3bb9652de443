// elra_cuda_glue.cpp: the CUDA implementations of the elra:: operators (schemas: ../elra_ops.cpp).
//
// Checks the tensors as the CPU kernels do (plus their device), allocates the reduction
// workspace, and calls the launchers of elra_cuda.cu on the current stream. Nothing here waits
// for the device: bounds and finalize's parameters travel by value in the kernel parameters, the
// mode and step sizes of update are read by the kernel from the scalar tensor.
//
// Built only in a CUDA build (setup.py with a CUDA torch); needs the CUDA headers of torch.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "elra_cuda.h"

namespace elra {

// ../elra_ops.cpp: finalize's parameter list -> FinalizeParams (shared, so both devices parse
// the list the same way).
FinalizeParams make_params(at::ArrayRef<double> params, at::ArrayRef<double> wd);

namespace cuda {
namespace {

// The same checks as in ../elra_ops.cpp (same messages).
void check_flat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "elra: ", name,
              " must be a contiguous 1-d tensor, got shape ", t.sizes());
}

void check_bounds(at::IntArrayRef bounds, int64_t numel) {
  TORCH_CHECK(bounds.size() >= 2, "elra: bounds need at least two entries");
  TORCH_CHECK(static_cast<int>(bounds.size()) - 1 <= MAX_SEGMENTS, "elra: at most ", MAX_SEGMENTS,
              " segments are supported");
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == numel, "elra: bounds must cover [0, ",
              numel, ")");
  for (size_t i = 1; i < bounds.size(); ++i)
    TORCH_CHECK(bounds[i] >= bounds[i - 1], "elra: bounds must be non-decreasing");
}

// All tensors of one call on the same CUDA device (the dispatcher picks this kernel when any of
// them is a CUDA tensor).
void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "elra: ", name, " must be on ", device,
              ", got ", t.device());
}

void check_doubles(const at::Tensor& t, const char* name, int64_t min_numel) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() >= min_numel,
              "elra: ", name, " must be a contiguous float64 tensor of at least ", min_numel,
              " elements");
}

DType dtype_of(const at::Tensor& t) {
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

Segments segments_of(at::IntArrayRef bounds) {
  Segments s{};
  s.nseg = static_cast<int>(bounds.size()) - 1;
  for (size_t i = 0; i < bounds.size(); ++i) s.bound[i] = bounds[i];
  return s;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A device workspace of at least `bytes` (float64 elements; lives until the kernels ran: the
// caching allocator reuses it only for later work on the same stream).
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  const int64_t n = static_cast<int64_t>((bytes + sizeof(double) - 1) / sizeof(double));
  return at::empty({n}, like.options().dtype(at::kDouble));
}

void reduce_cuda(const at::Tensor& g, const at::Tensor& d, const at::Tensor& x,
                 at::IntArrayRef bounds, bool with_x, at::Tensor& out) {
  check_flat(g, "g");
  check_flat(d, "d");
  check_flat(x, "x");
  const at::Device dev = g.device();
  check_device(g, "g", dev);
  check_device(d, "d", dev);
  check_device(x, "x", dev);
  check_device(out, "out", dev);
  TORCH_CHECK(g.scalar_type() == d.scalar_type() && g.scalar_type() == x.scalar_type(),
              "elra: g, d and x must share a dtype");
  TORCH_CHECK(g.numel() == d.numel() && g.numel() == x.numel(), "elra: size mismatch");
  check_bounds(bounds, g.numel());
  const int nseg = static_cast<int>(bounds.size()) - 1;
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() &&
                  out.numel() >= nseg * RED_WIDTH,
              "elra: out must be a contiguous float64 tensor of nseg * 5 elements");
  const DType dt = dtype_of(g);
  const c10::cuda::CUDAGuard guard(dev);
  const Segments seg = segments_of(bounds);
  const size_t bytes = reduce_workspace_bytes(dt, seg);
  at::Tensor work = workspace(bytes, out);
  C10_CUDA_CHECK(launch_reduce(dt, g.data_ptr(), d.data_ptr(), x.data_ptr(), seg, with_x,
                               out.data_ptr<double>(), work.data_ptr(), bytes, stream()));
}

void collect_cuda(at::Tensor& coll, const at::Tensor& g, double weight, double inv, bool first,
                  bool half, at::Tensor& scal) {
  check_flat(coll, "coll");
  check_flat(g, "g");
  const at::Device dev = g.device();
  check_device(coll, "coll", dev);
  check_device(g, "g", dev);
  check_device(scal, "scal", dev);
  TORCH_CHECK(coll.scalar_type() == g.scalar_type() && coll.numel() == g.numel(),
              "elra: collection buffer and gradient differ in dtype or size");
  TORCH_CHECK(scal.scalar_type() == at::kDouble && scal.numel() >= NUM_SLOTS,
              "elra: bad scalar state tensor");
  TORCH_CHECK(scal.is_contiguous(), "elra: the scalar state tensor must be contiguous");
  const DType dt = dtype_of(g);
  const c10::cuda::CUDAGuard guard(dev);
  const size_t bytes = collect_workspace_bytes(dt, g.numel());
  at::Tensor work = workspace(bytes, scal);
  C10_CUDA_CHECK(launch_collect(dt, coll.data_ptr(), g.data_ptr(), g.numel(), weight, inv, first,
                                half, scal.data_ptr<double>(), work.data_ptr(), bytes, stream()));
}

void finalize_cuda(const at::Tensor& red, at::Tensor& scal, at::Tensor& coef,
                   at::ArrayRef<double> params, at::ArrayRef<double> wd) {
  TORCH_CHECK(red.scalar_type() == at::kDouble && scal.scalar_type() == at::kDouble &&
                  coef.scalar_type() == at::kDouble,
              "elra: finalize works on float64 tensors");
  TORCH_CHECK(scal.numel() >= NUM_SLOTS && coef.numel() >= static_cast<int64_t>(wd.size()) &&
                  red.numel() >= static_cast<int64_t>(wd.size()) * RED_WIDTH,
              "elra: finalize tensors too small");
  const at::Device dev = scal.device();
  check_device(red, "red", dev);
  check_device(scal, "scal", dev);
  check_device(coef, "coef", dev);
  TORCH_CHECK(red.is_contiguous() && scal.is_contiguous() && coef.is_contiguous(),
              "elra: finalize needs contiguous tensors");
  const FinalizeParams p = make_params(params, wd);
  const c10::cuda::CUDAGuard guard(dev);
  C10_CUDA_CHECK(launch_finalize(red.data_ptr<double>(), scal.data_ptr<double>(),
                                 coef.data_ptr<double>(), p, stream()));
}

void update_cuda(at::Tensor& x, at::Tensor& d, const at::Tensor& g,
                 const std::optional<at::Tensor>& xg, const at::Tensor& scal,
                 const at::Tensor& coef, at::IntArrayRef bounds, double momentum) {
  check_flat(x, "x");
  check_flat(d, "d");
  check_flat(g, "g");
  const at::Device dev = x.device();
  check_device(x, "x", dev);
  check_device(d, "d", dev);
  check_device(g, "g", dev);
  TORCH_CHECK(x.scalar_type() == d.scalar_type() && x.scalar_type() == g.scalar_type(),
              "elra: x, d and g must share a dtype");
  TORCH_CHECK(x.numel() == d.numel() && x.numel() == g.numel(), "elra: size mismatch");
  check_bounds(bounds, x.numel());
  if (xg.has_value()) {
    check_flat(*xg, "xg");
    check_device(*xg, "xg", dev);
    TORCH_CHECK(xg->numel() == x.numel() && xg->scalar_type() == x.scalar_type(),
                "elra: retrace copy differs from x");
  }
  const int nseg = static_cast<int>(bounds.size()) - 1;
  // The CPU op reads scal[MODE..MOVE_T] and coef[0..nseg) without checking their sizes; here
  // they are read by the kernel, so check them up front.
  check_device(scal, "scal", dev);
  check_device(coef, "coef", dev);
  check_doubles(scal, "scal", NUM_SLOTS);
  check_doubles(coef, "coef", nseg);
  const DType dt = dtype_of(x);
  const c10::cuda::CUDAGuard guard(dev);
  C10_CUDA_CHECK(launch_update(dt, x.data_ptr(), d.data_ptr(), g.data_ptr(),
                               xg.has_value() ? xg->data_ptr() : nullptr,
                               scal.data_ptr<double>(), coef.data_ptr<double>(),
                               segments_of(bounds), momentum, stream()));
}

void check_fused_buffers(const at::Tensor& x, const at::Tensor& dp, const at::Tensor& dn,
                         const at::Tensor& g, const at::Device& dev) {
  check_flat(x, "x");
  check_flat(dp, "d_prev");
  check_flat(dn, "d_new");
  check_flat(g, "g");
  check_device(x, "x", dev);
  check_device(dp, "d_prev", dev);
  check_device(dn, "d_new", dev);
  check_device(g, "g", dev);
  TORCH_CHECK(x.scalar_type() == dp.scalar_type() && x.scalar_type() == dn.scalar_type() &&
                  x.scalar_type() == g.scalar_type(),
              "elra: x, d_prev, d_new and g must share a dtype");
  TORCH_CHECK(x.numel() == dp.numel() && x.numel() == dn.numel() && x.numel() == g.numel(),
              "elra: size mismatch");
}

void step_fused_cuda(at::Tensor& x, const at::Tensor& dp, at::Tensor& dn, const at::Tensor& g,
                     at::IntArrayRef bounds, double inv, double momentum, double step,
                     at::Tensor& out) {
  const at::Device dev = x.device();
  check_fused_buffers(x, dp, dn, g, dev);
  TORCH_CHECK(x.numel() == 0 || (dn.data_ptr() != dp.data_ptr() && dn.data_ptr() != x.data_ptr() &&
                                 dn.data_ptr() != g.data_ptr()),
              "elra: d_new must be a buffer of its own");
  check_bounds(bounds, x.numel());
  check_device(out, "out", dev);
  const int nseg = static_cast<int>(bounds.size()) - 1;
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() &&
                  out.numel() >= nseg * RED_WIDTH,
              "elra: out must be a contiguous float64 tensor of nseg * 5 elements");
  const DType dt = dtype_of(x);
  const c10::cuda::CUDAGuard guard(dev);
  const Segments seg = segments_of(bounds);
  const size_t bytes = reduce_workspace_bytes(dt, seg);
  at::Tensor work = workspace(bytes, out);
  C10_CUDA_CHECK(launch_step_fused(dt, x.data_ptr(), dp.data_ptr(), dn.data_ptr(), g.data_ptr(),
                                   seg, inv, momentum, step, out.data_ptr<double>(),
                                   work.data_ptr(), bytes, stream()));
}

void fixup_cuda(at::Tensor& x, const at::Tensor& dp, at::Tensor& dn, const at::Tensor& g,
                const at::Tensor& scal) {
  const at::Device dev = x.device();
  check_fused_buffers(x, dp, dn, g, dev);
  check_device(scal, "scal", dev);
  check_doubles(scal, "scal", NUM_SLOTS);
  const DType dt = dtype_of(x);
  const c10::cuda::CUDAGuard guard(dev);
  C10_CUDA_CHECK(launch_fixup(dt, x.data_ptr(), dp.data_ptr(), dn.data_ptr(), g.data_ptr(),
                              x.numel(), scal.data_ptr<double>(), stream()));
}

}  // namespace
}  // namespace cuda
}  // namespace elra

TORCH_LIBRARY_IMPL(elra, CUDA, m) {
  m.impl("reduce", &elra::cuda::reduce_cuda);
  m.impl("collect", &elra::cuda::collect_cuda);
  m.impl("finalize", &elra::cuda::finalize_cuda);
  m.impl("update", &elra::cuda::update_cuda);
  m.impl("step_fused", &elra::cuda::step_fused_cuda);
  m.impl("fixup", &elra::cuda::fixup_cuda);
}
