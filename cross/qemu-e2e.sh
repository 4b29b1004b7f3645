#!/usr/bin/env bash
# cross/qemu-e2e.sh — end-to-end run of the cross-built static enroll-agent binaries under
# qemu-user against the bundled CA emulator.
#
# 1. Builds the cross binaries (cross/build.sh; set CROSS_NO_BUILD=1 to reuse the ones already in
#    target/<triple>/release) and the host `ca-emulator`.
# 2. Starts `ca-emulator --dir D` (it writes agent-<ca>.json configs, the TLS root and secrets).
# 3. For every target and CA: copies the emulator's config with its own state_dir, then runs
#    `enroll`, `status --json`, `renew --force`, `status --json`; checks each exit code, that both
#    statuses say "state": "valid", and that renewal changed the serial.
#    aarch64 runs under qemu-aarch64-static, armv7 under qemu-arm-static (binfmt_misc is not
#    assumed), x86_64 musl natively as the baseline.
# 4. Prints the wall time of every step; exits non-zero on any failure.
#
# Idempotent: the work dir (target/cross-e2e) is recreated on every run. CARGO_TARGET_DIR is honoured.
# Env: CROSS_E2E_TARGETS (default: "aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf
#      x86_64-unknown-linux-musl"), CROSS_E2E_CAS (default: "enos ezca"; any of enos ezca sectigo
#      securosys securosys-approval redtrust-enos), CROSS_NO_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tdir=${CARGO_TARGET_DIR:-target}
[[ $tdir == /* ]] || tdir=$root/$tdir

read -r -a targets <<<"${CROSS_E2E_TARGETS:-aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl}"
read -r -a cas <<<"${CROSS_E2E_CAS:-enos ezca}"

runner_for() {
  case $1 in
    aarch64-*) echo qemu-aarch64-static ;;
    armv7-* | arm-*) echo qemu-arm-static ;;
    x86_64-*) echo "" ;;
    *) echo "cross/qemu-e2e.sh: no runner for $1" >&2; return 64 ;;
  esac
}

if [[ ${CROSS_NO_BUILD:-0} != 1 ]]; then
  bash cross/build.sh "${targets[@]}"
fi
for t in "${targets[@]}"; do
  [[ -x $tdir/$t/release/enroll-agent ]] || { echo "missing $tdir/$t/release/enroll-agent (run cross/build.sh)" >&2; exit 1; }
  r=$(runner_for "$t")
  [[ -z $r ]] || command -v "$r" >/dev/null || { echo "missing $r (apt-get install qemu-user-static)" >&2; exit 1; }
done

echo "== ca-emulator (host)"
cargo build --locked -p enroll-tests --bin ca-emulator
emulator_bin=$tdir/debug/ca-emulator

work=$tdir/cross-e2e
rm -rf "$work"
mkdir -p "$work/configs" "$work/state" "$work/logs"
chmod 700 "$work" "$work/state"

emulator_pid=
cleanup() { [[ -z $emulator_pid ]] || kill "$emulator_pid" 2>/dev/null || true; }
trap cleanup EXIT
"$emulator_bin" --dir "$work/emulator" >"$work/emulator.out" 2>"$work/emulator.err" &
emulator_pid=$!
for _ in $(seq 200); do
  grep -q '^ca-emulator ready' "$work/emulator.out" 2>/dev/null && break
  kill -0 "$emulator_pid" 2>/dev/null || break
  sleep 0.1
done
grep '^ca-emulator ready' "$work/emulator.out" || { echo "the emulator did not start" >&2; cat "$work/emulator.err" >&2; exit 1; }
for r in $(for t in "${targets[@]}"; do runner_for "$t"; done | sort -u); do "$r" --version | head -1; done

# Copy of the emulator's config with its own state dir (python3: no jq needed).
make_config() { # src dst state_dir
  python3 - "$@" <<'PY'
import json, sys
src, dst, state = sys.argv[1:4]
with open(src) as f:
    cfg = json.load(f)
cfg["state_dir"] = state
with open(dst, "w") as f:
    json.dump(cfg, f, indent=2)
    f.write("\n")
PY
}

# Prints the serial from a `status --json` output, or fails unless "state" is "valid".
valid_serial() { # status.json
  python3 - "$1" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    s = json.load(f)
if s.get("state") != "valid":
    sys.exit(f'state is {s.get("state")!r}, want "valid"; last_error: {s.get("last_error")!r}')
if not s.get("serial"):
    sys.exit("no serial in status")
print(s["serial"])
PY
}

failures=()
rows=()
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# run_step NAME LOG cmd... — runs the agent, records the wall time in $step_time, returns its exit code.
run_step() {
  local log=$1
  shift
  local t0 t1 rc=0
  t0=$(now)
  "$@" >"$log.out" 2>"$log.err" || rc=$?
  t1=$(now)
  step_time=$(elapsed "$t0" "$t1")
  return "$rc"
}

for t in "${targets[@]}"; do
  runner=$(runner_for "$t")
  bin=$tdir/$t/release/enroll-agent
  agent=("$bin")
  [[ -z $runner ]] || agent=("$runner" "$bin")
  for ca in "${cas[@]}"; do
    name=$t.$ca
    echo "== $name${runner:+ (under $runner)}"
    src=$work/emulator/agent-$ca.json
    [[ -f $src ]] || { echo "no $src from the emulator" >&2; failures+=("$name: no config"); continue; }
    cfg=$work/configs/$name.json
    make_config "$src" "$cfg" "$work/state/$name"
    log=$work/logs/$name
    times=()
    ok=1
    serial1= serial2=
    for step in enroll status1 renew status2; do
      case $step in
        enroll) args=(enroll) ;;
        renew) args=(renew --force) ;;
        status*) args=(status --json) ;;
      esac
      rc=0
      run_step "$log.$step" "${agent[@]}" -c "$cfg" "${args[@]}" || rc=$?
      times+=("$step_time")
      if ((rc != 0)); then
        echo "FAIL $name: ${args[*]} exited $rc" >&2
        sed 's/^/  | /' "$log.$step.err" >&2
        failures+=("$name: ${args[*]} exited $rc")
        ok=0
        break
      fi
      case $step in
        status1 | status2)
          if ! s=$(valid_serial "$log.$step.out" 2>"$log.$step.check"); then
            echo "FAIL $name: $step: $(cat "$log.$step.check")" >&2
            failures+=("$name: $step not valid")
            ok=0
            break
          fi
          if [[ $step == status1 ]]; then serial1=$s; else serial2=$s; fi
          ;;
      esac
      printf '  %-14s ok  %6ss\n' "${args[*]}" "$step_time"
    done
    if ((ok)); then
      if [[ $serial1 == "$serial2" ]]; then
        echo "FAIL $name: serial unchanged after renew --force ($serial1)" >&2
        failures+=("$name: serial unchanged")
        ok=0
      else
        echo "  serial $serial1 -> $serial2"
      fi
    fi
    while ((${#times[@]} < 4)); do times+=("-"); done
    total=$(printf '%s\n' "${times[@]}" | awk '$1 != "-" { s += $1 } END { printf "%.2f", s }')
    rows+=("$(printf '%-30s %-18s %8s %8s %8s %8s %8s  %s' "$t" "$ca" "${times[@]}" "$total" "$( ((ok)) && echo ok || echo FAIL)")")
  done
done

echo
echo "== wall times (seconds; aarch64/armv7 under qemu-user, x86_64 native)"
printf '%-30s %-18s %8s %8s %8s %8s %8s  %s\n' target ca enroll status renew status total result
printf '%s\n' "${rows[@]}"

if ((${#failures[@]})); then
  echo
  echo "FAILED (${#failures[@]}):" >&2
  printf '  %s\n' "${failures[@]}" >&2
  echo "logs: $work/logs" >&2
  exit 1
fi
echo "all passed; logs and state under $work"
