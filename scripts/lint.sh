#!/usr/bin/env bash
# Lint and type checks (idempotent): ruff's lint rules, ruff's format check, mypy (strict on
# serving/core; configuration in pyproject.toml). The tools are pinned here and in pyproject.toml's
# `test` extra (scripts/setup.sh installs that); installed into .venv when absent or at another
# version. Runs all three, then exits non-zero if any found something.
set -uo pipefail
cd "$(dirname "$0")/.."
RUFF=0.17.6
MYPY=2.4.1
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "lint.sh: no .venv (run scripts/setup.sh first)" >&2
  exit 2
fi
if [ "$("$PY" -m ruff --version 2>/dev/null)" != "ruff $RUFF" ] \
   || ! "$PY" -m mypy --version 2>/dev/null | grep -q "^mypy $MYPY "; then
  "$PY" -m pip install -q "ruff==$RUFF" "mypy==$MYPY" || exit 2
fi
status=0
echo "== ruff check"
"$PY" -m ruff check . || status=1
echo "== ruff format --check"
"$PY" -m ruff format --check --output-format concise . || status=1
echo "== mypy"
"$PY" -m mypy || status=1
exit $status
