#!/usr/bin/env bash
# The fleet simulation (issue 11 item 5, tests/src/bin/fleet.rs): 100,000 devices enrolled within
# one hour, 90-day certificates, 180 days, a 24-hour CA outage, scheduled by enroll_agent's own
# renewal_time / guarded_renewal_time / backoff. Prints requests per minute at the CA and the
# peak ÷ mean figures for today's policy and the proposals, and redraws tests/bench/fleet/fleet.png.
# Not part of scripts/test.sh. Takes a few seconds once built.
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --locked --quiet --release -p enroll-tests --bin fleet
work=$(mktemp -d /tmp/enroll-fleet.XXXXXX)
trap 'rm -rf "$work"' EXIT
target/release/fleet "$work/fleet.csv"
python3 -c 'import matplotlib' 2> /dev/null || python3 -m pip install --quiet matplotlib
python3 tests/bench/fleet/plot.py "$work/fleet.csv" tests/bench/fleet/fleet.png
echo "drew tests/bench/fleet/fleet.png"
