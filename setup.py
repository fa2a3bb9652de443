"""Build script for elra's native kernels (the package's metadata is in pyproject.toml).

The Python package always installs. Native kernels (C++ for CPU, CUDA for GPUs) are built from
``csrc/`` with ``torch.utils.cpp_extension``; the pure-torch kernels work without them.
Environment switches:

* ``ELRA_NATIVE=0`` skips the native build, ``ELRA_NATIVE=cpu`` / ``cuda`` forces a CPU / CUDA build
  (default: CUDA when a CUDA toolkit and a CUDA build of torch are present, else CPU).
  By default a build that fails (no compiler, say) only warns: the package installs with the
  pure-torch engine. A forced build (``cpu`` / ``cuda``) that fails stops the installation.
* ``MAX_JOBS`` limits parallel compile jobs (read by torch's build helper).

Build with the installed torch: ``pip install --no-build-isolation -e .``
"""

import glob
import os

from setuptools import setup


def native_extensions():
    """The extension modules to build (none when switched off) and the build command."""
    choice = os.environ.get("ELRA_NATIVE", "auto").lower()
    if choice in ("0", "off", "no"):
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    glue = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))  # torch glue of the kernels
    use_cuda = choice == "cuda" or (choice == "auto" and torch.version.cuda is not None
                                    and CUDA_HOME is not None and bool(cu))
    # -fopenmp: at::parallel_for is OpenMP-based in torch's CPU builds and compiles into our code
    flags = {"cxx": ["-O3", "-std=c++17", "-fopenmp"]}
    # what elra._C reports of itself (elra.native_status(), python -m elra)
    macros = [("ELRA_BUILD_TORCH", f'"{torch.__version__}"')]
    if use_cuda:
        # No -std: torch's builder then picks the standard its headers need (C++20 from torch
        # 2.14 on, whose headers refuse C++17); the kernels (csrc/cuda/*.cu) compile with either.
        # Architectures: TORCH_CUDA_ARCH_LIST when set (torch's builder reads it), else A100
        # (sm_80) and H100 (sm_90) code plus sm_90 PTX that newer GPUs compile at load time.
        # No --use_fast_math: it flushes float32 subnormals and approximates divisions, so the
        # GPU would compute a different function than the CPU kernels; these kernels are bound
        # by memory bandwidth, not arithmetic.
        nvcc = ["-O3"]
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if not archs:
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
            archs = "8.0 9.0+PTX"
        macros.append(("ELRA_CUDA_ARCHS", f'"{archs}"'))
        cuda_flags = {"cxx": ["-O3", "-fopenmp"], "nvcc": nvcc}
        ext = CUDAExtension("elra._C", cpp + glue + cu, extra_compile_args=cuda_flags,
                            extra_link_args=["-fopenmp"], define_macros=macros)
    else:
        ext = CppExtension("elra._C", cpp, extra_compile_args=flags, extra_link_args=["-fopenmp"],
                           define_macros=macros)

    class TolerantBuildExtension(BuildExtension):
        """Skips the kernels with a warning when their build fails, unless a build was forced."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # compiler missing or failing: torch raises several kinds
                if choice in ("cpu", "cuda"):
                    raise
                print(f"WARNING: elra: the native kernels did not build ({type(e).__name__}: "
                      f"{e}); elra installs with its pure-torch engine. Set ELRA_NATIVE=cpu to "
                      f"see the build fail, ELRA_NATIVE=0 to skip it.")
                self.extensions = []  # nothing to copy or to list as an output

    return [ext], {"build_ext": TolerantBuildExtension}


ext_modules, cmdclass = native_extensions()
# the package's metadata (name, version, license, dependencies, extras) is in pyproject.toml
setup(ext_modules=ext_modules, cmdclass=cmdclass)
