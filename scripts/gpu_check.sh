#!/usr/bin/env bash
# For the day a GPU is there: one command that checks the CUDA engine on the real device.
#
#   1. builds the CUDA extension (scripts/build_cuda_check.sh: a scratch venv with a CUDA build
#      of torch and a scratch copy of this working tree, built with ELRA_NATIVE=cuda);
#   2. runs the CUDA tests on the device (tests/test_cuda_ops.py, test_cuda_engine.py and
#      test_selfcheck.py: every op against the CPU kernels, whole deferred trajectories, the
#      transfers per step; the same tests run on the CPU emulation in every CI run);
#   3. the step benchmark on the device (benchmarks/step_overhead.py --device cuda: ratio to
#      fused Adam at 32M parameters in 4 tensors and at 100k in 50 tensors, and the self-check's
#      cost);
#   4. a short digits run (the 64-128-10 MLP, 20 epochs, ELRA stochastic) on the device;
# then prints one summary. Exit status 0 only if every part passed.
#
#   scripts/gpu_check.sh
# Environment: that of scripts/build_cuda_check.sh (ELRA_CUDA_VENV, ELRA_CUDA_SRC,
# ELRA_CUDA_TORCH, CUDA_HOME, MAX_JOBS); ELRA_GPU_CHECK_SKIP_BUILD=1 reuses the last build.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELRA_CUDA_VENV:-/tmp/elra-cuda-venv}"
SRC="${ELRA_CUDA_SRC:-/tmp/elra-cuda-src}"
LOGS="${SRC}.gpu-check"
mkdir -p "$LOGS"
t0=$SECONDS
say() { printf '[gpu-check %4ds] %s\n' "$((SECONDS - t0))" "$*"; }
declare -A RESULT

# --- 1. the build ---------------------------------------------------------------------------------
if [ "${ELRA_GPU_CHECK_SKIP_BUILD:-0}" != "1" ]; then
  say "building the CUDA extension (log: $LOGS/build.log)"
  if bash "$ROOT/scripts/build_cuda_check.sh" > "$LOGS/build.log" 2>&1; then
    RESULT[build]="ok"
  else
    tail -n 20 "$LOGS/build.log"
    RESULT[build]="FAILED (see $LOGS/build.log)"
  fi
else
  RESULT[build]="skipped (ELRA_GPU_CHECK_SKIP_BUILD=1)"
fi
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    2>/dev/null; then
  say "no usable CUDA device from $PY (torch.cuda.is_available() is False): nothing to check"
  printf '\nSUMMARY\n  build: %s\n  device: none\n' "${RESULT[build]}"
  exit 1
fi
DEVICE="$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
say "device: $DEVICE"
say "installing the test dependencies into $VENV"
"$PY" -m pip install -q --disable-pip-version-check pytest hypothesis scikit-learn matplotlib \
  > "$LOGS/pip.log" 2>&1 || say "pip install failed (see $LOGS/pip.log)"
cd "$SRC" || exit 1

# --- 2. the CUDA tests on the device ------------------------------------------------------------
say "CUDA tests (log: $LOGS/tests.log)"
"$PY" -m pytest -q -rs tests/test_cuda_ops.py tests/test_cuda_engine.py tests/test_selfcheck.py \
  > "$LOGS/tests.log" 2>&1
status=$?
RESULT[tests]="$(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$LOGS/tests.log" | tail -n 1)"
[ $status -eq 0 ] || RESULT[tests]="FAILED: ${RESULT[tests]} (see $LOGS/tests.log)"
DEVIATIONS="$(sed -n '/^CUDA kernels against the CPU kernels/,/passed\|failed/p' "$LOGS/tests.log" \
  | grep -E '^ +(cuda|target)' || true)"

# --- 3. the step benchmark ----------------------------------------------------------------------
say "step benchmark (log: $LOGS/bench.log)"
if "$PY" benchmarks/step_overhead.py --device cuda --sizes 32M:4 100k:50 --repeats 21 \
    --out "$LOGS/step_overhead" > "$LOGS/bench.log" 2>&1; then
  RESULT[bench]="$(grep -E '\| elra native \|' "$LOGS/bench.log" \
    | awk -F'|' '{gsub(/ /, "", $2); gsub(/ /, "", $5); printf "%s: %sx fused Adam; ", $2, $5}')"
  RESULT[selfcheck]="$(grep -E '^self-check' "$LOGS/bench.log" | cut -c1-160)"
else
  tail -n 20 "$LOGS/bench.log"
  RESULT[bench]="FAILED (see $LOGS/bench.log)"
  status=1
fi

# --- 4. a short digits run ----------------------------------------------------------------------
say "digits run (log: $LOGS/digits.log)"
if "$PY" - > "$LOGS/digits.log" 2>&1 <<'PYEOF'
import sys, time
sys.path.insert(0, "tests")
import torch
from conftest import digits_anchor_optimizer, mlp, train_digits
from sklearn.datasets import load_digits
import elra

d = load_digits()
X = torch.tensor(d.data, dtype=torch.float32).cuda() / 16.0
y = torch.tensor(d.target).cuda()
t = time.perf_counter()
loss, acc, model, opt = train_digits(X, y, digits_anchor_optimizer, seed=0, model=mlp(0).cuda())
print(f"digits on {torch.cuda.get_device_name(0)}: engine {opt.engine_name}, train loss "
      f"{loss:.4f}, test accuracy {acc:.3f}, {time.perf_counter() - t:.1f} s; "
      f"self-check: {elra.native_status()['self_check']['devices']}")
sys.exit(0 if acc > 0.9 and opt.engine_name == "native" else 1)
PYEOF
then
  RESULT[digits]="$(grep -E '^digits' "$LOGS/digits.log" | cut -c1-200)"
else
  tail -n 20 "$LOGS/digits.log"
  RESULT[digits]="FAILED (see $LOGS/digits.log)"
  status=1
fi

printf '\nSUMMARY (%s, %d s)\n' "$DEVICE" "$((SECONDS - t0))"
printf '  build:      %s\n  tests:      %s\n  benchmark:  %s\n  self-check: %s\n  digits:     %s\n' \
  "${RESULT[build]}" "${RESULT[tests]}" "${RESULT[bench]}" "${RESULT[selfcheck]:-}" \
  "${RESULT[digits]}"
[ -n "$DEVIATIONS" ] && printf '  largest deviations from the CPU kernels:\n%s\n' "$DEVIATIONS"
case "${RESULT[build]}${RESULT[tests]}" in *FAILED*) status=1;; esac
exit $status
