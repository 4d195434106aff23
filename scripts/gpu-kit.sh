#!/usr/bin/env bash
# The GPU kit: what the accelerator image (Python 3.12, torch, transformers, peft, accelerate,
# aiohttp, numpy, rich, prometheus-client, uvloop; no network) lacks to run `fair train`, `fair eval`
# and `fair serve-student` -- msgspec, orjson, tenacity, tomli-w -- as wheels for
# its Python in build/gpu-kit/wheels (ignored by git; ~0.4 MB: carry it to the machine).
# benchmarks/gpu_train.sh needs none of it.
#
#   scripts/gpu-kit.sh prepare        # here, with a package index: download the wheels
#   scripts/gpu-kit.sh exec CMD ...   # on the machine: install them (--no-index) into
#                                     # build/gpu-kit/site-<python version>, then run CMD with that
#                                     # folder and the repository on PYTHONPATH
#
# e.g. scripts/gpu-kit.sh exec python3 -m fairdistill train runs/demo/run --out runs/train
# GPU_KIT_PY sets the target Python of `prepare` (default 3.12); PYTHON the interpreter of `exec`.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT="${GPU_KIT_DIR:-build/gpu-kit}"
# pyproject.toml's dependencies that the image lacks (tests/test_gpu_kit.py keeps the two in step)
PACKAGES=("msgspec>=0.18" "orjson>=3.9" "tenacity>=8.2" "tomli-w>=1.0" "zstandard>=0.22")

case "${1:-}" in
  prepare)
    PYV="${GPU_KIT_PY:-3.12}"
    PIP_PY="${PIP_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
    rm -rf "$KIT/wheels"
    mkdir -p "$KIT/wheels"
    "$PIP_PY" -m pip download --disable-pip-version-check -q --only-binary=:all: \
      --python-version "$PYV" --implementation cp --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      -d "$KIT/wheels" "${PACKAGES[@]}"
    echo "$PYV" >"$KIT/wheels/PYTHON_VERSION"
    echo "gpu-kit: $(ls "$KIT/wheels"/*.whl | wc -l) wheels for Python $PYV in $KIT/wheels ($(du -sh "$KIT/wheels" | cut -f1))" >&2
    ;;
  exec)
    shift
    [ $# -gt 0 ] || { echo "gpu-kit: exec needs a command" >&2; exit 2; }
    PY="${PYTHON:-python3}"
    if [ ! -f "$KIT/wheels/PYTHON_VERSION" ]; then
      echo "gpu-kit: no $KIT/wheels: run 'scripts/gpu-kit.sh prepare' where a package index is reachable, and carry $KIT" >&2
      exit 2
    fi
    want="$(cat "$KIT/wheels/PYTHON_VERSION")"
    have="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ "$want" != "$have" ]; then
      echo "gpu-kit: the wheels are for Python $want, $PY is $have: GPU_KIT_PY=$have scripts/gpu-kit.sh prepare" >&2
      exit 2
    fi
    SITE="$KIT/site-$have"
    if [ ! -f "$SITE/.installed" ]; then
      rm -rf "$SITE"
      "$PY" -m pip install --disable-pip-version-check -q --no-index --find-links "$KIT/wheels" \
        --target "$SITE" "${PACKAGES[@]}"
      touch "$SITE/.installed"
    fi
    export PYTHONPATH="$(cd "$SITE" && pwd):$PWD${PYTHONPATH:+:$PYTHONPATH}"
    exec "$@"
    ;;
  *)
    echo "usage: scripts/gpu-kit.sh prepare | exec CMD ..." >&2
    exit 2
    ;;
esac
