#!/usr/bin/env bash
# Figures for the key providers (issue 4): release binary size with and without each hardware
# feature (dynamic glibc builds; the static musl build has software keys only), and signing
# latency per provider (release builds of hal's provider tests, 100 signatures each; SoftHSM2
# and swtpm run on this machine, so these are software-token figures, not device figures).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/hw-deps.sh
echo "release binary (x86_64-unknown-linux-gnu, opt-level z, LTO, stripped):"
for features in "" pkcs11 tpm pkcs11,tpm; do
  cargo build --locked --quiet --release -p enroll-agent ${features:+--features "$features"}
  size=$(stat -c %s target/release/enroll-agent)
  libs=$(ldd target/release/enroll-agent | awk '{print $1}' | grep -E 'tss2|crypto|softhsm|p11' | tr '\n' ' ' || true)
  printf '  %-12s %9d bytes  %s\n' "${features:-none}" "$size" "${libs:+links: $libs}"
done
echo "signing latency:"
export CI=1  # a provider that cannot run is a failure here, not a skip
cargo test --locked --quiet --release -p enroll-hal --features pkcs11,tpm \
  --test soft_latency --test pkcs11 --test tpm -- --nocapture latency 2>&1 |
  grep -E 'latency|per signature|generate' | sed 's/^/  /'
