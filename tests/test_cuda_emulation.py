"""The CPU emulation of the CUDA kernels (csrc/cuda/emulation) and the launchers under sanitizers.

The launchers of elra_cuda.cu run in a torch-free driver (tests/cuda_emulation/launchers_check.cpp)
built with AddressSanitizer + UndefinedBehaviorSanitizer and with ThreadSanitizer (the fibers of a
block are TSan threads that synchronize only at barriers, so a missing __syncthreads() is a race),
with the block cap lowered, against sums and element updates in double. Also: the constants the
tests' targets assume are those of the kernels.
"""

import re
import shutil
import subprocess

import pytest

import cuda_targets
from cuda_targets import CUDA_DIR, EMU_DIR, HERE

CU = CUDA_DIR / "elra_cuda.cu"


def test_targets_know_the_kernels_block_shape():
    src = CU.read_text()

    def const(name):
        return int(re.search(rf"constexpr int {name} = (\d+);", src).group(1))

    assert const("THREADS") == cuda_targets.THREADS
    assert const("MIN_PACKS_PER_THREAD") == cuda_targets.MIN_PACKS_PER_THREAD
    assert const("MAX_BLOCKS_PER_SEGMENT") == cuda_targets.GPU_MAX_BLOCKS


def test_every_launch_goes_through_the_one_macro():
    """The only thing the emulation needs of the kernels: no <<< >>> outside ELRA_LAUNCH."""
    src = CU.read_text()
    assert "<<<" not in src and src.count("ELRA_LAUNCH(") >= 10


def build_and_run(tmp_path, sanitize, *args):
    """Build the driver (``sanitize``: the -fsanitize list, or "" for an -O2 build with the
    GPU's block cap) and run it with ``args``."""
    exe = tmp_path / f"launchers_check_{sanitize.split(',')[0] or 'plain'}"
    flags = (["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
              f"-DELRA_CUDA_MAX_BLOCKS_PER_SEGMENT={cuda_targets.EMU_MAX_BLOCKS}"]
             if sanitize else ["-O2"])
    if sanitize.startswith("address"):
        flags.append("-fno-sanitize-recover=all")
    cmd = ["g++", "-std=c++17", *flags, "-Wall", "-Wno-unknown-pragmas", f"-I{EMU_DIR}",
           f"-I{CUDA_DIR}", "-x", "c++", str(CU), str(EMU_DIR / "emu_runtime.cpp"),
           str(HERE / "launchers_check.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"build failed:\n$ {' '.join(cmd)}\n{res.stderr[-4000:]}"
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1", "TSAN_OPTIONS": "halt_on_error=0"}
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600,
                         env={**env, "PATH": "/usr/bin:/bin"})
    return run


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ here")


@pytest.mark.slow
@needs_gxx
def test_launchers_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    run = build_and_run(tmp_path, "address,undefined")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out, out[-6000:]
    assert "emulation ok" in out, out
    assert out.count(" ok (") == 4 and out.rstrip().endswith("OK"), out


@pytest.mark.slow
@needs_gxx
def test_block_sums_race_free_under_thread_sanitizer(tmp_path):
    run = build_and_run(tmp_path, "thread", "--quick")
    out = run.stdout + run.stderr
    assert "WARNING: ThreadSanitizer" not in out, out[-6000:]
    assert run.returncode == 0 and out.count(" ok (") == 2 and "emulation ok" in out, out


@pytest.mark.slow
@needs_gxx
def test_launchers_at_the_gpus_block_cap(tmp_path):
    """With 1024 blocks per segment (as on a GPU), a segment of 2M elements has more partial
    sums than the finishing block has threads (its stride loop)."""
    run = build_and_run(tmp_path, "", "--big")
    out = run.stdout + run.stderr
    assert run.returncode == 0 and out.count(" ok (") == 2 and "emulation ok" in out, out

