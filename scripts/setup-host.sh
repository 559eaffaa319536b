#!/usr/bin/env bash
# Make this machine ready for StacyVM's test suite and quickstart:
#   1. apt packages (docker.io, debootstrap, proot, chromium for the browser test, ...)
#   2. a docker daemon (reuses a running one; else starts dockerd without a
#      bridge or iptables, so containers never reach the host's networks)
#   3. Python test dependencies (stacyvm SDK, pytest, httpx)
#   4. the sandbox test image (scripts/build-test-image.sh)
# Every step is skipped when already satisfied; safe to run repeatedly, from
# any directory, as root, without a terminal (CI=true).
#
# Environment: STACYVM_CACHE_DIR (default <repo>/.ci/cache), plus those of
# scripts/build-test-image.sh.
set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

APT_PACKAGES=(docker.io debootstrap debian-archive-keyring ca-certificates wget curl docker-registry skopeo bubblewrap chromium proot)
PY_SDK_VERSION=0.1.1
PY_PACKAGES=("stacyvm==$PY_SDK_VERSION" pytest httpx)

start_ms="$(now_ms)"
require_root "setup-host.sh"
ensure_cache_dir

# 1. apt packages (python3 comes from the environment, not Debian).
ensure_apt_packages "${APT_PACKAGES[@]}"

# 2. docker daemon
ensure_dockerd

# 3. Python test dependencies, in a virtualenv of our own (system Pythons
#    refuse global pip installs).
command -v python3 >/dev/null 2>&1 || ensure_apt_packages python3
VENV="$STACYVM_CACHE_DIR/venv"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating python virtualenv $VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    ensure_apt_packages python3-venv
    python3 -m venv "$VENV"
  fi
fi
if "$VENV/bin/python" - "$PY_SDK_VERSION" >/dev/null 2>&1 <<'EOF2'
import sys
from importlib.metadata import version
import stacyvm, pytest, httpx  # noqa: F401
sys.exit(0 if version("stacyvm") == sys.argv[1] else 1)
EOF2
then
  log "python test deps already installed (stacyvm $PY_SDK_VERSION, pytest, httpx)"
else
  log "installing python test deps into $VENV: ${PY_PACKAGES[*]}"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "${PY_PACKAGES[@]}"
fi

# 4. sandbox test image
log "test image"
"$STACYVM_REPO_ROOT/scripts/build-test-image.sh"

log "host ready (took $(elapsed_since "$start_ms"))"
