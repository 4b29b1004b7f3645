#!/usr/bin/env bash
# cross/minimal.sh — the smallest aarch64 build we know works, for images where every KiB counts,
# then the same qemu end-to-end run as the product build (EnOS and EZCA).
#
# It rebuilds std from source with panics that abort at once (no unwinding or panic messages:
# the agent installs no panic hook and its release profile already aborts), which needs unstable
# compiler flags on the stable toolchain (RUSTC_BOOTSTRAP=1, `-Zbuild-std`, `-Cpanic=immediate-abort`,
# `-Zlocation-detail=none`; and no unwind tables, which nothing reads once panics abort). These flags change between Rust releases, so this is an opt-in
# build for a pinned toolchain, not the default; README's Dependencies section gives the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-musl
rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/minimal}
unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Zunstable-options -Cpanic=immediate-abort -Zlocation-detail=none -Cforce-unwind-tables=no"
# RUSTFLAGS replaces the config's per-target rustflags; aarch64 musl has none, so nothing is lost.
cargo build --locked --release -p enroll-agent --target "$target" -Zbuild-std=std,panic_abort
bin=$CARGO_TARGET_DIR/$target/release/enroll-agent
size=$(stat -c %s "$bin")
printf 'minimal %s: %d bytes (%.3f MiB), %s\n' "$target" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" \
  "$(file -b "$bin" | sed -E 's/, BuildID\[[^]]*\]=[0-9a-f]+//')"
unset RUSTFLAGS RUSTC_BOOTSTRAP
CROSS_NO_BUILD=1 CROSS_E2E_TARGETS=$target bash cross/qemu-e2e.sh
