#!/usr/bin/env bash
# README command 2: lint, then the whole test suite (tiny twins, real servers, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
