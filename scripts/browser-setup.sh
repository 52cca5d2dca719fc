#!/usr/bin/env bash
# Installs what tests/browser/test_page_browser.py (and tests/page_screenshots.py) need beyond
# pyproject.toml: Debian's chromium, and Playwright's Python package, used only as the driver of
# that chromium (tests/support/page_browser.py launches it with executable_path). `playwright install`
# is never run: no browser is downloaded. Called by .ci/run after scripts/setup.sh; runs as root
# from the repository root. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PLAYWRIGHT_VERSION=1.65.2

if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
installed=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('playwright'))" 2>/dev/null || true)
if [ "${installed}" != "${PLAYWRIGHT_VERSION}" ]; then
    .venv/bin/python -m pip install -q "playwright==${PLAYWRIGHT_VERSION}"
fi
