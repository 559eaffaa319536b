#!/usr/bin/env bash
# Build StacyVM, start the server on its embedded defaults, and show it
# running a sandbox. The server keeps running in the foreground; Ctrl-C stops
# it (sandboxes survive a server restart and are re-attached).
#
#   STACYVM_QUICKSTART_IMAGE  image for the demo sandbox
#                             (default: the locally built stacyvm-test/python:bookworm;
#                              any registry image such as python:3.12 works when
#                              the Docker daemon can reach its registry)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

"$root/scripts/setup-host.sh"
"$root/scripts/build.sh"

bin="$root/target/release/stacyvm"
image="${STACYVM_QUICKSTART_IMAGE:-stacyvm-test/python:bookworm}"
port="${STACYVM_LISTEN:-0.0.0.0:7423}"
port="${port##*:}"
export STACYVM_URL="http://127.0.0.1:$port"

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
