// elra_cuda.h: the host interface of the CUDA kernels (elra_cuda.cu), free of torch headers.
//
// elra_cuda.cu compiles with nothing but nvcc (no torch, ATen or c10 headers); the torch glue
// (elra_cuda_glue.cpp) checks the tensors and calls these launchers with raw device pointers.
// Every launcher only enqueues work on `stream` (no host synchronization, no allocation) and
// returns the launch status (cudaGetLastError() after its launches).
//
// [note: segments]
// A flat buffer is split into parameter-group segments [bound[k], bound[k+1]), at most
// MAX_SEGMENTS of them. The bounds reach the kernels by value (inside the kernel parameters), so
// neither a host-to-device copy nor a sync is needed; per-segment decay coefficients are read
// by the update kernel from the device tensor that finalize wrote.
//
// [note: deterministic reductions]
// reduce and collect sum in two launches: each block of the first writes its sums (per thread in
// the opmath type, across the block in double, in a fixed shuffle/shared-memory order) into a
// workspace of per-block partials; a single block then adds the partials of each segment in a
// fixed order in double. The block layout depends only on the segment sizes and the dtype, so
// the results do not change from run to run (nor between GPUs).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../elra_math.h"

// Every kernel launch of elra_cuda.cu: ELRA_LAUNCH(grid, block, smem, stream, kernel)(args...)
// is kernel<<<grid, block, smem, stream>>>(args...) for nvcc. The CPU emulation of the tests
// (emulation/cuda_runtime.h, first on their include path) defines it as a call of its launcher.
#ifndef ELRA_LAUNCH
#define ELRA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace elra {
namespace cuda {

// Element types of the flat buffers (float, double, __half, __nv_bfloat16).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Segment bounds, by value: bound[0] = 0 <= bound[1] <= ... <= bound[nseg] = numel.
struct Segments {
  int nseg;
  int64_t bound[MAX_SEGMENTS + 1];
};

// Bytes of the per-block partials workspace that launch_reduce needs (0 when all segments are
// empty). The caller allocates it on the device; it must stay valid until the kernels ran (the
// caching allocator of torch guarantees that for allocations used on the current stream).
size_t reduce_workspace_bytes(DType dtype, const Segments& seg);

// out[5k .. 5k+4] = <g,d>, |g|^2, <x,d>, <g,x>, |x|^2 over segment k (the x terms are 0 unless
// with_x; x is not read then). out holds at least 5 * nseg doubles.
cudaError_t launch_reduce(DType dtype, const void* g, const void* d, const void* x,
                          const Segments& seg, bool with_x, double* out, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream);

// One pass of a normal stochastic step (elra_math.h, [note: the one-pass stochastic step]):
// out[5k .. 5k+4] = <g, d_prev>, |g|^2 (and with weight decay <x, d_prev>, <g, x>, |x|^2, else 0)
// over segment k, d_new <- momentum d_prev + (1 - momentum)(inv g + c_k x) with
// c_k = wd[k] spec_kappa(scal) (nwd = 0: no decay; else nwd = nseg, wd on the host),
// x <- x - step d_new where g is finite. The workspace is that of launch_reduce
// (reduce_workspace_bytes). d_new must not overlap the other buffers.
cudaError_t launch_step_fused(DType dtype, void* x, const void* d_prev, void* d_new,
                              const void* g, const Segments& seg, const double* scal,
                              const double* wd, int nwd, double inv, double momentum,
                              double step, double* out, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

// elra::fixup_element over every element of every segment, with the mode and coefficients
// read from scal and the correction of segment k from coef[k] (device); does nothing unless
// scal[MODE] is MODE_SHIFT, MODE_UNDO_RETRACE or MODE_REDO.
cudaError_t launch_fixup(DType dtype, void* x, const void* d_prev, void* d_new, const void* g,
                         const Segments& seg, const double* scal, const double* coef,
                         double momentum, cudaStream_t stream);

// Bytes of the workspace that launch_collect needs for n elements.
size_t collect_workspace_bytes(DType dtype, int64_t n);

// coll <- (first ? 0 : coll) + weight * g over n elements; scal[GRAD_SQ] <- inv^2 |g|^2 and
// scal[STATUS] <- ST_OK, or ST_BAD_GRADIENT when that is not finite (or too large for half).
cudaError_t launch_collect(DType dtype, void* coll, const void* g, int64_t n, double weight,
                           double inv, bool first, bool is_half, double* scal, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream);

// elra::finalize(red, scal, coef, p) in a single thread on the device.
cudaError_t launch_finalize(const double* red, double* scal, double* coef,
                            const FinalizeParams& p, cudaStream_t stream);

// elra::update_element over every element of every segment, with the mode and step sizes read
// from scal (device) and the decay coefficient of segment k from coef[k] (device). Does nothing
// when scal[MODE] is MODE_NONE (or MODE_RETRACE_COPY without a copy: see elra_cuda.cu).
// xg may be null (no retrace copy).
cudaError_t launch_update(DType dtype, void* x, void* d, const void* g, void* xg,
                          const double* scal, const double* coef, const Segments& seg,
                          double momentum, cudaStream_t stream);

}  // namespace cuda
}  // namespace elra
