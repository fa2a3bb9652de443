// The torch glue of the CUDA kernels, unchanged, for the CPU emulation: ELRA_CUDA_EMULATION
// (set by tests/cuda_targets.py) makes elra_cuda_torch.h register the kernels for CPU tensors
// as the ops of the elra_emu:: namespace.
#include "elra_cuda_glue.cpp"
