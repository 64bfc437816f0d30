#!/usr/bin/env bash
# A Debian `debootstrap --variant=minbase` tree, made once per machine and
# suite and cached, for the slow tests and benchmarks that need a real
# distribution image (rootfs_debian_test, debian_run_test, bench/rootfs).
#
#   scripts/make-debian-tree.sh [SUITE]     (default bookworm)
#
# Prints the tree's path as the last line of stdout. The tree lives in
#   ${XDG_CACHE_HOME:-~/.cache}/supermachine/debootstrap/debian-SUITE-minbase-ARCH
# and is built under a temporary name and renamed (so it exists only whole), under an flock, so
# concurrent callers build it once and never see half a tree.
# The mirror is the one apt uses here (/etc/apt/sources.list{,.d}), else
# deb.debian.org; SUPERMACHINE_DEBIAN_MIRROR overrides it.
#
# Exit 0: the tree is ready. Exit 77 with one line on stderr: this host cannot
# make it (not root, no debootstrap, mirror unreachable) - callers skip.
# Any other status: debootstrap itself failed (its log is printed).
set -euo pipefail

suite=${1:-bookworm}
case $suite in *[!a-z0-9-]* | "") echo "bad suite name: $suite" >&2; exit 2 ;; esac

cannot() { echo "$*" >&2; exit 77; }

[ "$(id -u)" -eq 0 ] || cannot "debootstrap needs root"
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || cannot "debootstrap not installed"
PATH=$PATH:/usr/sbin:/sbin
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)

cache=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/supermachine/debootstrap
tree=$cache/debian-$suite-minbase-$arch
if [ -d "$tree" ]; then
  echo "$tree"
  exit 0
fi

apt_mirror() {
  local uri
  # deb822 (.sources) first, then one-line sources.list; skip the security archive.
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '{for (i = 2; i <= NF; i++) print $i}' | grep -v -- '-security' | grep '^https\?://' | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed 's/\[[^]]*\]//' | awk '{print $2}' | grep -v -- '-security' | grep '^https\?://' | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}
mirror=${SUPERMACHINE_DEBIAN_MIRROR:-$(apt_mirror)}

mkdir -p "$cache"
exec 9>"$cache/debian-$suite-minbase-$arch.lock"
flock 9
# Another caller may have finished it while we waited for the lock.
if [ -d "$tree" ]; then
  echo "$tree"
  exit 0
fi

curl -fsS --max-time 30 -o /dev/null "$mirror/dists/$suite/Release" 2>/dev/null ||
  cannot "Debian mirror $mirror unreachable (dists/$suite/Release)"

# A crashed earlier build leaves its staging dir: start over.
staging=$cache/.staging-debian-$suite-minbase-$arch
rm -rf "$staging"
log=$cache/debian-$suite-minbase-$arch.log
echo "debootstrap --variant=minbase $suite from $mirror (once per machine; log: $log)" >&2
if ! debootstrap --variant=minbase --arch="$arch" "$suite" "$staging" "$mirror" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  rm -rf "$staging"
  echo "debootstrap failed" >&2
  exit 1
fi
# Nothing host-specific is meant to stay in an image.
rm -f "$staging/etc/hostname" "$staging/etc/resolv.conf"
mv -T "$staging" "$tree"
echo "$tree"
