#!/usr/bin/env bash
# Fetch the default guest kernel: Debian's linux-image-cloud-amd64, the
# package it currently depends on, downloaded with `apt-get download` and
# unpacked with `dpkg-deb -x` into the cache — never installed into /boot.
#
#   $XDG_CACHE_HOME/supermachine/kernels/<package>/{boot/vmlinuz-*,lib/modules/*}
#   $XDG_CACHE_HOME/supermachine/kernels/current -> <package>
#
# Idempotent: an already unpacked package is reused. Prints the unpacked
# directory. SUPERMACHINE_KERNEL_PACKAGE overrides the package name.
set -euo pipefail
cache="${XDG_CACHE_HOME:-$HOME/.cache}/supermachine/kernels"
meta=linux-image-cloud-amd64
mkdir -p "$cache"

pkg="${SUPERMACHINE_KERNEL_PACKAGE:-}"
if [ -z "$pkg" ]; then
  pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    echo "fetch-kernel: apt does not know $meta; run 'apt-get update' (Debian 12 main)" >&2
    exit 1
  fi
fi
dir="$cache/$pkg"
if [ ! -e "$dir/.complete" ]; then
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  sandbox=()
  # As root, apt's download sandbox user (_apt) cannot write into our private temp dir.
  [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
  (cd "$tmp" && apt-get download -qq "${sandbox[@]}" "$pkg") >&2
  deb=$(ls "$tmp"/*.deb)
  dpkg-deb -x "$deb" "$tmp/root"
  ls "$tmp"/root/boot/vmlinuz-* >/dev/null
  rm -rf "$dir"
  mv "$tmp/root" "$dir"
  touch "$dir/.complete"
fi
ln -sfn "$pkg" "$cache/current"
echo "$dir"
