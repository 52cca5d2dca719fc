#!/usr/bin/env bash
# Creates .venv and installs the project (idempotent). torch is pinned first: an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import serving, torch, tritonclient, pytriton" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi
# the public API's Python code, generated from proto/ (cached by the .proto's hash)
.venv/bin/python -m serving.gateway.protos > /dev/null
