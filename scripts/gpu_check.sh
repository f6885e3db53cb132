#!/usr/bin/env bash
# One device call does everything: build (Release, sm_90a), CUDA tests, compute-sanitizer,
# then the benchmarks; logs and CSVs go to $OUT (default ./out).
# Usage: scripts/gpu_check.sh [tests|sanitize|bench|all]...   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
steps=("${@:-all}")
want() { for s in "${steps[@]}"; do [[ $s == all || $s == "$1" ]] && return 0; done; return 1; }
status=0

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_FUZZ=OFF >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j 16 ${BUILD_TARGETS:+--target $BUILD_TARGETS} >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }

if want tests; then
  (cd build-gpu && ctest -L cuda --output-on-failure -j 1 2>&1) | tee "$OUT/ctest_cuda.log" | tail -40 || status=1
  grep -q "tests passed" "$OUT/ctest_cuda.log" && grep -q ", 0 tests failed" "$OUT/ctest_cuda.log" || status=1
fi
if want sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 build-gpu/tests/cuda/test_cuda \
      --gtest_filter='*small*:*large_k_600*:*Graph*' >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    echo "compute-sanitizer $tool: rc=$rc"; tail -3 "$OUT/sanitize_$tool.log"
    [[ $rc == 0 ]] || status=1
  done
fi
if want bench; then
  build-gpu/omnimoe check --device cuda 2>&1 | tee "$OUT/check_cuda.log" | tail -20 || status=1
  build-gpu/omnimoe bench --device cuda --suite omnimoe --csv "$OUT/bench_omnimoe.csv" 2>&1 | tee "$OUT/bench_omnimoe.log" | tail -40
fi
exit $status
