"""Find the external tools the deployment checks use (installed by deploy/ci-setup.sh).

Tests call `require(name)`: in CI (env CI set) a missing tool fails the test, since CI
installs them; on a developer machine it skips with the reason and the install command.
"""

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Where each tool may live besides PATH. pytest is often run as `.venv/bin/python -m pytest`
# without activating the venv, so the interpreter's own bin dir is searched first.
_CANDIDATES = {
    "kubectl": [Path(sys.executable).parent / "kubectl"],
    "kubernetes-validate": [Path(sys.executable).parent / "kubernetes-validate"],
    "checkov": [REPO / ".venv-checkov" / "bin" / "checkov"],
    "nginx": [Path("/usr/sbin/nginx")],
}


def find(name: str) -> str | None:
    """Absolute path of the tool, or None."""
    override = os.environ.get("LDM_" + name.upper().replace("-", "_"))
    if override:
        return override
    for candidate in _CANDIDATES.get(name, []):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def require(name: str) -> str:
    """Path of the tool; fail in CI, skip elsewhere, when it is missing."""
    import pytest

    path = find(name)
    if path:
        return path
    message = f"{name} not found; install it with `bash deploy/ci-setup.sh`"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must have it)")
    pytest.skip(message)
