#!/usr/bin/env bash
# Set up, then run the main job end to end on the embedded default (no API key, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fair demo "$@"
