#!/usr/bin/env bash
# Set up .venv, lint, check the layers (pyproject.toml's import-linter contract), and run the test suite.
# Extra arguments go to pytest (e.g. -k parity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q "$@"
