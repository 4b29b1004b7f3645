#!/usr/bin/env bash
# cross/build.sh — static release builds of enroll-agent (default features: software keys +
# Redtrust) for x86_64-unknown-linux-musl, aarch64-unknown-linux-musl and 32-bit ARMv7
# hard-float, then a size table.
#
# On a fresh Debian machine (as root) it first installs what is missing: the Debian GNU cross
# compilers (they compile ring's C/assembly and drive the link), qemu-user-static (for
# cross/qemu-e2e.sh), `file`, and the rustup std of each target. Per-target linker/CC settings
# live in .cargo/config.toml ([target.X] + [env] CC_<target>), so host builds are unaffected.
#
# ARMv7: rustup has no downloadable std for armv7-unknown-linux-musleabihf here, so ARMv7 is a
# static glibc build: armv7-unknown-linux-gnueabihf with -C target-feature=+crt-static.
#
# Every binary must be statically linked (checked with `file`); exits non-zero otherwise.
# Idempotent: installs only what is missing; cargo rebuilds only what changed.
# Network: apt, rustup and crates.io only.
#
# Usage: cross/build.sh [TARGET...]   (default: all three)
# Env:   CROSS_SKIP_INSTALL=1 skips the apt/rustup step; CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

all_targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)
if (($#)); then targets=("$@"); else targets=("${all_targets[@]}"); fi
for t in "${targets[@]}"; do
  case " ${all_targets[*]} " in *" $t "*) ;; *) echo "cross/build.sh: unknown target $t" >&2; exit 64 ;; esac
done

# A RUSTFLAGS variable would replace the per-target rustflags in .cargo/config.toml (armv7's
# +crt-static) and change what is measured; the builds here use the config only.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS

if [[ ${CROSS_SKIP_INSTALL:-0} != 1 ]]; then
  echo "== cross toolchain"
  install_start=$(date +%s.%N)
  apt_packages=(file gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf
    libc6-dev-armhf-cross qemu-user-static)
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    if ((EUID != 0)); then
      echo "cross/build.sh: missing Debian packages (${missing[*]}); run as root or install them" >&2
      exit 1
    fi
    echo "apt-get install ${missing[*]}"
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  installed=$(rustup target list --installed)
  for t in "${all_targets[@]}"; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t"
  done
  awk -v a="$install_start" -v b="$(date +%s.%N)" 'BEGIN { printf "toolchain ready (%.1f s)\n", b - a }'
fi

tdir=${CARGO_TARGET_DIR:-target}
echo "== builds (cargo build --locked --release -p enroll-agent)"
declare -A secs
for t in "${targets[@]}"; do
  start=$(date +%s.%N)
  cargo build --locked --release -p enroll-agent --target "$t"
  secs[$t]=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
done

echo "== sizes"
fail=0
printf '%-32s %10s %8s %7s  %s\n' target bytes MiB build file
for t in "${targets[@]}"; do
  bin=$tdir/$t/release/enroll-agent
  size=$(stat -c %s "$bin")
  info=$(file -b "$bin")
  # `file` says "statically linked" (or "static-pie linked" for x86_64 musl); never "dynamically".
  summary=$(sed -E 's/, BuildID\[[^]]*\]=[0-9a-f]+//; s/, for GNU\/Linux [0-9.]+//' <<<"$info")
  printf '%-32s %10d %8.3f %6ss  %s\n' "$t" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" \
    "${secs[$t]}" "$summary"
  if [[ $info != *"static"* || $info == *"dynamically linked"* || $info == *"interpreter"* ]]; then
    echo "cross/build.sh: $bin is not statically linked" >&2
    fail=1
  fi
done
exit "$fail"
