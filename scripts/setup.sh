#!/usr/bin/env bash
# One command on a fresh Debian 12: install what is needed, build, fetch the
# default guest kernel (Debian's cloud kernel, unpacked into the cache, never
# installed), make the demo image (busybox, as an OCI layout: this machine
# reaches no public registry), and run a command from it in a microVM.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SUPERMACHINE_BUILD_DIR:-$root/build}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/supermachine
bash "$root/scripts/install-deps.sh"
# Only what the main job needs; scripts/test.sh builds the rest.
SUPERMACHINE_BUILD_TARGETS="supermachine_cli supermachine-agent" bash "$root/scripts/build.sh"
bash "$root/scripts/fetch-kernel.sh"
bash "$root/scripts/make-demo-image.sh" "$cache/demo-image" busybox
exec "$build/bin/supermachine" run "oci:$cache/demo-image:busybox" \
  sh -c 'echo "Hello from $(uname -sr) in a supermachine microVM"; head -1 /etc/os-release'
