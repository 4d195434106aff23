#!/usr/bin/env bash
# One prepared GPU check, under 5 minutes: tokens/s and MFU of a LoRA training step on a randomly
# initialised model with Qwen2.5-0.5B's shape (bf16, SDPA, gradient checkpointing, the batch
# halving from 128 x 4096 tokens until it fits). The Python is benchmarks/gpu_train.py.
#
#   benchmarks/gpu_train.sh            # on the GPU machine; JSON on the last stdout line
#   benchmarks/gpu_train.sh --tiny     # the same code path on CPU, in seconds
#
# With $OUT set (the device runner's output folder), the JSON result is also written there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
ARGS=("$@")
if [ -n "${OUT:-}" ]; then
  ARGS+=(--out "$OUT/gpu_train.json")
fi
exec timeout 290 "$PY" -m benchmarks.gpu_train "${ARGS[@]}"
