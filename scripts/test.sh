#!/usr/bin/env bash
# Set everything up, then run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ELRA_PYTHON" -m pytest -q tests "$@"
