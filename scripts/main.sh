#!/usr/bin/env bash
# The main job on a fresh machine: install kallm, then retrofit, heal, evaluate, save,
# reload and reply with the bundled SmolLM2-135M-Instruct (see `kallm demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ -z "${KALLM_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export KALLM_DATA_DIR="$(cd ../shared/data && pwd)"
fi
python -m kallm demo "$@"
