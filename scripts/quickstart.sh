#!/usr/bin/env bash
# Build StacyVM, start the server on its embedded defaults, and show it
# running a sandbox. The server keeps running in the foreground; Ctrl-C stops
# it (sandboxes survive a server restart and are re-attached).
#
# No Docker is needed: the default provider is `native` (Linux namespaces,
# cgroups, seccomp, overlayfs). The demo image is a Debian rootfs with
# python3 built locally with debootstrap and imported into StacyVM's image
# store; with registry access, images such as python:3.12 are pulled on
# first use instead.
#
#   STACYVM_QUICKSTART_IMAGE  image for the demo sandbox (default stacyvm-test/python:bookworm)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/lib.sh
. "$root/scripts/lib.sh"
require_root "quickstart.sh"
ensure_cache_dir
ensure_apt_packages debootstrap debian-archive-keyring ca-certificates curl

STACYVM_TEST_IMAGE_DOCKER=0 "$root/scripts/build-test-image.sh"
"$root/scripts/build.sh"

bin="$root/target/release/stacyvm"
image="${STACYVM_QUICKSTART_IMAGE:-stacyvm-test/python:bookworm}"
port="${STACYVM_LISTEN:-0.0.0.0:7423}"
port="${port##*:}"
export STACYVM_URL="http://127.0.0.1:$port"

if [ "$image" = "stacyvm-test/python:bookworm" ]; then
  echo "==> stacyvm image import .ci/cache/images/python-bookworm.tar $image"
  "$bin" image import "$STACYVM_CACHE_DIR/images/python-bookworm.tar" "$image"
fi

echo "==> starting: stacyvm serve (listening on ${STACYVM_LISTEN:-0.0.0.0:7423})"
"$bin" serve &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null' INT TERM EXIT

for _ in $(seq 1 100); do
  if curl -fsS "$STACYVM_URL/api/v1/ready" >/dev/null 2>&1; then break; fi
  kill -0 "$server" 2>/dev/null || { echo "error: the server exited" >&2; exit 1; }
  sleep 0.2
done

echo "==> stacyvm spawn --image $image"
id="$("$bin" spawn --image "$image" --ttl 10m --meta purpose=quickstart)"
echo "    sandbox $id"
echo "==> stacyvm exec $id -- \"python3 -c 'print(40 + 2)'\""
"$bin" exec "$id" -- "python3 -c 'print(40 + 2)'"
echo "==> stacyvm ls"
"$bin" ls
echo "==> stacyvm rm $id"
"$bin" rm "$id"
echo
echo "StacyVM is serving on $STACYVM_URL (API under /api/v1). Ctrl-C stops it."
wait "$server"
