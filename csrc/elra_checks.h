// elra_checks.h: the argument checks of the elra:: ops, shared by the CPU kernels (elra_ops.cpp)
// and the CUDA glue (cuda/elra_cuda_glue.cpp), so that both devices accept the same calls and
// reject bad ones with the same messages. Every tensor of a call must be on one device.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "elra_math.h"

namespace elra {

inline void check_flat(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "elra: ", name,
              " must be a contiguous 1-d tensor, got shape ", t.sizes());
}

inline void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "elra: ", name, " must be on ", device, ", got ", t.device());
}

inline void check_doubles(const at::Tensor& t, const char* name, int64_t min_numel) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() >= min_numel,
              "elra: ", name, " must be a contiguous float64 tensor of at least ", min_numel,
              " elements");
}

inline int check_bounds(at::IntArrayRef bounds, int64_t numel) {
  TORCH_CHECK(bounds.size() >= 2, "elra: bounds need at least two entries");
  TORCH_CHECK(static_cast<int>(bounds.size()) - 1 <= MAX_SEGMENTS, "elra: at most ", MAX_SEGMENTS,
              " segments are supported");
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == numel, "elra: bounds must cover [0, ",
              numel, ")");
  for (size_t i = 1; i < bounds.size(); ++i)
    TORCH_CHECK(bounds[i] >= bounds[i - 1], "elra: bounds must be non-decreasing");
  return static_cast<int>(bounds.size()) - 1;
}

// Flat buffers of one dtype and size, all on the device of the first.
inline void check_buffers(std::initializer_list<std::pair<const at::Tensor*, const char*>> ts) {
  const at::Tensor& first = *ts.begin()->first;
  for (const auto& [t, name] : ts) {
    check_flat(*t, name);
    check_on(*t, name, first.device());
    TORCH_CHECK(t->scalar_type() == first.scalar_type(), "elra: ", name, " has dtype ",
                t->scalar_type(), ", ", ts.begin()->second, " has ", first.scalar_type(),
                ": the buffers must share a dtype");
    TORCH_CHECK(t->numel() == first.numel(), "elra: size mismatch: ", name, " has ", t->numel(),
                " elements, ", ts.begin()->second, " has ", first.numel());
  }
}

inline void check_out(const at::Tensor& out, int nseg, const at::Device& device) {
  check_on(out, "out", device);
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() &&
                  out.numel() >= nseg * RED_WIDTH,
              "elra: out must be a contiguous float64 tensor of nseg * 5 elements");
}

// --- per op; the ones with segments return their number ---------------------------------------
inline int check_reduce(const at::Tensor& g, const at::Tensor& d, const at::Tensor& x,
                        at::IntArrayRef bounds, const at::Tensor& out) {
  check_buffers({{&g, "g"}, {&d, "d"}, {&x, "x"}});
  const int nseg = check_bounds(bounds, g.numel());
  check_out(out, nseg, g.device());
  return nseg;
}

inline void check_collect(const at::Tensor& coll, const at::Tensor& g, const at::Tensor& scal) {
  check_buffers({{&coll, "coll"}, {&g, "g"}});
  check_on(scal, "scal", g.device());
  check_doubles(scal, "scal", NUM_SLOTS);
}

// finalize's checks, and its named arguments as the FinalizeParams of elra_math.h (shared, so
// that both devices read a call the same way). The number of segments is that of `red`'s rows;
// `wd` has one entry per segment, or none for no weight decay.
inline FinalizeParams finalize_params(const at::Tensor& red, const at::Tensor& scal,
                                      const at::Tensor& coef, int64_t kind,
                                      at::ArrayRef<double> wd, double growth, double lr_schedule,
                                      double lr_warmup, double inv, double momentum, double f,
                                      double f_last, double spec, bool stochastic, bool half,
                                      bool keep_copy) {
  check_on(red, "red", scal.device());
  check_on(coef, "coef", scal.device());
  check_doubles(scal, "scal", NUM_SLOTS);
  TORCH_CHECK(red.scalar_type() == at::kDouble && red.dim() == 1 && red.is_contiguous() &&
                  red.numel() > 0 && red.numel() % RED_WIDTH == 0 &&
                  red.numel() <= static_cast<int64_t>(MAX_SEGMENTS) * RED_WIDTH,
              "elra: red must be a contiguous float64 tensor of nseg * ", RED_WIDTH,
              " elements (1 <= nseg <= ", MAX_SEGMENTS, "), got ", red.numel());
  const int nseg = static_cast<int>(red.numel() / RED_WIDTH);
  check_doubles(coef, "coef", nseg);
  TORCH_CHECK(wd.empty() || wd.size() == static_cast<size_t>(nseg), "elra: wd needs one entry "
              "per segment (or none), got ", wd.size(), " for ", nseg, " segments");
  TORCH_CHECK(kind >= KIND_FIRST && kind <= KIND_ACCEPT_FUSED, "elra: unknown kind ", kind);
  FinalizeParams p{};
  p.growth = growth;
  p.lr_schedule = lr_schedule;
  p.lr_warmup = lr_warmup;
  p.inv = inv;
  p.momentum = momentum;
  p.f = f;
  p.f_last = f_last;
  p.stochastic = stochastic;
  p.kind = static_cast<int>(kind);
  p.with_x = !wd.empty();
  p.half = half;
  p.keep_copy = keep_copy;
  p.spec = spec;
  p.nseg = nseg;
  for (int k = 0; k < nseg; ++k) p.wd[k] = wd.empty() ? 0.0 : wd[k];
  return p;
}

// The scalar slots and the per-segment coefficients of update and fixup; returns ``nseg``.
inline int check_scal_coef(const at::Tensor& scal, const at::Tensor& coef, int nseg,
                           at::Device device) {
  check_on(scal, "scal", device);
  check_on(coef, "coef", device);
  check_doubles(scal, "scal", NUM_SLOTS);
  check_doubles(coef, "coef", nseg);
  return nseg;
}

inline int check_update(const at::Tensor& x, const at::Tensor& d, const at::Tensor& g,
                        const std::optional<at::Tensor>& xg, const at::Tensor& scal,
                        const at::Tensor& coef, at::IntArrayRef bounds) {
  if (xg.has_value())
    check_buffers({{&x, "x"}, {&d, "d"}, {&g, "g"}, {&*xg, "xg"}});
  else
    check_buffers({{&x, "x"}, {&d, "d"}, {&g, "g"}});
  return check_scal_coef(scal, coef, check_bounds(bounds, x.numel()), x.device());
}

inline int check_step_fused(const at::Tensor& x, const at::Tensor& dp, const at::Tensor& dn,
                            const at::Tensor& g, const at::Tensor& scal, at::IntArrayRef bounds,
                            size_t nwd, const at::Tensor& out) {
  check_buffers({{&x, "x"}, {&dp, "d_prev"}, {&dn, "d_new"}, {&g, "g"}});
  TORCH_CHECK(x.numel() == 0 || (dn.data_ptr() != dp.data_ptr() && dn.data_ptr() != x.data_ptr() &&
                                 dn.data_ptr() != g.data_ptr()),
              "elra: d_new must be a buffer of its own");
  const int nseg = check_bounds(bounds, x.numel());
  TORCH_CHECK(nwd == 0 || nwd == static_cast<size_t>(nseg), "elra: wd needs one entry per "
              "segment (or none), got ", nwd, " for ", nseg, " segments");
  check_on(scal, "scal", x.device());
  check_doubles(scal, "scal", NUM_SLOTS);
  check_out(out, nseg, x.device());
  return nseg;
}

inline int check_fixup(const at::Tensor& x, const at::Tensor& dp, const at::Tensor& dn,
                       const at::Tensor& g, const at::Tensor& scal, const at::Tensor& coef,
                       at::IntArrayRef bounds) {
  check_buffers({{&x, "x"}, {&dp, "d_prev"}, {&dn, "d_new"}, {&g, "g"}});
  return check_scal_coef(scal, coef, check_bounds(bounds, x.numel()), x.device());
}

}  // namespace elra
