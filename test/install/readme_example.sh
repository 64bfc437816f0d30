#!/usr/bin/env bash
# install_readme_example: see CMakeLists.txt here.
set -euo pipefail
source_dir=$1 build_dir=$2
work=$(mktemp -d /tmp/supermachine-install-test.XXXXXX)
trap 'rm -rf "$work"' EXIT

# 1. Install (headers, package config, CLI, agent) into a fresh prefix.
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
test -x "$work/prefix/bin/supermachine"
test -x "$work/prefix/libexec/supermachine/supermachine-agent"

# 2. The README's first C++ block, byte for byte, as a separate project.
mkdir "$work/project"
awk '/^```cpp$/ {inside=1; next} inside && /^```$/ {exit} inside {print}' \
  "$source_dir/README.md" > "$work/project/main.cpp"
test -s "$work/project/main.cpp"
cat > "$work/project/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.20)
project(readme_example CXX)
find_package(supermachine CONFIG REQUIRED)
add_executable(readme_example main.cpp)
target_link_libraries(readme_example PRIVATE supermachine::supermachine)
target_compile_options(readme_example PRIVATE -Wall -Wextra -Werror)
CMAKE
cmake -S "$work/project" -B "$work/project/build" -G Ninja \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/project/build" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }

# 3. Run it: the agent comes from the prefix (no SUPERMACHINE_AGENT, not
# beside the program), the image from a temp cache.
kernel=$(bash "$source_dir/scripts/fetch-kernel.sh")
bash "$source_dir/scripts/make-demo-image.sh" "$work/demo" busybox >/dev/null
unset SUPERMACHINE_AGENT
out=$(cd "$work" && XDG_CACHE_HOME="$work/cache" SUPERMACHINE_KERNEL_DIR="$kernel" \
      "$work/project/build/readme_example" "oci:$work/demo:busybox")
echo "readme_example printed: $out"
[ "$out" = "hello from a microVM" ]

# 4. A missing image: a clear error, non-zero status, no crash.
set +e
err=$(cd "$work" && XDG_CACHE_HOME="$work/cache" "$work/project/build/readme_example" \
      "oci:$work/no-such-layout:tag" 2>&1 >/dev/null)
status=$?
set -e
echo "missing image: status $status: $err"
[ "$status" -eq 1 ] && [[ "$err" == error:* ]]
