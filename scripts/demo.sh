#!/usr/bin/env bash
# The main job, end to end on this machine: start the bundled CA emulator (EnOS, EZCA, Sectigo
# SCM, Securosys TSB, Redtrust, EST), then run the real agent against each: first enrollment,
# status, forced renewal, status. Sectigo and the TSB approval flow are asynchronous (the agent
# polls); the Redtrust run keeps its key on the Redtrust server and has EnOS issue the certificate;
# EST enrolls with a factory certificate (or a one-time password) and renews over TLS client
# authentication with the device's own certificate; ACME places an order, answers http-01 and
# finalizes with the device's CSR (the emulator also offers ARI renewal windows).
# Then the gateway path on the embedded default: enroll-gateway with SQLite and a label forwarding
# to the emulator's EnOS; the agent (ca.backend = "est") enrolls with a one-time password from
# `enroll-gateway token create` and renews with its certificate; its config holds no EnOS secret.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --quiet --workspace --bins
bin=target/debug
work=$(mktemp -d /tmp/enroll-agent-demo.XXXXXX)
chmod 700 "$work"

"$bin/ca-emulator" --dir "$work/emulator" > "$work/emulator.out" &
emulator=$!
gateway=
trap 'kill $emulator $gateway 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q '^ca-emulator ready' "$work/emulator.out" 2>/dev/null && break; sleep 0.1; done
grep '^ca-emulator ready' "$work/emulator.out" || { echo "the emulator did not start" >&2; exit 1; }

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
for ca in enos ezca sectigo securosys securosys-approval redtrust-enos est est-basic acme scep; do
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

printf '\n======== gateway: enroll-gateway (SQLite) -> EnOS emulator; the device holds no operator secret\n'
gw=$work/gateway
mkdir -m 700 "$gw"
url=$(sed -n 's/^  "url": "\(.*\)",\{0,1\}$/\1/p' "$work/emulator/emulator.json")
# The label's ca_certs_file: the EnOS root (what cacerts returns, what renewals chain to).
printf '%b' "$(sed -n 's/^ *"enos_root_pem": "\(.*\)",$/\1/p' "$work/emulator/emulator.json")" > "$gw/enos-ca.pem"
# A throwaway CA and server certificate for the gateway's TLS on 127.0.0.1.
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj '/CN=Demo Gateway CA' -keyout "$gw/server-ca.key" -out "$gw/server-ca.pem"
ossl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj '/CN=gateway.demo' \
  -keyout "$gw/server.key" -out "$gw/server.csr"
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$gw/server.ext"
ossl x509 -req -in "$gw/server.csr" -CA "$gw/server-ca.pem" -CAkey "$gw/server-ca.key" -CAcreateserial \
  -days 2 -extfile "$gw/server.ext" -out "$gw/server.pem"
chmod 600 "$gw/server.key"
# The operator's side: the EnOS app secret stays here, next to the gateway.
cat > "$gw/config.json" <<JSON
{
  "listen": "127.0.0.1:0",
  "tls": { "cert_file": "server.pem", "key_file": "server.key" },
  "database": { "url": "sqlite://$gw/gateway.db" },
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
  "upstream": { "trust_bundle": "$work/emulator/tls-root.pem", "timeout_s": 20 }
}
JSON
step "$bin/enroll-gateway" -c "$gw/config.json" check
"$bin/enroll-gateway" -c "$gw/config.json" serve 2> "$gw/serve.log" &
gateway=$!
for _ in $(seq 100); do grep -q 'serving EST on ' "$gw/serve.log" 2>/dev/null && break; sleep 0.1; done
addr=$(sed -n 's/.*serving EST on \([^ ,]*\).*/\1/p' "$gw/serve.log" | head -n1)
[ -n "$addr" ] || { cat "$gw/serve.log" >&2; echo "the gateway did not start" >&2; exit 1; }
printf '\n$ %s -c %s serve    # listening on %s\n' "$bin/enroll-gateway" "$gw/config.json" "$addr"
printf '\033[1m$ %s\033[0m\n' "$bin/enroll-gateway -c $gw/config.json token create --label meters --device sensor-0042 > $gw/device/token"
mkdir -m 700 "$gw/device"
(umask 077 && "$bin/enroll-gateway" -c "$gw/config.json" token create --label meters --device sensor-0042 > "$gw/device/token")
echo "(a one-time password; the factory hands it to the device)"
# The device's side: the gateway's URL and TLS root, the token; no vendor credential.
config=$gw/device/agent.json
cat > "$config" <<JSON
{
  "ca": {
    "backend": "est", "url": "https://$addr", "label": "meters",
    "bootstrap": { "username": "sensor-0042", "password_file": "$gw/device/token" }
  },
  "key": { "provider": "file", "algorithm": "p256", "rotate_on_renew": true },
  "subject": { "CN": "sensor-0042", "O": "Acme", "OU": "Meters", "C": "NL" },
  "san": { "dns": ["sensor-0042.devices.acme.example"] },
  "state_dir": "$gw/device/state",
  "tls": { "trust_bundle": "$gw/server-ca.pem", "timeout_s": 30 }
}
JSON
step cat "$config"
step "$bin/enroll-agent" -c "$config" enroll
step "$bin/enroll-agent" -c "$config" renew --force
step "$bin/enroll-agent" -c "$config" status
if grep -q -f "$work/emulator/enos-app-secret" -r "$gw/device"; then
  echo "the EnOS app secret is on the device" >&2; exit 1
fi
printf '\nNo operator secret on the device: status says it enrolled with the one-time password and renews\nwith its certificate; %s holds the gateway URL, the used token and its own key and certificate.\nThe EnOS app secret is only in the gateway config.\n' "$gw/device"
step "$bin/enroll-gateway" -c "$gw/config.json" device show sensor-0042
step "$bin/enroll-gateway" -c "$gw/config.json" audit
kill -TERM "$gateway" && wait "$gateway" && gateway=
printf '\nEverything is under %s (remove it when done).\n' "$work"
