#!/usr/bin/env bash
# Build StacyVM: the server/CLI binary and the static in-sandbox agent.
#   target/release/stacyvm
#   target/<host triple>/release/stacyvm-agent   (statically linked; the
#   server finds it there, or beside itself once installed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
    [ -x "$d/cargo" ] && PATH="$d:$PATH" && break
  done
fi
command -v cargo >/dev/null 2>&1 || {
  echo "error: cargo not found. StacyVM needs a Rust toolchain >= 1.80 (https://rustup.rs)." >&2
  exit 1
}
export CARGO_INCREMENTAL=0
triple="$(rustc -vV | sed -n 's/^host: //p')"
start=$(date +%s)
echo "==> building stacyvm (release)"
cargo build --release --locked -p stacyvm
echo "==> building stacyvm-agent (release, static, $triple)"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p stacyvm-agent --target "$triple"
echo "==> built in $(( $(date +%s) - start ))s: target/release/stacyvm, target/$triple/release/stacyvm-agent"
