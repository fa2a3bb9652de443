// elra_adam_cuda.h: the host interface of ElraAdam's CUDA kernels (elra_adam_cuda.cu), free of
// torch headers; the torch glue is elra_adam_cuda_glue.cpp. As in elra_cuda.h, every launcher
// only enqueues work on `stream` (no synchronization, no allocation) and returns the launch
// status. The element types and segment bounds are those of elra_cuda.h.
//
// [note: ElraAdam's reductions on the GPU]
// adam_step sums <g, D> and <g, s g> in two launches, as elra_cuda.h's reduce: each block writes
// its sums (per thread in the opmath type, across the block in double in a fixed order) into a
// workspace of per-block partials, one block then adds all partials in order in double. The
// block layout depends only on the segment sizes, so the sums do not change from run to run.
// The host reads the two sums after the step (ElraAdam's step-size law runs on the host).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "elra_cuda.h"

namespace elra {
namespace cuda {

// The step's coefficients (elra/adam_ops.py: step, undo).
struct AdamCoefs {
  double alpha, bc1, bc2, beta1, beta2, eps, beta_a;
};

// Bytes of the per-block partials workspace of launch_adam_step (0 when all segments are empty).
size_t adam_workspace_bytes(DType dtype, const Segments& seg);

// ElraAdam's one pass where g is finite (elements with a non-finite g are left alone):
// out[0..1] = <g, D>, <g, s g> (D before the step, s = 1 / (sqrt(v / bc2) + eps) with the new v),
// m <- m + (1 - beta1)(g - m), v <- beta2 v + (1 - beta2) g^2, x <- x (1 - alpha wd[k]) - alpha u,
// D <- beta_a D - alpha u with u = m s / bc1. wd: nseg decays on the host.
cudaError_t launch_adam_step(DType dtype, void* x, void* m, void* v, void* d, const void* g,
                             const Segments& seg, const double* wd, const AdamCoefs& c,
                             double* out, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// Back over a step of alpha: x <- (x + alpha u) / (1 - alpha wd[k]), D <- (D + alpha u) / beta_a
// with u from the current m, v; with g (may be null), only where g is finite, and m, v go back
// too: m <- (m - (1 - beta1) g) / beta1, v <- max((v - (1 - beta2) g^2) / beta2, 0).
cudaError_t launch_adam_undo(DType dtype, void* x, void* m, void* v, void* d, const void* g,
                             const Segments& seg, const double* wd, const AdamCoefs& c,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace elra
