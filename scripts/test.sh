#!/usr/bin/env bash
# Set up, then run the whole test suite (lint + types + every test + the docs build). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# types: 0 errors over engine/ and trainer/ ([tool.mypy] in pyproject.toml names them)
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
# the documentation site: a broken link, or a page missing from the nav, fails here
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet
