#!/usr/bin/env bash
# Build the sandbox test image locally (no container registry needed):
# a Debian bookworm rootfs with python3, made with debootstrap from the Debian
# mirror this host's apt uses, cached as a tarball and imported into dockerd.
#
#   scripts/build-test-image.sh
#
# Environment:
#   STACYVM_TEST_IMAGE      image name (default stacyvm-test/python:bookworm)
#   STACYVM_CACHE_DIR       cache dir (default <repo>/.ci/cache)
#   STACYVM_DEBIAN_MIRROR   Debian mirror (default: apt's, else deb.debian.org)
#   STACYVM_TEST_IMAGE_DOCKER=0  only build the rootfs tarball (no Docker needed)
#
# Idempotent: the rootfs tarball is rebuilt only when the recipe below changes,
# the image is re-imported only when the tarball changed.
set -euo pipefail

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

IMAGE="${STACYVM_TEST_IMAGE:-stacyvm-test/python:bookworm}"
LABEL_KEY="org.stacyvm.test-image-hash"

# --- recipe: anything that changes the rootfs belongs here (bump RECIPE_REV
# when changing the build/strip steps below in a way the variables don't show).
RECIPE_REV=2
SUITE=bookworm
VARIANT=minbase
# python3 = interpreter + full stdlib (json, sqlite3, ssl, ...); no pip/venv.
INCLUDE=python3-minimal,python3
ARCH="$(dpkg --print-architecture)"

recipe_text() {
  printf 'rev=%s\nsuite=%s\nvariant=%s\ninclude=%s\narch=%s\n' \
    "$RECIPE_REV" "$SUITE" "$VARIANT" "$INCLUDE" "$ARCH"
}

start_ms="$(now_ms)"
require_root "build-test-image.sh"

IMAGES_DIR="$STACYVM_CACHE_DIR/images"
TARBALL="$IMAGES_DIR/python-$SUITE.tar"
STAMP="$TARBALL.stamp"
mkdir -p "$IMAGES_DIR"

# One build at a time per cache dir.
exec 9>"$IMAGES_DIR/.lock"
flock 9

RECIPE_HASH="$(recipe_text | sha256sum | cut -c1-16)"

stamp_get() { # key -> value from the stamp file
  [ -f "$STAMP" ] || return 0
  sed -n "s/^$1=//p" "$STAMP" | head -n1
}

# Remove a build dir; debootstrap mounts proc/sys inside its target, so first
# unmount anything below it and never rm -rf across a mount point.
remove_build_dir() {
  local dir="$1" m
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
  rm -rf --one-file-system "$dir"
}
BUILD_DIR=""
cleanup() { remove_build_dir "$BUILD_DIR"; BUILD_DIR=""; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Leftovers of a run that was killed outright (we hold the lock, so no other
# build is using them).
for d in "$IMAGES_DIR"/.build.*; do
  if [ -d "$d" ]; then remove_build_dir "$d"; fi
done

build_rootfs() {
  command -v debootstrap >/dev/null 2>&1 || ensure_apt_packages debootstrap debian-archive-keyring
  local mirror="${STACYVM_DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror="$(apt_mirror_for_suite "$SUITE" || true)"
    mirror="${mirror:-http://deb.debian.org/debian}"
  fi
  log "debootstrap $SUITE ($VARIANT, +$INCLUDE) from $mirror"
  BUILD_DIR="$(mktemp -d "$IMAGES_DIR/.build.XXXXXX")"
  local root="$BUILD_DIR/rootfs" t0
  t0="$(now_ms)"
  if ! debootstrap --variant="$VARIANT" --arch="$ARCH" --include="$INCLUDE" \
      "$SUITE" "$root" "$mirror" >"$BUILD_DIR/debootstrap.log" 2>&1; then
    tail -n 30 "$BUILD_DIR/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (mirror $mirror)"
  fi
  info "debootstrap took $(elapsed_since "$t0")"

  log "stripping rootfs"
  # Host-specific files debootstrap copies in; docker provides its own.
  rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
  : >"$root/etc/hosts"
  # Package lists and caches (apt-get update in the image refetches them).
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
    "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
    "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* "$root"/run/*
  # Docs, man/info pages, translations (keep the copyright files).
  find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete 2>/dev/null || true
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/usr/share/lintian "$root"/usr/share/linda
  # (The stdlib's __pycache__ stays: it makes each python3 start ~0.15 s faster.)
  # The runtime mounts its own /dev, /proc, /sys.
  find "$root/dev" -mindepth 1 -delete 2>/dev/null || true
  mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/tmp"
  chmod 1777 "$root/tmp"

  log "packing rootfs into $TARBALL"
  local tmp_tar="$BUILD_DIR/rootfs.tar"
  tar --numeric-owner --one-file-system --sort=name -C "$root" -cf "$tmp_tar" .
  local sha
  sha="$(sha256sum "$tmp_tar" | cut -c1-64)"
  mv -f "$tmp_tar" "$TARBALL"
  printf 'recipe=%s\ntar_sha256=%s\ntar_size=%s\nmirror=%s\n' \
    "$RECIPE_HASH" "$sha" "$(stat -c %s "$TARBALL")" "$mirror" >"$STAMP.tmp"
  mv -f "$STAMP.tmp" "$STAMP"
  cleanup
}

# --- 1. rootfs tarball
if [ -f "$TARBALL" ] && [ "$(stamp_get recipe)" = "$RECIPE_HASH" ] \
    && [ "$(stamp_get tar_size)" = "$(stat -c %s "$TARBALL")" ]; then
  log "rootfs tarball up to date ($TARBALL, recipe $RECIPE_HASH)"
else
  build_rootfs
fi
TAR_SHA="$(stamp_get tar_sha256)"
[ -n "$TAR_SHA" ] || die "stamp $STAMP has no tar_sha256"

if [ "${STACYVM_TEST_IMAGE_DOCKER:-1}" = 0 ]; then
  log "rootfs tarball ready: $TARBALL (docker import skipped); took $(elapsed_since "$start_ms")"
  exit 0
fi

# --- 2. docker image
ensure_dockerd
current="$(docker image inspect -f "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$IMAGE" 2>/dev/null || true)"
if [ "$current" = "$TAR_SHA" ]; then
  log "image $IMAGE up to date ($LABEL_KEY=${TAR_SHA:0:16})"
else
  old_id="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
  log "importing $TARBALL as $IMAGE"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'WORKDIR /' \
    --change "LABEL $LABEL_KEY=$TAR_SHA" \
    --change 'CMD ["/bin/sh"]' \
    "$TARBALL" "$IMAGE" >/dev/null
  # Drop the previous import if nothing else refers to it any more.
  if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    docker image rm "$old_id" >/dev/null 2>&1 || true
  fi
fi

# --- 3. verify
out="$(docker run --rm --network none "$IMAGE" python3 -c 'print(40 + 2)')" \
  || die "running python3 in $IMAGE failed"
[ "$out" = 42 ] || die "unexpected output from $IMAGE: '$out' (wanted 42)"
size="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
log "image $IMAGE ok (python3 prints 42; $(( size / 1000000 )) MB); took $(elapsed_since "$start_ms")"
