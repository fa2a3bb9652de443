#!/usr/bin/env bash
# Set everything up, then run the quick convergence benchmark (ELRA vs Adam, SGD, Prodigy,
# Schedule-Free AdamW and D-Adaptation on six problems): prints the tables, writes them and the
# plots to benchmarks/out/quick/. Extra arguments go to benchmarks/convergence.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ELRA_PYTHON" benchmarks/convergence.py --quick --jobs 2 "$@"
