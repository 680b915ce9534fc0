#!/usr/bin/env bash
# Create .venv and install kits into it. torch goes first, pinned to the CPU build on this
# disk, because a bare `torch` requirement would pull a multi-GB CUDA build; a machine that
# already has torch (e.g. a CUDA build) in the venv keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
