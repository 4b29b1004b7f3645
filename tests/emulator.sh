# Sourced by the test and benchmark scripts: start_emulator DIR [ARGS...] starts
# target/debug/ca-emulator with --dir DIR, waits until it is ready, sets $emulator (its pid) and
# $emulator_url, and stops it and removes $work (when set) on exit.
start_emulator() {
  local dir=$1; shift
  target/debug/ca-emulator --dir "$dir" "$@" > "$dir.out" &
  emulator=$!
  trap 'kill "$emulator" 2>/dev/null || true; [ -z "${work:-}" ] || rm -rf "$work"' EXIT
  for _ in $(seq 100); do grep -q '^ca-emulator ready' "$dir.out" 2>/dev/null && break; sleep 0.1; done
  emulator_url=$(sed -n 's/^ca-emulator ready //p' "$dir.out")
  [ -n "$emulator_url" ] || { cat "$dir.out" >&2; echo "the emulator did not start" >&2; exit 1; }
}
