"""The CUDA kernels (csrc/cuda/elra_cuda.cu) compile with plain nvcc, for sm_80 and sm_90.

elra_cuda.cu includes no torch headers, so this check needs only a CUDA toolkit: no GPU and no
CUDA build of torch (the full CUDA extension, glue included, is built by
scripts/build_cuda_check.sh). The compile uses the macros torch's extension builder passes to
nvcc (no implicit half conversions), so what passes here also compiles in the real build.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trainings and subprocess runs

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU = CUDA_DIR / "elra_cuda.cu"
ARCHS = ("80", "90")
# what torch.utils.cpp_extension adds to every nvcc command line (COMMON_NVCC_FLAGS)
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]


def includes(path: Path) -> list[str]:
    return re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.M)


@pytest.mark.parametrize("name", ["elra_cuda.cu", "elra_cuda.h"])
def test_kernels_include_no_torch_headers(name):
    """The kernels must compile without torch (a CPU wheel's headers cannot compile .cu files)."""
    allowed_local = {"../elra_math.h", "elra_cuda.h"}
    for inc in includes(CUDA_DIR / name):
        if inc.startswith(("torch", "ATen", "c10", "caffe2", "pybind11", "Python")):
            pytest.fail(f"{name} includes {inc}")
        if "/" in inc or inc.endswith((".h", ".hpp", ".cuh")):
            assert inc in allowed_local or inc.startswith("cuda"), f"{name} includes {inc}"


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc is not on PATH (no CUDA toolkit): the kernels are not compiled")
def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    obj = tmp_path / "elra_cuda.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = ["nvcc", "-c", "-std=c++17", "-O3", *gencode, *TORCH_NVCC_FLAGS,
           "--threads", str(len(ARCHS)),  # the two architectures compile in parallel
           "-Xcompiler", "-fPIC,-Wall", str(CU), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed:\n$ {' '.join(cmd)}\n{res.stderr}{res.stdout}"
    assert obj.stat().st_size > 0
    ours = [line for line in res.stderr.splitlines()
            if "warning" in line.lower() and ("elra_cuda" in line or "elra_math" in line)]
    assert not ours, "nvcc warnings in the kernels:\n" + "\n".join(ours)
