#!/usr/bin/env bash
# Set up .venv, lint, and run the test suite. Extra arguments go to pytest (e.g. -k parity).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
