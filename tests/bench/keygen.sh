#!/usr/bin/env bash
# RSA-2048 key generation, ours against OpenSSL (issue 13 goal: within 1.5x of
# `openssl genrsa 2048`). Both run as processes, ROUNDS times each, interleaved so that machine
# load hits both alike; CPU time (user + sys) from wait4(2) (tests/bench/rusage.c). Ours is
# hal/examples/rsa_keygen.rs in the release profile, the code path of a file key's generation.
# Prime search is random, so single runs vary 5x; the median of ROUNDS (default 31) is the figure.
# Prints figures only; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-31}
work=$(mktemp -d /tmp/enroll-keygen.XXXXXX)
trap 'rm -rf "$work"' EXIT
cargo build --locked --quiet --release -p enroll-hal --example rsa_keygen
gcc -O2 -o "$work/rusage" tests/bench/rusage.c
ours=${CARGO_TARGET_DIR:-target}/release/examples/rsa_keygen

cpu_ms() {  # label command...: one run, appends its CPU milliseconds to $work/label
  local label=$1; shift
  "$work/rusage" "$work/time" "$@" > /dev/null 2>&1
  awk '{ printf "%.1f\n", ($2 + $3) * 1000 }' "$work/time" >> "$work/$label"
}

for ((i = 0; i < rounds; i++)); do
  cpu_ms ours "$ours"
  cpu_ms openssl openssl genrsa -out /dev/null 2048
done

stats() {  # label: "median min max" in ms
  sort -n "$work/$1" | awk '{ v[NR] = $1 } END { printf "%.1f %.1f %.1f", v[int((NR + 1) / 2)], v[1], v[NR] }'
}
read -r ours_median ours_min ours_max <<<"$(stats ours)"
read -r ossl_median ossl_min ossl_max <<<"$(stats openssl)"
echo "RSA-2048 key generation, CPU ms over $rounds runs each ($(openssl version | cut -d' ' -f1-2))"
printf '  %-28s median %7.1f  min %7.1f  max %7.1f\n' "enroll-agent (rsa_keygen.rs)" "$ours_median" "$ours_min" "$ours_max"
printf '  %-28s median %7.1f  min %7.1f  max %7.1f\n' "openssl genrsa 2048" "$ossl_median" "$ossl_min" "$ossl_max"
awk -v a="$ours_median" -v b="$ossl_median" 'BEGIN { printf "  ratio of medians (ours / openssl): %.2f (goal: at most 1.5)\n", a / b }'
