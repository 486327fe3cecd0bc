#!/usr/bin/env bash
# README command 1: create .venv, install every pinned dependency, write the tiny twins and
# generate one image through the real Cog HTTP server (prints where the PNG is).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python scripts/demo.py
