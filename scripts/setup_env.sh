#!/usr/bin/env bash
# Sets up ./.venv with torch (CPU build 2.13.0 unless ELRA_TORCH says otherwise), the test and
# benchmark dependencies, and elra itself (editable, built against the installed torch).
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
stamp="$VENV/.elra-deps"
want="$TORCH_SPEC $(cat "$ROOT/requirements-dev.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $TORCH_SPEC and the dev requirements"
  "${PIP[@]}" install "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
  "${PIP[@]}" install -r "$ROOT/requirements-dev.txt" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, sklearn, hypothesis, pytest" 
  echo "$want" > "$stamp"
fi
echo "[setup] installing elra (editable)"
( cd "$ROOT" && "${PIP[@]}" install --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true )
"$VENV/bin/python" -c "import elra; print('[setup] elra', elra.__version__, 'from', elra.__file__)"
export ELRA_PYTHON="$VENV/bin/python"
