#!/usr/bin/env bash
# One command on a fresh Debian 12: install, build, fetch the default guest
# kernel, and run the main job.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install-deps.sh"
bash "$root/scripts/build.sh"
"${SUPERMACHINE_BUILD_DIR:-$root/build}/bin/supermachine" version
