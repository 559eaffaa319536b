#!/usr/bin/env bash
# A throwaway OCI registry on loopback, for the stacyvm-images tests.
#
#   registry.sh install     install docker-registry and skopeo (Debian/Ubuntu) if missing
#   registry.sh start DIR   start a registry on 127.0.0.1:<free port>, config and storage
#                           under DIR (created); installs first if needed; prints
#                             REGISTRY_ADDR=127.0.0.1:<port>
#                             REGISTRY_PID=<pid>
#   registry.sh stop DIR    stop the registry started with DIR
#
# The registry runs detached (its output goes to DIR/registry.log) until stopped.
set -euo pipefail

need_install() {
    ! command -v docker-registry >/dev/null 2>&1 || ! command -v skopeo >/dev/null 2>&1
}

install() {
    if ! need_install; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "registry.sh: docker-registry and skopeo are missing and apt-get is not available" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    echo "registry.sh: installing docker-registry and skopeo" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        docker-registry skopeo >&2
    # The package may enable a system-wide registry on :5000; it is not ours.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
}

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    echo "registry.sh: no free port found" >&2
    exit 1
}

ready() {
    local addr="$1"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null "http://$addr/v2/" 2>/dev/null
    else
        (exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}") 2>/dev/null
    fi
}

start() {
    local dir="$1"
    install
    mkdir -p "$dir/storage"
    dir="$(cd "$dir" && pwd)"
    local port addr pid
    for attempt in 1 2 3; do
        port="$(free_port)"
        addr="127.0.0.1:$port"
        cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: $addr
  secret: stacyvm-images-test
EOF
        setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$dir/registry.pid"
        for _ in $(seq 1 100); do
            if ready "$addr"; then
                echo "REGISTRY_ADDR=$addr"
                echo "REGISTRY_PID=$pid"
                return 0
            fi
            if ! kill -0 "$pid" 2>/dev/null; then
                break
            fi
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        echo "registry.sh: registry did not start on $addr (attempt $attempt):" >&2
        tail -n 5 "$dir/registry.log" >&2 || true
    done
    exit 1
}

stop() {
    local dir="$1" pid
    pid="$(cat "$dir/registry.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/registry.pid"
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: registry.sh start DIR}" ;;
    stop) stop "${2:?usage: registry.sh stop DIR}" ;;
    *)
        echo "usage: registry.sh install | start DIR | stop DIR" >&2
        exit 2
        ;;
esac
