#!/usr/bin/env bash
# The tests: build everything (Release) into build/ and run the ctest suites: label cpu
# always, label cuda too when a GPU is present; then, where torch is installed, build the
# PyTorch package (python/) into $build/python-site and run its tests (tests/python).
# Installs nothing system-wide (.ci/run installs the dependencies).
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

# The PyTorch package: built as pip builds it, installed into a folder of the build tree
# (not into the environment), then tested from there.
if python3 -c "import torch, pytest" 2>/dev/null; then
  abs_build=$(cd "$build" && pwd)
  site="$abs_build/python-site"
  rm -rf "$site"
  echo "test.sh: building the PyTorch package (python/) into $site"
  OMNIMOE_PYTHON_BUILD_DIR="${OMNIMOE_PYTHON_BUILD_DIR:-$abs_build/python}" \
    python3 -m pip install --quiet --root-user-action=ignore --no-build-isolation --no-deps --target "$site" ./python
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" python3 -m pytest tests/python -q -p no:cacheprovider
else
  echo "test.sh: SKIPPING the PyTorch package tests (tests/python): python3 lacks torch or pytest (.ci/run installs them)"
fi
