#!/usr/bin/env bash
# Runs every test: unit tests of hal and agent, the CA emulators' own tests, the key-provider
# contract suite (software keys, SoftHSM2 over PKCS#11, swtpm over TPM 2.0), and the end-to-end
# suites that drive the real enroll-agent binary against the emulators.
set -euo pipefail
cd "$(dirname "$0")/.."
# The hardware providers need libtss2 to build and SoftHSM2/swtpm to test.
bash scripts/hw-deps.sh
# The end-to-end tests run target/debug/enroll-agent: build it first, with every provider (the
# dynamic build; the static product build in scripts/static-build.sh has software keys only).
features=(--all-features)
cargo build --locked --workspace --bins "${features[@]}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace "${features[@]}" --no-fail-fast
else
  cargo test --locked --workspace "${features[@]}" --no-fail-fast
fi
