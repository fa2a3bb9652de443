#!/usr/bin/env bash
# Set everything up, then run the quick benchmark (ELRA vs Adam vs SGD: table + plot).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ELRA_PYTHON" benchmarks/quick.py "$@"
