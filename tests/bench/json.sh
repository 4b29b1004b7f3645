#!/usr/bin/env bash
# Issue 14 item 6: CPU time and peak memory of the agent's JSON reader on 1 MiB adversarial
# documents (an object of ~87k distinct keys, an array of ~524k zeros, many small arrays), for the
# reader at each git revision given (default: the reader before the fix, and the working tree).
# ca/src/json.rs (agent/src/json.rs before the enroll-ca crate) depends on std only, so each revision is compiled alone with rustc -O into a
# tiny program that parses one file: no cargo build, no shared target/.
#   bash tests/bench/json.sh [REV|worktree ...]     e.g.  bash tests/bench/json.sh 987ce2c worktree
set -euo pipefail
cd "$(dirname "$0")/../.."
revs=("$@")
[ ${#revs[@]} -gt 0 ] || revs=(987ce2c worktree)
work=$(mktemp -d /tmp/enroll-json-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import sys
work, limit = sys.argv[1], 1 << 20
def fill(name, open_, item, close):
    parts, size, i = [], len(open_) + len(close), 0
    while True:
        piece = item(i)
        if size + len(piece) + 1 > limit:
            break
        parts.append(piece); size += len(piece) + 1; i += 1
    open(f"{work}/{name}.json", "w").write(open_ + ",".join(parts) + close)
    return i
n = fill("object", "{", lambda i: f'"{i:x}":0', "}")
m = fill("array", "[", lambda i: "0", "]")
k = fill("arrays", "[", lambda i: "[" + ",".join(["0"] * 1000) + "]", "]")
print(f"inputs (each <= 1 MiB): object of {n} keys, array of {m} zeros, {k} arrays of 1000 zeros")
PY
printf '%-10s %-8s %10s %10s  %s\n' reader input cpu_s max_rss result
for rev in "${revs[@]}"; do
  if [ "$rev" = worktree ]; then cp ca/src/json.rs "$work/json.rs"
  else git show "$rev:ca/src/json.rs" > "$work/json.rs" 2>/dev/null || git show "$rev:agent/src/json.rs" > "$work/json.rs"; fi
  cat > "$work/main.rs" <<'RS'
#[allow(dead_code)]
mod json;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let bytes = std::fs::read(path).unwrap();
    match json::parse(&bytes) {
        Ok(_) => println!("parsed"),
        Err(e) => println!("refused: {}", e.reason),
    }
}
RS
  rustc -O --edition 2021 -o "$work/parse-$rev" "$work/main.rs" 2>/dev/null
  for input in object array arrays; do
    out=$(/usr/bin/time -f '%U %S %M' -o "$work/time" "$work/parse-$rev" "$work/$input.json")
    read -r user sys rss < "$work/time"
    cpu=$(python3 -c "print(f'{$user + $sys:.2f}')")
    printf '%-10s %-8s %10s %7s KiB  %s\n' "$rev" "$input" "$cpu" "$rss" "$out"
  done
done
