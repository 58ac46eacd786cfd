#!/usr/bin/env bash
# Set up everything on a fresh Debian/Ubuntu machine: system libraries (for FAST),
# a virtual environment in .venv, and this package with its dev/test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1; then
  pkgs=$(grep -v '^\s*#' .ci/apt-packages.txt | xargs)
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | xargs)
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing Debian packages: $missing" >&2
    # wait (up to 10 min) for another apt/dpkg process instead of failing on its lock
    lock="-o DPkg::Lock::Timeout=600"
    $SUDO apt-get $lock update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get $lock install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU build of torch (training/export only); pinned so pip does not pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
# Non-editable install: the registry, weights and pipelines are package data.
.venv/bin/python -m pip install -q ".[dev]"

# bioimage.io's own checker for `zoo export bioimageio` packages, in a venv of its own (its pins clash with ours)
[ -x .venv-bioimageio/bin/python ] || "$PY" -m venv .venv-bioimageio
.venv-bioimageio/bin/python -m pip install -q -r .ci/bioimageio-requirements.txt
