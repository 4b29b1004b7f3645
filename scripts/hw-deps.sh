#!/usr/bin/env bash
# Debian packages the hardware key providers need to build (libtss2 headers for the TPM
# provider) and to test (SoftHSM2 and OpenSC for PKCS#11, swtpm and tpm2-tools for the TPM,
# tpm2-pkcs11 with tpm2-abrmd on a private D-Bus for PKCS#11 on a TPM). libtss2-tcti-tabrmd0 is
# listed because --no-install-recommends leaves it out and tabrmd TCTIs then fail to load.
# Also the tools the end-to-end suites run: openssl (CSR and chain checks), faketime (a device
# booted at 1970), curl, file and time (benchmarks); strongSwan's `pki` as an independent EST client
# against the EST emulator (extra-plugins for curl, standard-plugins for EC keys). PostgreSQL
# for the gateway's store tests (they start a private cluster; tooling.md). Pebble (with its
# pebble-challtestsrv DNS) for the ACME suite; lego and certbot as ACME peers and micromdm's scep
# for the side-by-side benchmark (tests/bench/peers.sh).
# Installs the missing ones when run as root; otherwise says which are missing.
set -euo pipefail
packages=(pkg-config libtss2-dev softhsm2 opensc swtpm swtpm-tools tpm2-tools
  tpm2-abrmd libtss2-tcti-tabrmd0 libtpm2-pkcs11-1 libtpm2-pkcs11-tools dbus
  openssl ca-certificates faketime curl file time
  strongswan-pki libstrongswan-extra-plugins libstrongswan-standard-plugins
  postgresql pebble lego certbot scep)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "hardware provider packages missing: ${missing[*]} (apt-get install them as root)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
