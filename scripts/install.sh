#!/usr/bin/env bash
# Create .venv in the project root and install the pinned runtime + test dependencies.
# llama-cpp-python ships no wheels on PyPI: it compiles (about 6 minutes on 2 cores; pip caches
# the wheel). GGML_NATIVE=OFF keeps that wheel portable between CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" .venv/bin/python -m pip install -q --disable-pip-version-check \
    -r requirements.txt -r requirements-dev.txt -c constraints.txt
echo "installed into $(pwd)/.venv"
