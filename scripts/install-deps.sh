#!/usr/bin/env bash
# Install what supermachine needs from Debian 12's archive. Idempotent:
# packages already present are not downloaded again.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config curl util-linux clang libclang-rt-14-dev clang-format
  libboost1.81-dev libboost-test1.81-dev libboost-json1.81-dev librange-v3-dev nlohmann-json3-dev
  libssl-dev zlib1g-dev libzstd-dev zstd libslirp-dev
  e2fsprogs acpica-tools cpio lz4 qemu-system-x86 qemu-system-common qemu-utils busybox-static
  skopeo umoci docker-registry debootstrap dnsmasq-base
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
