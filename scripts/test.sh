#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine or an existing one:
# prepares the host (docker, proot, test image, Python deps), builds, then runs
# the Rust tests, the end-to-end suite against the real server and dockerd,
# and the provider conformance suite (`stacyvm certify`) on every provider.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/setup-host.sh"
"$root/scripts/build.sh"

export CARGO_INCREMENTAL=0
triple="$(rustc -vV | sed -n 's/^host: //p')"
export STACYVM_BIN="$root/target/release/stacyvm"
export STACYVM_AGENT_PATH="$root/target/$triple/release/stacyvm-agent"
export STACYVM_TEST_IMAGE="${STACYVM_TEST_IMAGE:-stacyvm-test/python:bookworm}"

# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
cache="${STACYVM_CACHE_DIR:-$root/.ci/cache}"
ensure_native_image "$STACYVM_BIN" "$cache/native-images" "$STACYVM_TEST_IMAGE" \
  "$cache/images/python-bookworm.tar"

echo "==> cargo test (workspace)"
cargo test --release --locked --workspace

echo "==> end-to-end tests (real server, real dockerd, official Python client)"
py="$cache/venv/bin/python"
"$py" -m pytest "$root/tests/e2e" -q -p no:cacheprovider

echo "==> provider conformance (stacyvm certify: native, docker, proot, custom, mock)"
"$root/scripts/conformance.sh"
