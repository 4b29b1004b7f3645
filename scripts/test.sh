#!/usr/bin/env bash
# Runs every test: unit tests of hal and agent, the CA emulators' own tests, and the end-to-end
# suites that drive the real enroll-agent binary against the emulators.
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests run target/debug/enroll-agent: build the binaries first.
cargo build --locked --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace --no-fail-fast
fi
