#!/usr/bin/env bash
# Set up, then run the default model on the bundled real slide (CMU-1-Small-Region, Aperio SVS).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/zoo demo --out "${1:-out}"
