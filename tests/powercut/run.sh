#!/usr/bin/env bash
# Power cuts (issue 11 item 2): traces the agent's file-system calls during a first-boot `enroll`
# and a `renew --force` against the emulator (EnOS, Sectigo with a pending request, EST, ACME with
# its account key; file keys), builds every on-disk state a power
# cut could leave under the persistence model in tests/powercut/powercut.py, and checks
# design.md §4 in each (check passes, at most one orphan slot, the next run converges). Ends with
# "N states explored, M violations"; exit 1 on any violation. Needs strace.
#   bash tests/powercut/run.sh [MAX_STATES_PER_CUT=64]
# POWERCUT_IGNORE_SYNCS=1 is the explorer's self-test: it pretends no fsync happened, and must
# then report violations (an empty key.pem behind a `current` that survived).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v strace >/dev/null || { echo "strace is not installed (Debian package strace)" >&2; exit 1; }
cargo build --locked --quiet --workspace --bins --all-features
work=$(mktemp -d /tmp/enroll-powercut.XXXXXX)
chmod 700 "$work"
. tests/emulator.sh
start_emulator "$work/emulator"
POWERCUT_MAX_STATES_PER_CUT=${1:-64} python3 tests/powercut/powercut.py "$PWD/target/debug/enroll-agent" \
  "$work/emulator/agent-enos.json" "$work/emulator/agent-sectigo.json" "$work/emulator/agent-est.json" \
  "$work/emulator/agent-acme.json"
