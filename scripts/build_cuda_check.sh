#!/usr/bin/env bash
# Builds the full CUDA extension (csrc/*.cpp + csrc/cuda/*.cpp + csrc/cuda/*.cu) against a CUDA
# build of torch in a scratch venv, then imports it and reports which elra:: and elra_adam::
# kernels registered.
# Needs no GPU: it checks that the kernels and their torch glue compile and link, and that the
# CUDA kernels register with the dispatcher (running them is tests/test_cuda_ops.py's job, on a
# machine with a GPU).
#
# The repository is never built in place: an editable CUDA build would drop a CUDA _C*.so into
# elra/ of the working tree, which the CPU venv (.venv) would then fail to load. The working
# tree (tracked and untracked, not ignored files) is copied to a scratch folder and built there.
#
#   scripts/build_cuda_check.sh
# Environment:
#   ELRA_CUDA_VENV   scratch venv (default /tmp/elra-cuda-venv; created when missing)
#   ELRA_CUDA_SRC    scratch copy of the repository (default /tmp/elra-cuda-src)
#   ELRA_CUDA_TORCH  torch to build against (default torch==2.14.1, a CUDA 13.0 build)
#   CUDA_HOME        CUDA toolkit (default: the one the nvcc on PATH runs)
#   MAX_JOBS         parallel compile jobs (default 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELRA_CUDA_VENV:-/tmp/elra-cuda-venv}"
SRC="${ELRA_CUDA_SRC:-/tmp/elra-cuda-src}"
TORCH_SPEC="${ELRA_CUDA_TORCH:-torch==2.14.1}"
PY="${PYTHON:-python3}"
LOG="${SRC}.log"
t0=$SECONDS
say() { printf '[cuda-check %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
die() { say "FAILED: $*"; exit 1; }

case "$VENV" in "$ROOT"|"$ROOT"/*) die "the scratch venv must lie outside the repository";; esac
case "$SRC" in "$ROOT"|"$ROOT"/*) die "the scratch copy must lie outside the repository";; esac

# --- the CUDA toolkit: the real folder behind the nvcc on PATH (often a wrapper script) -------
if [ -z "${CUDA_HOME:-}" ]; then
  NVCC="$(command -v nvcc)" || die "nvcc is not on PATH (set CUDA_HOME)"
  real="$NVCC"
  if head -c 2 "$NVCC" | grep -q '#!'; then  # a wrapper: take the nvcc it execs
    real="$(grep -oE '/[^ "]*/bin/nvcc' "$NVCC" | head -n 1)"
    [ -n "$real" ] || die "cannot tell which nvcc $NVCC runs"
  fi
  CUDA_HOME="$(cd "$(dirname "$(readlink -f "$real")")/.." && pwd)"
fi
[ -x "$CUDA_HOME/bin/nvcc" ] || die "no nvcc in CUDA_HOME=$CUDA_HOME"
say "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"

# --- the scratch venv with a CUDA torch ---------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
say "installing $TORCH_SPEC setuptools wheel ninja numpy into $VENV (log: $VENV.pip.log)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" setuptools wheel \
  ninja numpy > "$VENV.pip.log" 2>&1 \
  || { grep -v '^WARNING: Location' "$VENV.pip.log" | tail -n 30; die "pip install"; }
read -r TV TCUDA SP < <("$VENV/bin/python" -c "import sysconfig, torch
print(torch.__version__, torch.version.cuda, sysconfig.get_paths()['purelib'])")
say "torch $TV (CUDA $TCUDA)"
[ "$TCUDA" != "None" ] || die "$TORCH_SPEC is not a CUDA build of torch"
CUDA_INC="$SP/nvidia/cu13/include"  # cuBLAS, cuSPARSE, ... headers (torch's CUDA headers use them)
[ -d "$CUDA_INC" ] || CUDA_INC="$(ls -d "$SP"/nvidia/cu*/include 2>/dev/null | head -n 1)"

# --- a copy of the working tree ------------------------------------------------------------------
say "copying the working tree of $ROOT to $SRC"
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +  # keep build/ for ninja
( cd "$ROOT" && git ls-files -z -co --exclude-standard --deduplicate \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - ) | tar -C "$SRC" -xf -

# --- the build -----------------------------------------------------------------------------------
say "building (ELRA_NATIVE=cuda, MAX_JOBS=${MAX_JOBS:-2}; log: $LOG)"
b0=$SECONDS
if ! ( cd "$SRC" && CUDA_HOME="$CUDA_HOME" CPATH="$CUDA_INC${CPATH:+:$CPATH}" \
       MAX_JOBS="${MAX_JOBS:-2}" ELRA_NATIVE=cuda \
       "$VENV/bin/python" -m pip install -v --disable-pip-version-check --no-build-isolation \
       --no-deps -e . ) > "$LOG" 2>&1; then
  grep -E 'error|Error|FAILED' "$LOG" | grep -v '^WARNING: Location' | head -n 40
  die "build (see $LOG)"
fi
nwarn="$(grep -cE 'csrc/.*warning' "$LOG" || true)"
say "built in $((SECONDS - b0)) s; compiler warnings from csrc/: $nwarn"
grep -E 'csrc/.*warning' "$LOG" | head -n 20 || true

# --- import and look at the registrations ---------------------------------------------------------
cd /tmp  # not the repository: the import must come from the scratch build
"$VENV/bin/python" - <<'EOF'
import os, torch
import elra
from elra import _ops
import elra._C as C

print(f"elra from {os.path.dirname(elra.__file__)}")
print(f"elra._C: {C.__file__} ({os.path.getsize(C.__file__) / 1e6:.1f} MB)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}")
has = torch._C._dispatch_has_kernel_for_dispatch_key
ok = True
for op in ("elra::reduce", "elra::collect", "elra::finalize", "elra::update",
           "elra::step_fused", "elra::fixup", "elra_adam::step", "elra_adam::undo"):
    cpu, cuda = has(op, "CPU"), has(op, "CUDA")
    ok = ok and cpu and cuda
    print(f"{op:16s} CPU kernel: {cpu}  CUDA kernel: {cuda}")
print("native_status:", _ops.native_status())
if not ok:
    raise SystemExit("some elra:: or elra_adam:: kernels are missing")
EOF
say "OK: the CUDA extension builds, loads and registers CUDA kernels for all eight ops (elra::, elra_adam::)"
