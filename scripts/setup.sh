#!/usr/bin/env bash
# Create .venv in the repository root (first run) and install the requirements into it.
# Usage: bash scripts/setup.sh [requirements file, default requirements-dev.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "${1:-requirements-dev.txt}"
# tests/test_install.py installs deta beside HuggingFace's `datasets` in an offline venv: its wheel, fetched once.
wheels=${DETA_TEST_WHEELS:-$HOME/.cache/deta-nms/wheels}
if ! compgen -G "$wheels/datasets-*.whl" >/dev/null; then
    .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
        -d "$wheels" "datasets>=2,<5"
fi
# Build the compiled attention kernels now (CPU, and CUDA where nvcc and a CUDA torch exist) rather than
# on first use; without them everything still runs on the PyTorch reference.
.venv/bin/python -c "from ops.custom_op import compiled_devices; \
print('deta_ops kernels:', ', '.join(sorted(compiled_devices())) or 'none, using the PyTorch reference')"
