#!/usr/bin/env bash
# The main job: build omnimoe (Release) into build/, then `omnimoe check` and
# `omnimoe bench` on the best device present (cuda when this build has it and a GPU is
# visible, else cpu). Extra arguments go to `omnimoe bench` (e.g. --csv results.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${OMNIMOE_BUILD_DIR:-build}  # another build directory, e.g. to keep build/ untouched

generator=()
if [[ ! -f "$build/CMakeCache.txt" ]] && command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "${generator[@]}"
cmake --build "$build" --target omnimoe -j "$(nproc)"

"$build/omnimoe" check
"$build/omnimoe" bench "$@"
