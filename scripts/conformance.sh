#!/usr/bin/env bash
# The provider conformance suite, through `stacyvm certify`, on every
# provider: native, docker, proot, custom (against the reference backend in
# examples/custom-backend, started and stopped here) and mock.
#
# Reports: $STACYVM_CACHE_DIR/reports/<provider>.md (Markdown, the format of
# docs/SUPPORT_MATRIX.md); certification records land in $STACYVM_DATA_DIR
# (default $STACYVM_CACHE_DIR/certify-data). Exits non-zero when any provider
# fails a check.
#
# Environment: STACYVM_BIN, STACYVM_AGENT_PATH, STACYVM_TEST_IMAGE,
# STACYVM_CONFORMANCE_PROVIDERS (default "native docker proot custom mock").
# Needs the host prepared by scripts/setup-host.sh and a build (scripts/build.sh).
set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${STACYVM_CACHE_DIR:-$root/.ci/cache}"
triple="$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')"
bin="${STACYVM_BIN:-$root/target/release/stacyvm}"
export STACYVM_AGENT_PATH="${STACYVM_AGENT_PATH:-$root/target/${triple:-x86_64-unknown-linux-gnu}/release/stacyvm-agent}"
image="${STACYVM_TEST_IMAGE:-stacyvm-test/python:bookworm}"
providers="${STACYVM_CONFORMANCE_PROVIDERS:-native docker proot custom mock}"
reports="$cache/reports"
export STACYVM_IMAGE_DIR="${STACYVM_IMAGE_DIR:-$cache/native-images}"
export STACYVM_DATA_DIR="${STACYVM_DATA_DIR:-$cache/certify-data}"
mkdir -p "$reports" "$STACYVM_DATA_DIR"

[ -x "$bin" ] || die "$bin not found; run scripts/build.sh"
[ -x "$STACYVM_AGENT_PATH" ] || die "$STACYVM_AGENT_PATH not found; run scripts/build.sh"

# The test image in the native image store (native, proot and the reference
# backend take their root filesystems from it).
ensure_native_image "$bin" "$STACYVM_IMAGE_DIR" "$image" "$cache/images/python-bookworm.tar"

backend_pid=""
backend_dir=""
stop_backend() {
  if [ -n "$backend_pid" ]; then
    kill "$backend_pid" 2>/dev/null || true
    wait "$backend_pid" 2>/dev/null || true
    backend_pid=""
  fi
  [ -n "$backend_dir" ] && rm -rf "$backend_dir"
  backend_dir=""
}
trap stop_backend EXIT

start_backend() {
  local port token
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  backend_dir="$(mktemp -d /tmp/svcb-XXXXXX)"
  log "starting the reference custom backend on 127.0.0.1:$port"
  python3 "$root/examples/custom-backend/reference_backend.py" \
    --listen "127.0.0.1:$port" --state-dir "$backend_dir/state" \
    --agent "$STACYVM_AGENT_PATH" --token "$token" \
    --image-store "$STACYVM_IMAGE_DIR" >"$backend_dir/backend.log" 2>&1 &
  backend_pid=$!
  export STACYVM_CUSTOM_URL="http://127.0.0.1:$port"
  export STACYVM_CUSTOM_TOKEN="$token"
  for _ in $(seq 1 100); do
    if curl -fsS -H "Authorization: Bearer $token" "$STACYVM_CUSTOM_URL/v1/health" >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$backend_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$backend_dir/backend.log" >&2
  die "the reference backend did not start"
}

failed=()
for p in $providers; do
  start="$(now_ms)"
  [ "$p" = custom ] && start_backend
  log "certify --provider $p (image $image)"
  rc=0
  "$bin" certify --provider "$p" --image "$image" --format md --out "$reports/$p.md" || rc=$?
  cat "$reports/$p.md"
  [ "$p" = custom ] && stop_backend
  info "provider $p: exit $rc, took $(elapsed_since "$start")"
  [ "$rc" -eq 0 ] || failed+=("$p")
done

if [ "${#failed[@]}" -gt 0 ]; then
  die "conformance failed for: ${failed[*]} (reports in $reports)"
fi
log "conformance passed for: $providers (reports in $reports)"
