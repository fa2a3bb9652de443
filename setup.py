"""Build script for elra.

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

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


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
    if use_cuda:
        # No -std: torch's builder then picks the standard its headers need (C++20 from torch
        # 2.14 on, whose headers refuse C++17); the kernels (csrc/cuda/*.cu) compile with either.
        # Architectures: TORCH_CUDA_ARCH_LIST when set (torch's builder reads it), else A100
        # (sm_80) and H100 (sm_90) code plus sm_90 PTX that newer GPUs compile at load time.
        # No --use_fast_math: it flushes float32 subnormals and approximates divisions, so the
        # GPU would compute a different function than the CPU kernels; these kernels are bound
        # by memory bandwidth, not arithmetic.
        nvcc = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
        cuda_flags = {"cxx": ["-O3", "-fopenmp"], "nvcc": nvcc}
        ext = CUDAExtension("elra._C", cpp + glue + cu, extra_compile_args=cuda_flags,
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("elra._C", cpp, extra_compile_args=flags, extra_link_args=["-fopenmp"])

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

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
    long_description = fh.read()
version = {}
with open(os.path.join(HERE, "elra", "_version.py"), encoding="utf-8") as fh:
    exec(fh.read(), version)  # the one place the version is written

setup(
    name="elra",
    version=version["__version__"],
    description="ELRA/P2M: a self-tuning gradient descent optimizer for PyTorch",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    packages=find_packages(include=["elra", "elra.*"]),
    package_data={"elra": ["docs/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.1"],
    extras_require={
        "test": ["pytest", "hypothesis", "numpy", "scikit-learn"],
        "dist-test": ["lightning", "accelerate"],  # tests/test_frameworks.py (requirements-dist.txt)
        "bench": ["tqdm", "matplotlib", "numpy", "scikit-learn"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
