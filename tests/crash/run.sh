#!/usr/bin/env bash
# Random kills (design.md §11, issue 11): SIGKILLs the real agent COUNT times at uniformly random
# instants during enroll, renew --force and run, for every backend (file keys), a Redtrust key,
# and SoftHSM2 and swtpm keys where this machine and build have them; checks design.md §4 after each kill and
# after the next run. Ends with "N passed, M failed". ENROLL_CRASH_SEED=<seed> repeats a run.
#   bash tests/crash/run.sh COUNT
set -euo pipefail
cd "$(dirname "$0")/../.."
count=${1:-100}
cargo build --locked --workspace --bins --all-features -q
log=$(mktemp)
status=0
ENROLL_CRASH_COUNT=$count cargo test --locked -q --all-features -p enroll-tests --test crash -- \
  --ignored --nocapture random_kills >"$log" 2>&1 || status=$?
grep -E '^(random kills|kill |calibration|kills that|SoftHSM2 token|SKIPPED|.* takes [0-9]+ ms)' "$log" || true
if [ "$status" -ne 0 ]; then
  grep -E "panicked|^  (left|right)|error" "$log" | head -20 || true
fi
summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 || true)
rm -f "$log"
echo "${summary:-0 passed, 1 failed}"
exit "$status"
