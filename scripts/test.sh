#!/usr/bin/env bash
# Sets up and runs the test suite (slow benchmarks excluded; run them with: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
