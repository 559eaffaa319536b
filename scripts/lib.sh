# shellcheck shell=bash
# Shared helpers for StacyVM's host scripts (setup-host.sh, build-test-image.sh).
# Source it; it does not change shell options of its caller.

# Repository root: this file lives in <repo>/scripts/.
STACYVM_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export STACYVM_REPO_ROOT
: "${STACYVM_CACHE_DIR:=$STACYVM_REPO_ROOT/.ci/cache}"
export STACYVM_CACHE_DIR

log() { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

ensure_cache_dir() {
  mkdir -p "$STACYVM_CACHE_DIR"
}

# Seconds since the epoch with millisecond resolution, and a pretty delta.
now_ms() { date +%s%3N; }
elapsed_since() { # $1 = start from now_ms
  local d=$(( $(now_ms) - $1 ))
  printf '%d.%03ds' $(( d / 1000 )) $(( d % 1000 ))
}

require_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 must run as root (it installs packages / runs dockerd)"
}

# ---------------------------------------------------------------------------
# apt

_apt_updated=0

pkg_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

# ensure_apt_packages PKG... : install the missing ones; `apt-get update` at
# most once per process and only if something has to be installed.
ensure_apt_packages() {
  local missing=() p
  for p in "$@"; do
    pkg_installed "$p" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "apt packages already installed: $*"
    return 0
  fi
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
  if [ "$_apt_updated" -eq 0 ]; then
    apt-get update -q
    _apt_updated=1
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ---------------------------------------------------------------------------
# Debian mirror: the one apt on this host uses for <suite>, else deb.debian.org.

# Prints the first URI of an enabled `deb` source for exactly <suite>, from
# sources.list / sources.list.d/*.list (one-line format) and
# sources.list.d/*.sources (deb822), in the order apt reads them.
apt_mirror_for_suite() {
  local suite="$1" f uri
  local files=()
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  # apt reads sources.list.d in lexical order regardless of the extension.
  if [ ${#files[@]} -gt 1 ]; then
    local first="${files[0]}" rest
    if [ "$first" = /etc/apt/sources.list ]; then
      mapfile -t rest < <(printf '%s\n' "${files[@]:1}" | LC_ALL=C sort)
      files=("$first" "${rest[@]}")
    else
      mapfile -t files < <(printf '%s\n' "${files[@]}" | LC_ALL=C sort)
    fi
  fi
  for f in "${files[@]}"; do
    case "$f" in
      *.sources) uri="$(_deb822_mirror "$suite" <"$f")" ;;
      *) uri="$(_oneline_mirror "$suite" <"$f")" ;;
    esac
    if [ -n "$uri" ]; then
      printf '%s\n' "${uri%/}"
      return 0
    fi
  done
  return 1
}

_oneline_mirror() {
  awk -v suite="$1" '
    { sub(/#.*/, "") }
    $1 != "deb" { next }
    {
      i = 2
      if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
      uri = $i; s = $(i + 1)
      if (s == suite && uri ~ /^(https?|file):/) { print uri; exit }
    }'
}

_deb822_mirror() {
  awk -v suite="$1" '
    function flush(   n, u, t, s) {
      if (!done && enabled != "no" && uris != "") {
        t = " " types " "; s = " " suites " "
        if (t ~ / deb / && s ~ (" " suite " ")) {
          n = split(uris, u, /[ \t]+/)
          for (k = 1; k <= n; k++) if (u[k] ~ /^(https?|file):/) { print u[k]; done = 1; break }
        }
      }
      types = ""; suites = ""; uris = ""; enabled = ""; key = ""
    }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    {
      line = $0
      if (line ~ /^[A-Za-z0-9-]+:/) {
        p = index(line, ":"); key = tolower(substr(line, 1, p - 1)); val = substr(line, p + 1)
      } else { val = line }
      gsub(/^[ \t]+|[ \t]+$/, "", val)
      if (key == "types") types = types " " val
      else if (key == "suites") suites = suites " " val
      else if (key == "uris") uris = uris " " val
      else if (key == "enabled") enabled = tolower(val)
    }
    END { flush() }'
}

# ---------------------------------------------------------------------------
# docker daemon

docker_ready() { docker info >/dev/null 2>&1; }

_pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Reuse a reachable daemon; otherwise start our own dockerd (no bridge, no
# iptables: containers never get a route to the host's networks) and wait for
# it. Safe to call repeatedly.
ensure_dockerd() {
  if docker_ready; then
    log "docker daemon already running (reusing it)"
    return 0
  fi
  command -v dockerd >/dev/null 2>&1 || die "dockerd not found (install docker.io: scripts/setup-host.sh)"
  ensure_cache_dir
  local log_file="$STACYVM_CACHE_DIR/dockerd.log" pid_file="$STACYVM_CACHE_DIR/dockerd.pid"
  local pid="" sys_pid=""
  local sys_pid_file="${STACYVM_SYSTEM_DOCKERD_PIDFILE:-/var/run/docker.pid}"
  [ -f "$sys_pid_file" ] && sys_pid="$(cat "$sys_pid_file" 2>/dev/null || true)"
  [ -f "$pid_file" ] && pid="$(cat "$pid_file" 2>/dev/null || true)"
  if _pid_alive "$pid"; then
    log "waiting for the dockerd we started earlier (pid $pid)"
  elif _pid_alive "$sys_pid"; then
    # Someone else's dockerd is starting (or wedged); a second one would just
    # fail on its pid file, so wait for that one instead.
    pid="$sys_pid"
    log "waiting for the already running dockerd (pid $pid)"
  else
    log "starting dockerd (--bridge=none --iptables=false --ip6tables=false), log: $log_file"
    setsid nohup dockerd --bridge=none --iptables=false --ip6tables=false \
      </dev/null >>"$log_file" 2>&1 &
    pid=$!
    echo "$pid" >"$pid_file"
  fi
  local deadline=$(( SECONDS + 60 ))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if docker_ready; then
      log "docker daemon ready (pid $pid)"
      return 0
    fi
    if ! _pid_alive "$pid"; then
      break
    fi
    sleep 0.5
  done
  if [ -f "$log_file" ]; then
    printf -- '--- last lines of %s ---\n' "$log_file" >&2
    tail -n 30 "$log_file" >&2 || true
  fi
  if _pid_alive "$pid"; then
    die "docker daemon (pid $pid) did not become ready within 60 s"
  fi
  die "dockerd (pid $pid) exited before becoming ready"
}

# The test image in the native image store that the Rust tests (native,
# proot), the end-to-end suite and the conformance runs share.
#   $1 = stacyvm binary, $2 = image store dir, $3 = image name, $4 = rootfs tarball
ensure_native_image() {
  local bin="$1" store="$2" image="$3" tar="$4"
  if STACYVM_IMAGE_DIR="$store" "$bin" image ls 2>/dev/null | grep -q "${image%%:*}"; then
    info "image $image already in $store"
    return 0
  fi
  [ -f "$tar" ] || die "$tar not found; run scripts/setup-host.sh"
  log "importing $tar as $image into $store"
  STACYVM_IMAGE_DIR="$store" "$bin" image import "$tar" "$image"
}
