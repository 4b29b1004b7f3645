#!/usr/bin/env bash
# The main job, end to end on this machine: start the bundled CA emulator (EnOS, EZCA, Sectigo
# SCM, Securosys TSB, Redtrust, EST), then run the real agent against each: first enrollment,
# status, forced renewal, status. Sectigo and the TSB approval flow are asynchronous (the agent
# polls); the Redtrust run keeps its key on the Redtrust server and has EnOS issue the certificate;
# EST enrolls with a factory certificate (or a one-time password) and renews over TLS client
# authentication with the device's own certificate.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --quiet --workspace --bins
bin=target/debug
work=$(mktemp -d /tmp/enroll-agent-demo.XXXXXX)
chmod 700 "$work"

"$bin/ca-emulator" --dir "$work/emulator" > "$work/emulator.out" &
emulator=$!
trap 'kill "$emulator" 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q '^ca-emulator ready' "$work/emulator.out" 2>/dev/null && break; sleep 0.1; done
grep '^ca-emulator ready' "$work/emulator.out" || { echo "the emulator did not start" >&2; exit 1; }

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
for ca in enos ezca sectigo securosys securosys-approval redtrust-enos est est-basic; do
  config=$work/emulator/agent-$ca.json
  printf '\n======== %s (config %s)\n' "$ca" "$config"
  step "$bin/enroll-agent" -c "$config" enroll
  step "$bin/enroll-agent" -c "$config" status
  step "$bin/enroll-agent" -c "$config" renew --force
  step "$bin/enroll-agent" -c "$config" status
  state=$(dirname "$config")/state-$ca
  printf '\nThe %s identity is in %s/current/ (%s); previous/ holds the one before.\n' "$ca" "$state" \
    "$(cd "$state/current" && echo *)"
done
printf '\nEverything is under %s (remove it when done).\n' "$work"
