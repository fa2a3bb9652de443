#!/usr/bin/env bash
# Sets up ./.venv with torch (CPU build 2.13.0 unless ELRA_TORCH says otherwise), the test and
# benchmark dependencies, the training frameworks the tests run ELRA under (requirements-dist.txt:
# Lightning, accelerate, transformers; installed after torch, they keep it), and elra itself
# (editable, built against the installed torch).
# Idempotent: a second run only re-installs elra. Meant to be sourced by bench.sh / test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ELRA_VENV:-$ROOT/.venv}"
TORCH_SPEC="${ELRA_TORCH:-torch==2.13.0}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip, without the notes about missing local package folders; pip's own exit status is kept
pipq() { "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
stamp="$VENV/.elra-deps"
want="$TORCH_SPEC $(cat "$ROOT/requirements-dev.txt" "$ROOT/requirements-dist.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC, the dev requirements and the test frameworks"
  pipq install "$TORCH_SPEC"
  pipq install -r "$ROOT/requirements-dev.txt"
  # the frameworks must not replace the pinned torch (a CUDA build would be several GB)
  pipq install -r "$ROOT/requirements-dist.txt" "$TORCH_SPEC"
  "$VENV/bin/python" -c "import torch, sklearn, hypothesis, pytest, build, lightning, accelerate, transformers"
  echo "$want" > "$stamp"
fi
echo "[setup] installing elra (editable, native kernels built against the installed torch)"
# an old extension must not stand in for one whose build failed (the build only warns then)
rm -f "$ROOT"/elra/_C*.so
( cd "$ROOT" && pipq install --no-build-isolation --no-deps -e . )
# The native kernels must have built here (this machine has a compiler), unless switched off:
# a failed build would otherwise only show as skipped tests.
"$VENV/bin/python" - <<'EOF'
import os, sys
import elra
status = elra.native_status()
print(f"[setup] elra {elra.__version__} from {os.path.dirname(elra.__file__)}; native: {status}")
if not status["cpu"] and os.environ.get("ELRA_NATIVE", "auto") not in ("0", "off", "no"):
    sys.exit("[setup] the native kernels did not build: see the pip output above "
             "(ELRA_NATIVE=0 runs everything on the pure-torch engine)")
EOF
export ELRA_PYTHON="$VENV/bin/python"
