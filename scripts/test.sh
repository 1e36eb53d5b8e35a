#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export KALLM_DATA_DIR="${KALLM_DATA_DIR:-$(cd .. && pwd)/shared/data}"
python -m pytest tests --durations=15 "$@"
