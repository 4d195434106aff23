#!/usr/bin/env bash
# The prepared GPU check, under 5 minutes: MFU, tokens/s and peak memory of full fine-tuning and
# LoRA on a random-init ~1B Llama (bf16, packed rows, fused AdamW, eager and torch.compile).
# The Python is benchmarks/gpu_train.py; it needs only torch, transformers and peft.
#
#   benchmarks/gpu_train.sh            # on the GPU machine; JSON on the last stdout line
#   benchmarks/gpu_train.sh --tiny     # the same code path on CPU
#
# The interpreter: $PYTHON if set (and nothing else), otherwise the first of .venv/bin/python and
# python3 that imports torch, transformers and peft -- and, where nvidia-smi exists, sees CUDA.
# Every rejected candidate is named with the reason; none found -> exit 2.
# With $OUT set (the device runner's output folder), the JSON result is also written there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_cuda=0
if command -v nvidia-smi >/dev/null 2>&1 && [[ " $* " != *" --tiny "* ]]; then
  need_cuda=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
probe='import sys, torch, transformers, peft
ok = not int(sys.argv[1]) or torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, cuda {torch.version.cuda} available={torch.cuda.is_available()}")
sys.exit(0 if ok else 3)'

if [ -n "${PYTHON:-}" ]; then
  candidates=("$PYTHON")
else
  candidates=(.venv/bin/python python3)
fi
PY=""
for cand in "${candidates[@]}"; do
  if ! command -v "$cand" >/dev/null 2>&1; then
    echo "gpu_train.sh: skip $cand: not found" >&2
    continue
  fi
  if info=$("$cand" -c "$probe" "$need_cuda" 2>&1); then
    PY="$cand"
    echo "gpu_train.sh: using $cand: $info" >&2
    break
  fi
  echo "gpu_train.sh: skip $cand: $(tail -n 1 <<<"$info")$([ $need_cuda = 1 ] && echo ' (CUDA required here)')" >&2
done
if [ -z "$PY" ]; then
  echo "gpu_train.sh: no usable python (needs torch, transformers, peft); set PYTHON=/path/to/python" >&2
  exit 2
fi
ARGS=("$@")
if [ -n "${OUT:-}" ]; then
  ARGS+=(--out "$OUT/gpu_train.json")
fi
exec timeout 290 "$PY" -m fairdistill.benchmarks.gpu_train "${ARGS[@]}"
