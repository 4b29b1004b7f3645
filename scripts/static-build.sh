#!/usr/bin/env bash
# Builds the fully static x86_64 musl release binary and prints its size and linkage (figures,
# not assertions). rustc ships the musl CRT, and host gcc compiles ring's C, so nothing else is
# needed (shared/tooling.md §5).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
cargo build --locked --release --target "$target" -p enroll-agent
bin=target/$target/release/enroll-agent
size=$(stat -c %s "$bin")
printf 'static binary: %s\n  size: %d bytes (%.2f MiB)\n  file: %s\n' "$bin" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$(file -b "$bin")"
"$bin" --version
