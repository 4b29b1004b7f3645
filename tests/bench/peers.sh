#!/usr/bin/env bash
# Side by side (issue 12): enroll-agent against the tools firmware teams use today, on the same
# server, same machine, same run, several rounds. Figures are printed, never asserted.
#
#   bash tests/bench/peers.sh            # ROUNDS=5 by default; PEERS="acme scep" by default
#
# ACME: enroll-agent vs lego vs certbot on Debian's Pebble, all three answering http-01 with
# their own standalone listener; Pebble validates for real, resolving every name to 127.0.0.1
# through pebble-challtestsrv. Each round enrolls from an empty state (a new account and key),
# then renews that certificate (enroll-agent `renew --force`, lego `renew --days 100000
# --no-random-sleep` (else lego sleeps up to 8 minutes first),
# certbot `certonly --force-renewal`). wait4(2) gives user+sys CPU and peak RSS; the table
# shows medians and each peer's figure divided by ours. Sizes: our static release
# binary; the peers' Debian packages with every package they depend on (dpkg Installed-Size,
# dependency closure, the C library included for everyone but us).
#
# SCEP: enroll-agent vs micromdm's scepclient on micromdm's scepserver (Debian's scep, which
# binds every interface: the server runs on a free port for the run's duration). Each round
# enrolls from empty state (RSA-2048 key generation included for both; PKCSReq with the
# challenge) and renews (RenewalReq signed by the current certificate for both, checked in the
# server's debug log; with the same key, as scepclient always does, so enroll-agent's config has
# rotate_on_renew false). certmonger is not measured: its SCEP helper (scep-submit) only carries
# messages that the certmonger daemon builds, and the daemon needs a D-Bus (shared/tooling.md §2
# drives it with dbus-run-session, a private mount namespace and OpenSSL's legacy provider).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-5}
PEERS=${PEERS:-acme scep}
for tool in pebble pebble-challtestsrv lego certbot scepserver scepclient curl openssl python3 gcc; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (bash scripts/hw-deps.sh installs it)" >&2; exit 1; }
done
target=x86_64-unknown-linux-musl
cargo build --locked --quiet --release --target "$target" -p enroll-agent
agent=$PWD/target/$target/release/enroll-agent

work=$(mktemp -d /tmp/enroll-peers.XXXXXX)
chmod 700 "$work"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wall seconds, user and system CPU seconds and peak RSS (KiB) of the command alone, from
# wait4(2) in a small C launcher (tests/bench/rusage.c; see there why not /usr/bin/time or Python).
gcc -O2 -o "$work/rusage" tests/bench/rusage.c
measure() {  # tool phase command...
  local tool=$1 phase=$2; shift 2
  if ! "$work/rusage" "$work/time" "$@" > "$work/out" 2>&1; then
    echo "$tool $phase failed:" >&2; tail -n 5 "$work/out" >&2; exit 1
  fi
  echo "$tool $phase $(cat "$work/time")" >> "$work/results"
}
verify() {  # cert chain
  openssl verify -CAfile "$work/acme-root.pem" -untrusted "$2" "$1" > /dev/null \
    || { echo "the certificate at $1 does not verify against Pebble's root" >&2; exit 1; }
}

closure_kib() {  # installed size of a package and everything it depends on (KiB)
  apt-cache depends --recurse --installed --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$1" 2>/dev/null | grep -v '^ ' | grep -v '^<' | sort -u \
    | xargs dpkg-query -W -f='${Installed-Size}\n' 2>/dev/null | awk '{ s += $1 } END { print s }'
}

# Prints the medians of "$work/results" for the given tools (the first is enroll-agent) with each
# peer's ratio to it.
table() {
  awk -v tools="$*" '
    function median(list,   n, a, i, j, t) {
      n = split(list, a, " ")
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { key = $1 " " $2; wall[key] = wall[key] " " $3; cpu[key] = cpu[key] " " ($4 + $5); rss[key] = rss[key] " " $6 }
    END {
      printf "%-22s %9s %9s %10s   %s\n", "", "wall s", "CPU s", "peak RSS", "ratios wall / CPU / RSS"
      split("enroll renew", phases, " ")
      n = split(tools, names, " ")
      for (p = 1; p <= 2; p++) for (t = 1; t <= n; t++) {
        key = names[t] " " phases[p]; base = names[1] " " phases[p]
        if (!(key in wall)) continue
        w = median(wall[key]); c = median(cpu[key]); r = median(rss[key])
        bw = median(wall[base]); bc = median(cpu[base]); br = median(rss[base])
        ratio = t == 1 ? "1" : sprintf("%.1fx / %.1fx / %.1fx", w / bw, c / bc, r / br)
        printf "%-22s %9.3f %9.4f %7d KiB   %s\n", key, w, c, r, ratio
      }
    }' "$work/results"
}

acme_bench() {
  # Pebble's HTTPS listener needs a certificate (Debian ships none; shared/tooling.md §1).
  (
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -subj "/CN=pebble test TLS CA" -keyout tls-ca.key -out tls-ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
      -keyout tls-key.pem -out tls.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > tls.ext
    openssl x509 -req -in tls.csr -CA tls-ca.pem -CAkey tls-ca.key -CAcreateserial -days 30 \
      -extfile tls.ext -out tls-cert.pem 2>/dev/null
  )
  port=$(free_port); mgmt=$(free_port); http01=$(free_port); dns=$(free_port); dns_mgmt=$(free_port)
  cat > "$work/pebble.json" <<JSON
{ "pebble": { "listenAddress": "127.0.0.1:$port", "managementListenAddress": "127.0.0.1:$mgmt",
  "certificate": "$work/tls-cert.pem", "privateKey": "$work/tls-key.pem",
  "httpPort": $http01, "tlsPort": $(free_port), "ocspResponderURL": "", "externalAccountBindingRequired": false } }
JSON
  pebble-challtestsrv -dns01 "127.0.0.1:$dns" -management "127.0.0.1:$dns_mgmt" -http01 "" -https01 "" \
    -tlsalpn01 "" -defaultIPv6 "" > "$work/challtestsrv.log" 2>&1 &
  pids+=($!)
  PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0 \
    pebble -config "$work/pebble.json" -dnsserver "127.0.0.1:$dns" > "$work/pebble.log" 2>&1 &
  pids+=($!)
  directory=https://127.0.0.1:$port/dir
  for _ in $(seq 200); do curl -sf --cacert "$work/tls-ca.pem" -o /dev/null "$directory" && break; sleep 0.05; done
  curl -sf --cacert "$work/tls-ca.pem" "https://127.0.0.1:$mgmt/roots/0" > "$work/acme-root.pem"

  cat > "$work/agent.json" <<JSON
{ "state_dir": "$work/agent-state",
  "subject": { "CN": "agent.devices.example" }, "san": { "dns": ["agent.devices.example"] },
  "key": { "algorithm": "p256", "provider": "file" },
  "ca": { "backend": "acme", "directory": "$directory", "contact": ["mailto:fleet@devices.example"],
          "terms_agreed": true, "challenge": "http-01", "http01_listen": "127.0.0.1:$http01" },
  "tls": { "trust_bundle": "$work/tls-ca.pem" } }
JSON
  export LEGO_CA_CERTIFICATES=$work/tls-ca.pem REQUESTS_CA_BUNDLE=$work/tls-ca.pem
  lego_args=(--server "$directory" --accept-tos --email fleet@devices.example --path "$work/lego"
    --key-type ec256 --domains lego.devices.example --http --http.port "127.0.0.1:$http01")
  certbot_args=(certonly --non-interactive --standalone --server "$directory" --agree-tos
    -m fleet@devices.example --no-eff-email --http-01-port "$http01" --http-01-address 127.0.0.1
    --key-type ecdsa --elliptic-curve secp256r1 --config-dir "$work/certbot/etc"
    --work-dir "$work/certbot/work" --logs-dir "$work/certbot/log" -d certbot.devices.example)
  for round in $(seq "$ROUNDS"); do
    rm -rf "$work/agent-state" "$work/lego" "$work/certbot"
    measure enroll-agent enroll "$agent" -q -c "$work/agent.json" enroll
    measure enroll-agent renew "$agent" -q -c "$work/agent.json" renew --force
    verify "$work/agent-state/current/cert.pem" "$work/agent-state/current/chain.pem"
    measure lego enroll lego "${lego_args[@]}" run
    measure lego renew lego "${lego_args[@]}" renew --days 100000 --no-random-sleep
    verify "$work/lego/certificates/lego.devices.example.crt" "$work/lego/certificates/lego.devices.example.issuer.crt"
    measure certbot enroll certbot "${certbot_args[@]}"
    measure certbot renew certbot "${certbot_args[@]}" --force-renewal
    verify "$work/certbot/etc/live/certbot.devices.example/cert.pem" "$work/certbot/etc/live/certbot.devices.example/chain.pem"
    echo "round $round of $ROUNDS done" >&2
  done
  ours=$(stat -c %s "$agent")
  echo
  echo "ACME on Pebble $(dpkg-query -W -f='${Version}' pebble), $ROUNDS rounds, medians; ratio = peer / enroll-agent"
  echo "(lego $(dpkg-query -W -f='${Version}' lego), certbot $(dpkg-query -W -f='${Version}' certbot), $(nproc) cores)"
  table enroll-agent lego certbot
  lego_b=$(stat -c %s "$(command -v lego)"); lego_c=$(closure_kib lego); certbot_c=$(closure_kib certbot)
  awk -v ours_b="$ours" -v lego_b="$lego_b" -v lego_c="$lego_c" -v certbot_c="$certbot_c" 'BEGIN {
    printf "\nsize: enroll-agent %d B static (no dependencies); lego %d B binary, %d KiB installed with its dependency closure (%.0fx); certbot %d KiB installed with its closure (%.0fx)\n",
      ours_b, lego_b, lego_c, lego_c * 1024 / ours_b, certbot_c, certbot_c * 1024 / ours_b }'
}

scep_bench() {
  local port challenge url fp depot=$work/scep-depot
  port=$(free_port); challenge=bench-$RANDOM-$RANDOM; url=http://127.0.0.1:$port/scep
  scepserver ca -init -depot "$depot" -keySize 2048 -organization bench-ca -years 1 > /dev/null 2>&1
  scepserver -depot "$depot" -port "$port" -challenge "$challenge" -allowrenew 0 -debug > "$work/scepserver.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do curl -sf -o /dev/null "$url?operation=GetCACaps" && break; sleep 0.05; done
  fp=$(openssl x509 -in "$depot/ca.pem" -outform DER | sha256sum | cut -d' ' -f1)
  printf '%s' "$challenge" > "$work/scep.challenge"; chmod 600 "$work/scep.challenge"
  cat > "$work/agent-scep.json" <<JSON
{ "state_dir": "$work/agent-scep-state",
"subject": { "CN": "agent.devices.example", "O": "bench" }, "san": { "dns": ["agent.devices.example"] },
"key": { "algorithm": "rsa2048", "provider": "file", "rotate_on_renew": false },
"ca": { "backend": "scep", "url": "$url", "ca_fingerprint": "$fp",
        "challenge_password_file": "$work/scep.challenge" } }
JSON
  local scepclient_args=(-server-url "$url" -challenge "$challenge" -cn scepclient.devices.example
    -private-key "$work/scepclient/key.pem" -certificate "$work/scepclient/cert.pem" -keySize 2048 -ca-fingerprint "$fp")
  for round in $(seq "$ROUNDS"); do
    rm -rf "$work/agent-scep-state" "$work/scepclient"; mkdir -p "$work/scepclient"
    measure enroll-agent enroll "$agent" -q -c "$work/agent-scep.json" enroll
    measure enroll-agent renew "$agent" -q -c "$work/agent-scep.json" renew --force
    openssl verify -CAfile "$depot/ca.pem" "$work/agent-scep-state/current/cert.pem" > /dev/null
    measure scepclient enroll scepclient "${scepclient_args[@]}"
    measure scepclient renew scepclient "${scepclient_args[@]}"
    openssl verify -CAfile "$depot/ca.pem" "$work/scepclient/cert.pem" > /dev/null
    echo "scep round $round of $ROUNDS done" >&2
  done
  local renewals
  renewals=$(grep -c 'scep_message_type="RenewalReq (17)"' "$work/scepserver.log" || true)
  [[ $renewals == $((2 * ROUNDS)) ]] \
    || { echo "expected $((2 * ROUNDS)) RenewalReq at the server, saw $renewals" >&2; exit 1; }
  echo
  echo "SCEP on micromdm scepserver $(dpkg-query -W -f='${Version}' scep), $ROUNDS rounds, medians; ratio = peer / enroll-agent"
  echo "(both: RSA-2048 key generated at enroll, PKCSReq; renew = RenewalReq with the same key; $(nproc) cores)"
  table enroll-agent scepclient
  echo
  echo "size: enroll-agent $(stat -c %s "$agent") B static; scepclient $(stat -c %s "$(command -v scepclient)") B (Go, static), package scep $(closure_kib scep) KiB installed with its closure (server and client)"
}

for peer in $PEERS; do
  : > "$work/results"
  "${peer}_bench"
done
