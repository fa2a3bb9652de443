// elra_adam_checks.h: the argument checks of the elra_adam:: ops (ElraAdam), shared by the CPU
// kernels (elra_adam_ops.cpp) and the CUDA glue (cuda/elra_adam_cuda_glue.cpp), with the
// messages of the pure-torch kernels' checks (elra/adam_kernels_torch.py).
#pragma once

#include <ATen/ATen.h>

#include "elra_checks.h"

namespace elra {

// x, m, v, D (and g when given): flat buffers of one dtype, size and device; bounds; one decay
// per segment. Returns the number of segments.
inline int check_adam(const at::Tensor& x, const at::Tensor& m, const at::Tensor& v,
                      const at::Tensor& d, const at::Tensor* g, at::IntArrayRef bounds,
                      at::ArrayRef<double> wd) {
  if (g != nullptr)
    check_buffers({{&x, "x"}, {&m, "m"}, {&v, "v"}, {&d, "drift"}, {g, "g"}});
  else
    check_buffers({{&x, "x"}, {&m, "m"}, {&v, "v"}, {&d, "drift"}});
  const int nseg = check_bounds(bounds, x.numel());
  TORCH_CHECK(wd.size() == static_cast<size_t>(nseg), "elra_adam: wd needs one entry per "
              "segment (", nseg, "), got ", wd.size());
  return nseg;
}

// step's checks: those of check_adam and a float64 out of two elements on the buffers' device.
inline int check_adam_step(const at::Tensor& x, const at::Tensor& m, const at::Tensor& v,
                           const at::Tensor& d, const at::Tensor& g, at::IntArrayRef bounds,
                           at::ArrayRef<double> wd, const at::Tensor& out) {
  const int nseg = check_adam(x, m, v, d, &g, bounds, wd);
  check_on(out, "out", x.device());
  check_doubles(out, "out", 2);
  return nseg;
}

}  // namespace elra
