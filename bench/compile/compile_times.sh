#!/usr/bin/env bash
# What including each public header costs a user: a file with just that
# #include, compiled at -O0 (as a debug build would) and -fsyntax-only, by
# g++ with the flags the CMake package gives. Prints a markdown table:
# CPU seconds (user+sys, steadier than wall time on a busy 2-core host)
# and peak compiler memory. Run from a checkout; an optional second tree
# (e.g. a `git worktree` of an older commit) is measured the same way for
# a before/after table.
#   bench/compile/compile_times.sh [OTHER_TREE]
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
other=${1:-}
headers=(error.hpp prepared_image.hpp machine.hpp image.hpp vm.hpp pool.hpp snapshot_image.hpp supermachine.hpp)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
measure() { # TREE HEADER MODE -> "cpu_s peak_MiB"
  local tree=$1 header=$2 mode=$3
  [ -f "$tree/include/supermachine/$header" ] || { echo "- -"; return; }
  echo "#include <supermachine/$header>" > "$work/t.cpp"
  local flags=(-std=c++20 -I"$tree/include" -DBOOST_ASIO_NO_DEPRECATED)
  [ "$mode" = O0 ] && flags+=(-O0 -c -o "$work/t.o") || flags+=(-fsyntax-only)
  /usr/bin/time -f "%U %S %M" -o "$work/time" g++ "${flags[@]}" "$work/t.cpp" >/dev/null 2>&1 || { echo "fails -"; return; }
  awk '{printf "%.1f %.0f\n", $1 + $2, $3 / 1024}' "$work/time"
}
if [ -n "$other" ]; then
  echo "| header | before -O0 s | after -O0 s | before MiB | after MiB | after syntax-only s |"
  echo "|---|---|---|---|---|---|"
else
  echo "| header | -O0 s | -O0 MiB | syntax-only s |"
  echo "|---|---|---|---|"
fi
for h in "${headers[@]}"; do
  read -r now_s now_m < <(measure "$here" "$h" O0)
  read -r syn_s _ < <(measure "$here" "$h" syntax)
  if [ -n "$other" ]; then
    read -r old_s old_m < <(measure "$other" "$h" O0)
    echo "| \`$h\` | $old_s | $now_s | $old_m | $now_m | $syn_s |"
  else
    echo "| \`$h\` | $now_s | $now_m | $syn_s |"
  fi
done
