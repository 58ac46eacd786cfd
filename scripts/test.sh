#!/usr/bin/env bash
# Set up, then run the whole test suite (lint and types first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check zoo bridge tests benchmarks
.venv/bin/mypy
# the tests spend much of their time in child processes and I/O: one worker per core (pytest-xdist) halves the wall time
.venv/bin/python -m pytest -q -n auto "$@"
