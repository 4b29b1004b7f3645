#!/usr/bin/env bash
# Prints how many HTTP requests one enrollment and one renewal make per CA backend, counted in the
# emulator's request log (GET /_emulator/log). Sectigo and the TSB approval flow are asynchronous:
# their counts include the polls (the emulator answers "not ready" once, its default).
set -euo pipefail
cd "$(dirname "$0")/../.."
# --all-features: the same debug build as the tests (scripts/test.sh), so nothing is rebuilt.
cargo build --locked --quiet --workspace --bins --all-features
bin=target/debug
work=$(mktemp -d /tmp/enroll-requests.XXXXXX)
. tests/emulator.sh
start_emulator "$work/emu"
url=$emulator_url
count() { curl -s --cacert "$work/emu/tls-root.pem" "$url/_emulator/log" | grep -vc '"/_emulator/' || true; }
paths() { curl -s --cacert "$work/emu/tls-root.pem" "$url/_emulator/log" | grep -v '"/_emulator/' | tail -n "$1" |
  sed -E 's/.*"method":"([A-Z]+)".*"path":"([^"]*)".*/\1 \2/' | sed -E 's#/[0-9a-f-]{8,}$#/{id}#; s#/[0-9]{5,}(/|$)#/{id}\1#' | sort | uniq -c | sed -E 's/^ +//' | paste -sd ',' -; }
printf '%-20s %8s %8s  %s\n' backend enroll renew 'renewal requests'
for ca in enos ezca sectigo securosys securosys-approval redtrust-enos; do
  before=$(count)
  "$bin/enroll-agent" -q -c "$work/emu/agent-$ca.json" enroll > /dev/null
  middle=$(count)
  "$bin/enroll-agent" -q -c "$work/emu/agent-$ca.json" renew --force > /dev/null
  after=$(count)
  printf '%-20s %8d %8d  %s\n' "$ca" $((middle - before)) $((after - middle)) "$(paths $((after - middle)))"
done
