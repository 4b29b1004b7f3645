#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (design.md §11) and ends with `N passed, M failed`.
# A target fails on a crash (panic, failed assertion, arithmetic overflow), a hang (one input
# running longer than TIMEOUT_S) or running out of memory (RSS over RSS_MB); the exit status is
# then 1.
#
#   bash tests/fuzz/run.sh SECONDS [TARGET...]
#
# Seeds are tests/fuzz/corpus/<target>/ (committed); what libFuzzer adds goes to
# tests/fuzz/work/<target>/, crash inputs to tests/fuzz/artifacts/<target>/, logs to
# tests/fuzz/work/<target>.log (all three gitignored). Build output: tests/fuzz/target/.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:?usage: bash tests/fuzz/run.sh SECONDS [TARGET...]}
shift
[[ $seconds =~ ^[0-9]+$ ]] || { echo "SECONDS must be a whole number, not $seconds" >&2; exit 2; }
TIMEOUT_S=${TIMEOUT_S:-10}
RSS_MB=${RSS_MB:-2048}
# CA answers are at most 64 KiB (http::MAX_BODY_BYTES); real ones are a few KiB.
MAX_LEN=${MAX_LEN:-16384}

# cargo-fuzz passes nightly-only flags (-Zsanitizer, sancov passes); only stable Rust is
# installed, and RUSTC_BOOTSTRAP lets it accept them.
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

# No AddressSanitizer: every crate of ours forbids unsafe code, so ASan would only slow the
# runs; panics, overflow checks (-a) and libFuzzer's timeout and RSS limits are the oracles.
build=(--fuzz-dir . --sanitizer none --debug-assertions --release)
cargo fuzz build "${build[@]}"

if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir .)
fi
bin_dir=target/x86_64-unknown-linux-gnu/release

passed=0
failed=0
for target in "${targets[@]}"; do
  mkdir -p "work/$target" "artifacts/$target" "corpus/$target"
  log="work/$target.log"
  status=0
  # The first directory receives new inputs; the committed seeds are read only.
  "$bin_dir/$target" "work/$target" "corpus/$target" \
    -max_total_time="$seconds" -timeout="$TIMEOUT_S" -rss_limit_mb="$RSS_MB" -max_len="$MAX_LEN" \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 >"$log" 2>&1 || status=$?
  stats=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  if ((status == 0)); then
    passed=$((passed + 1))
    echo "PASS $target: ${execs:-?} executions in ${seconds} s, ${stats:-no stats}"
  else
    failed=$((failed + 1))
    echo "FAIL $target (exit $status): ${stats:-no stats}; input in tests/fuzz/artifacts/$target/, log $log"
    grep -E '^(==[0-9]+== ERROR|thread .* panicked|SUMMARY|ALARM|.*out-of-memory)' "$log" | head -n 5 | sed 's/^/  /' || true
  fi
done
echo "$passed passed, $failed failed"
((failed == 0))
