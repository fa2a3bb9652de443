// The CUDA kernels, unchanged, compiled by the host compiler against the CPU emulation
// (csrc/cuda/emulation first on the include path). Built by tests/cuda_targets.py.
#include "elra_cuda.cu"
