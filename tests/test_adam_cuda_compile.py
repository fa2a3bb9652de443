"""ElraAdam's CUDA kernels (csrc/cuda/elra_adam_cuda.cu) compile with plain nvcc for sm_80 and
sm_90, without torch headers (as tests/test_cuda_compile.py checks ELRA's; the glue is built by
scripts/build_cuda_check.sh)."""

import shutil
import subprocess

import pytest

from test_cuda_compile import ARCHS, CUDA_DIR, TORCH_NVCC_FLAGS, includes

pytestmark = pytest.mark.slow  # subprocess runs


@pytest.mark.parametrize("name", ["elra_adam_cuda.cu", "elra_adam_cuda.h"])
def test_kernels_include_no_torch_headers(name):
    for inc in includes(CUDA_DIR / name):
        if "/" in inc or inc.endswith((".h", ".hpp", ".cuh")):  # not a C++ standard header
            assert inc in ("elra_adam_cuda.h", "elra_cuda.h") or inc.startswith("cuda"), \
                f"{name} includes {inc}"


@pytest.mark.skipif(shutil.which("nvcc") is None,
                    reason="nvcc is not on PATH (no CUDA toolkit): the kernels are not compiled")
def test_adam_cuda_kernels_compile_for_sm80_and_sm90(tmp_path):
    obj = tmp_path / "elra_adam_cuda.o"
    cmd = ["nvcc", "-c", "-std=c++17", "-O3",
           *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS], *TORCH_NVCC_FLAGS,
           "--threads", str(len(ARCHS)), "-Xcompiler", "-fPIC,-Wall",
           str(CUDA_DIR / "elra_adam_cuda.cu"), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed:\n$ {' '.join(cmd)}\n{res.stderr}{res.stdout}"
    assert obj.stat().st_size > 0
    ours = [line for line in res.stderr.splitlines()
            if "warning" in line.lower() and "elra_adam_cuda" in line]
    assert not ours, "nvcc warnings in the kernels:\n" + "\n".join(ours)
