#!/usr/bin/env bash
# The tests: build everything (Release) into build/ and run the ctest suites: label cpu
# always, label cuda too when a GPU is present. Installs nothing (.ci/run does).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OMNIMOE_BUILD_DIR:-build}  # another build directory, e.g. to keep build/ untouched

generator=()
if [[ ! -f "$build/CMakeCache.txt" ]] && command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "${generator[@]}"
cmake --build "$build" -j "$(nproc)"

ctest --test-dir "$build" --output-on-failure -L cpu -j "$(nproc)"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  ctest --test-dir "$build" --output-on-failure -L cuda
fi
