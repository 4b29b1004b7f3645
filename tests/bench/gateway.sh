#!/usr/bin/env bash
# Gateway load benchmark (issue 10 item 7; figures printed, not asserted): N simulated devices
# (default 1000) enroll with a one-time token, then renew over TLS client authentication with
# the certificate they got, through TWO `enroll-gateway serve` replicas sharing one private
# PostgreSQL cluster, against the ca-emulator's EnOS (`--enos-fleet`: every device is an EnOS
# device, renewed by `action=renew` with its certSN). The devices are `est-load` (a small Rust
# EST client: keys and CSRs made before the clock starts, C requests at a time, alternating
# replicas), not N agent processes.
#
#   bash tests/bench/gateway.sh [N] [CONCURRENCY]      PROFILE=release for optimised binaries
#
# Prints enrollments/s and renewals/s with p50/p99 latency, each gateway's peak RSS (VmHWM),
# the database size, errors, the upstream calls the emulator saw, and the CPU seconds (user+sys)
# of the gateways, PostgreSQL, the emulator and the load generator against the machine's cores x
# wall time, so one can tell whether the cores or the gateway are the limit.
# Needs PostgreSQL (Debian `postgresql`; run as root it runs the cluster as user `postgres`).
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-1000}
conc=${2:-32}
profile=${PROFILE:-debug}
flag=; [ "$profile" = release ] && flag=--release
cargo build --locked --quiet $flag -p enroll-gateway -p enroll-tests --bin enroll-gateway --bin ca-emulator --bin est-load
bin=target/$profile
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[ -x "$pgbin/initdb" ] || { echo "SKIPPED: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
work=$(mktemp -d /tmp/enroll-gateway-bench.XXXXXX)
chmod 755 "$work"
pids=()
runas=()
[ "$(id -u)" = 0 ] && runas=(runuser -u postgres --)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "${runas[@]}" "$pgbin/pg_ctl" -D "$work/pg/data" -m immediate stop > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
  echo $((20000 + RANDOM % 20000)); }

# PostgreSQL: a private cluster in $work/pg, trust auth for user gw on 127.0.0.1 only.
mkdir "$work/pg"
[ "$(id -u)" = 0 ] && chown postgres "$work/pg"
"${runas[@]}" "$pgbin/initdb" -D "$work/pg/data" -A trust -U gw --no-sync > "$work/initdb.log"
pgport=$(free_port)
"${runas[@]}" "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w -t 60 \
  -o "-k $work/pg -p $pgport -c listen_addresses=127.0.0.1 -c max_connections=200" start > /dev/null
psql=(psql -X -q -h 127.0.0.1 -p "$pgport" -U gw -v ON_ERROR_STOP=1)
"${psql[@]}" -d postgres -c 'CREATE DATABASE gw'
postmaster=$(head -n1 "$work/pg/data/postmaster.pid")

# The emulator (EnOS with a fleet of devices).
"$bin/ca-emulator" --dir "$work/emulator" --enos-fleet > "$work/emulator.out" &
emulator=$!; pids+=("$emulator")
for _ in $(seq 100); do grep -q '^ca-emulator ready' "$work/emulator.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^ca-emulator ready //p' "$work/emulator.out")
[ -n "$url" ] || { echo "the emulator did not start" >&2; exit 1; }

# Two replicas: the same config, each on its own port.
gw=$work/gateway
mkdir -m 700 "$gw"
printf '%b' "$(sed -n 's/^ *"enos_root_pem": "\(.*\)",\{0,1\}$/\1/p' "$work/emulator/emulator.json")" > "$gw/enos-ca.pem"
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj '/CN=Bench Gateway CA' -keyout "$gw/server-ca.key" -out "$gw/server-ca.pem"
ossl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj '/CN=gateway.bench' \
  -keyout "$gw/server.key" -out "$gw/server.csr"
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$gw/server.ext"
ossl x509 -req -in "$gw/server.csr" -CA "$gw/server-ca.pem" -CAkey "$gw/server-ca.key" -CAcreateserial \
  -days 2 -extfile "$gw/server.ext" -out "$gw/server.pem"
chmod 600 "$gw/server.key"
cat > "$gw/config.json" <<JSON
{
  "listen": "127.0.0.1:0",
  "tls": { "cert_file": "server.pem", "key_file": "server.key" },
  "database": { "url": "postgres://gw@127.0.0.1:$pgport/gw", "max_connections": 16 },
  "labels": {
    "meters": {
      "ca": {
        "backend": "enos", "api_gateway": "$url", "org_id": "o15724268424841",
        "app_key": "emu-app-key-0001", "app_secret_file": "$work/emulator/enos-app-secret",
        "product_key": "emuPK0001", "device_key": "{device}", "valid_days": 365
      },
      "ca_certs_file": "enos-ca.pem",
      "bootstrap": { "tokens": true },
      "policy": { "san_dns": ["{device}.devices.acme.example"], "max_per_device_per_day": 10 }
    }
  },
  "upstream": { "trust_bundle": "$work/emulator/tls-root.pem", "timeout_s": 30 },
  "limits": { "max_connections": 1024 }
}
JSON
gws=(); addrs=()
for r in 1 2; do
  "$bin/enroll-gateway" -c "$gw/config.json" serve 2> "$gw/serve-$r.log" &
  gws+=("$!"); pids+=("$!")
  for _ in $(seq 300); do grep -q 'serving EST on ' "$gw/serve-$r.log" 2>/dev/null && break; sleep 0.1; done
  addr=$(sed -n 's/.*serving EST on \([^ ,]*\).*/\1/p' "$gw/serve-$r.log" | head -n1)
  [ -n "$addr" ] || { cat "$gw/serve-$r.log" >&2; echo "replica $r did not start" >&2; exit 1; }
  addrs+=("$addr")
done
seed=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
"$bin/est-load" tokens --devices "$n" --seed "$seed" | "${psql[@]}" -d gw > /dev/null

# CPU seconds (user+sys) of a process, with its reaped children (PostgreSQL's exited backends).
cpu() { awk -v t="$(getconf CLK_TCK)" '{ s = $0; sub(/^.*\) /, "", s); split(s, f, " ");
  printf "%.2f", (f[12] + f[13] + f[14] + f[15]) / t }' "/proc/$1/stat"; }
pg_cpu() { local sum; sum=$(cpu "$postmaster"); for c in $(pgrep -P "$postmaster"); do
  sum=$(awk -v a="$sum" -v b="$(cpu "$c" 2>/dev/null || echo 0)" 'BEGIN { printf "%.2f", a + b }'); done; echo "$sum"; }
machine_busy() { awk '/^cpu /{ printf "%d %d\n", $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat; }
before_gw1=$(cpu "${gws[0]}"); before_gw2=$(cpu "${gws[1]}"); before_emu=$(cpu "$emulator"); before_pg=$(pg_cpu)
read -r busy0 total0 < <(machine_busy)
start=$(date +%s.%N)

echo "enroll-gateway load: $n devices, concurrency $conc, replicas ${addrs[*]}, PostgreSQL $(basename "$(dirname "$pgbin")"), $profile build, $(nproc) cores"
status=0
/usr/bin/time -f '%U %S' -o "$work/load.time" "$bin/est-load" run --gateway "https://${addrs[0]}" --gateway "https://${addrs[1]}" \
  --trust "$gw/server-ca.pem" --devices "$n" --seed "$seed" --concurrency "$conc" --deadline-s 120 | tee "$work/load.out" || status=$?

wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
read -r busy1 total1 < <(machine_busy)
d() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
gw1=$(d "$before_gw1" "$(cpu "${gws[0]}")"); gw2=$(d "$before_gw2" "$(cpu "${gws[1]}")")
emu=$(d "$before_emu" "$(cpu "$emulator")"); pgc=$(d "$before_pg" "$(pg_cpu)")
load=$(tail -n1 "$work/load.time" | awk '{ printf "%.2f", $1 + $2 }')
cores=$(nproc)
echo
for r in 1 2; do
  echo "gateway $r (${addrs[$((r - 1))]}): peak RSS $(awk '/VmHWM/{ print $2, $3 }' "/proc/${gws[$((r - 1))]}/status"), CPU $( [ $r = 1 ] && echo "$gw1" || echo "$gw2") s"
done
echo "database: $("${psql[@]}" -d gw -At -c "SELECT pg_size_pretty(pg_database_size('gw')) || ' (' || (SELECT count(*) FROM certificates) || ' certificates, ' || (SELECT count(*) FROM audit) || ' audit rows)'")"
log=$(curl -s --cacert "$work/emulator/tls-root.pem" "$url/_emulator/log")
ok200() { grep -F "$1" <<< "$log" | grep -c '"status":200' || true; }
echo "upstream (emulator log): $(ok200 '["action","apply"]') apply and $(ok200 '["action","renew"]') renew answered 200, $(grep -c '"path":"/apim-token-service/v2.0/token/get"' <<< "$log" || true) token requests"
echo "CPU seconds (user+sys) over ${wall} s wall on $cores cores (= $(awk -v w="$wall" -v c="$cores" 'BEGIN { printf "%.1f", w * c }') core-seconds):"
printf '  gateways %s (%s + %s), PostgreSQL %s, emulator %s, load generator %s\n' \
  "$(awk -v a="$gw1" -v b="$gw2" 'BEGIN { printf "%.2f", a + b }')" "$gw1" "$gw2" "$pgc" "$emu" "$load"
echo "  together $(awk -v a="$gw1" -v b="$gw2" -v c="$pgc" -v d="$emu" -v e="$load" 'BEGIN { printf "%.1f", a + b + c + d + e }') core-seconds; per request the gateways spent $(awk -v a="$gw1" -v b="$gw2" -v r="$(grep -o '"ok":[0-9]*' "$work/load.out" | cut -d: -f2 | awk '{ s += $1 } END { print s + 0 }')" 'BEGIN { printf "%.1f", 1000 * (a + b) / (r > 0 ? r : 1) }') ms of CPU"
echo "  machine busy: $(awk -v b=$((busy1 - busy0)) -v t=$((total1 - total0)) 'BEGIN { printf "%.0f%%", 100 * b / (t > 0 ? t : 1) }') of all cores (other jobs on the machine included)"
exit "$status"
