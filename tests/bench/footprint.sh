#!/usr/bin/env bash
# Footprint figures of the static release binary (printed, never asserted): size, and wall time,
# CPU time and peak RSS of one enroll and one forced renewal per backend against the bundled
# emulator, measured with /usr/bin/time -v.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=x86_64-unknown-linux-musl
cargo build --locked --quiet --release --target "$target" -p enroll-agent
# --all-features: the same debug build as the tests (scripts/test.sh), so nothing is rebuilt.
cargo build --locked --quiet --workspace --bins --all-features
agent=target/$target/release/enroll-agent
work=$(mktemp -d /tmp/enroll-bench.XXXXXX)
chmod 700 "$work"
. tests/emulator.sh
start_emulator "$work/emu"

measure() {  # label, agent args...
  local label=$1; shift
  /usr/bin/time -v "$agent" -q "$@" > /dev/null 2> "$work/time.txt"
  awk -v label="$label" -F': ' '
    /Maximum resident set size/ { rss = $2 }
    /Elapsed \(wall clock\)/    { wall = $2 }
    /User time/                 { user = $2 }
    /System time/               { sys = $2 }
    END { printf "  %-22s peak RSS %6d KiB  wall %s  cpu %.2f s\n", label, rss, wall, user + sys }' "$work/time.txt"
}

printf 'enroll-agent %s static binary: %d bytes (%s)\n' "$target" "$(stat -c %s "$agent")" "$(file -b "$agent" | cut -d, -f1-2)"
for ca in enos ezca; do
  config=$work/emu/agent-$ca.json
  measure "$ca enroll" -c "$config" enroll
  measure "$ca renew --force" -c "$config" renew --force
  measure "$ca status" -c "$config" status
done
