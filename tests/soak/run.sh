#!/usr/bin/env bash
# Soak (issue 11 item 4): DEVICES real `enroll-agent run` processes renew certificates that live
# SOAK_LIFETIME_S seconds (default 180) through `enroll-gateway serve` (SQLite) in front of the
# EnOS emulator for MINUTES, with a burst of CA 503s in the middle; prints per-sample figures
# (certificates issued, upstream requests, peak RSS, open fds, slots) and fails on a broken
# invariant or a leak (see tests/soak/soak.py). A long run, not part of CI:
#   bash tests/soak/run.sh [MINUTES=60] [DEVICES=200]
# 200 devices renew about every 72 s each: 10,000 renewals take about an hour.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --locked --quiet --workspace --bins --all-features
exec python3 tests/soak/soak.py "${1:-60}" "${2:-200}"
