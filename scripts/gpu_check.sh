#!/usr/bin/env bash
# One device call does everything: build (Release, sm_90a), CUDA tests, compute-sanitizer,
# the benchmark and a per-kernel profile; CSVs go to $OUT (default ./out), the logs packed into
# $OUT/logs.tar.gz at the end (the device tool returns at most 8 files).
# Usage: scripts/gpu_check.sh [tests|sanitize|bench|bench_backward|profile|kernels|dense_outputs|paper|paths|all|python|train]...
#   (default: all = the five C++ steps; python = build the PyTorch package into
#   build-python/site and run tests/python; train = build the package and run
#   examples/train_lm.py --preset gpu, corpus from $OMNIMOE_CORPUS, default data/fortunes;
#   dense_outputs = the paper family's forward with the dense path's output forced each way;
#   paths = forward and training step with each experts path forced (OMNIMOE_EXPERTS_PATH;
#   the backward recomputes from the ids, so it could take another path than the forward),
#   configurations BENCH_ONLY (default paper-k512; several, space-separated, allowed) of the
#   bench suite BENCH_SUITE (default omnimoe; crossover: the backward rule's larger T);
#   paper = `omnimoe bench --suite paper` (OmniMoE beside the five baselines, DESIGN section 3;
#   needs the default OMNIMOE_BASELINES=ON build; plot its CSV with scripts/plot_paper.py)
#   TRAIN_ARGS="..."  extra train_lm.py arguments (e.g. --steps 20 --ffn omnimoe)
#   BENCH_ONLY=text   limit the benchmark to configurations whose name contains text
#   PROFILE_ONLY=text configuration(s) to profile (default: two representative ones)
#   PROFILE_STEPS=..  forward and/or backward (default both); PROFILE_COUNT=n launches profiled
#                     per run (default 600: a training step's full profile ran past 300 s)
#   kernels = per-kernel medians (time, registers, DRAM %) of the kernels matching
#   KERNELS (ncu regex; default the gather path's), PROFILE_COUNT launches (default 40) of
#   each PROFILE_ONLY configuration (default paper-k512-t4096) and PROFILE_STEPS
#   PROFILE_KERNEL=re the profile step instead reads one launch of the kernels matching re
#                     (ncu's throughput, memory, warp-state and occupancy sections and the
#                     stall reasons), of the PROFILE_ONLY configurations (default
#                     paper-k512-t4096) in PROFILE_STEPS (default forward); PROFILE_SKIP
#                     matching launches skipped first (default 20: for a forward kernel,
#                     inside the warm-up forward, past its first expert chunks; a backward
#                     kernel launched once a step wants a small skip, e.g. 2; the bench's
#                     ceilings run first, so a regex must not match their kernels)
#   TESTS_ONLY=regex  limit the CUDA test suites to those ctest -R matches
#   CTEST_JOBS=n      CUDA test processes at once on the one GPU (default 4: the tests are
#                     correctness checks, none timed and none reading free memory; a call's
#                     device time is mostly these tests)
#   SANITIZE_FILTER=f the gtest filter the sanitizers run (default: a cross-section)
#   SANITIZE_DENSE_FILTER=f the same for the runs with the dense path's output forced
#   CMAKE_ARGS="..."  extra configure arguments (e.g. -DOMNIMOE_BASELINES=OFF)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
steps=("${@:-all}")
optional=" python train dense_outputs paper paths kernels "  # steps `all` leaves out
want() {
  for s in "${steps[@]}"; do
    [[ $s == "$1" ]] && return 0
    [[ $s == all && $optional != *" $1 "* ]] && return 0
  done
  return 1
}
status=0

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/gpu.txt"
date -u +"%Y-%m-%d %H:%M UTC" >>"$OUT/gpu.txt"
if want tests || want sanitize || want bench || want bench_backward || want profile || want dense_outputs ||
  want paper || want paths || want kernels; then
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_FUZZ=OFF ${CMAKE_ARGS:-} >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  cmake --build build-gpu -j 16 ${BUILD_TARGETS:+--target $BUILD_TARGETS} >>"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -40; exit 1; }
fi
# The PyTorch package with CUDA, built as pip builds it (library build kept in build-python/lib).
site=$PWD/build-python/site
build_python() {  # each call reinstalls from the tree; the CMake build in build-python/lib is incremental
  rm -rf "$site"
  OMNIMOE_CUDA=1 MAX_JOBS=16 OMNIMOE_PYTHON_BUILD_DIR=$PWD/build-python/lib python3 -m pip install --quiet \
    --root-user-action=ignore --no-build-isolation --no-deps --target "$site" ./python >"$OUT/python_build.log" 2>&1 ||
    { tail -30 "$OUT/python_build.log"; exit 1; }
}

if want tests; then
  (cd build-gpu && ctest -L cuda ${TESTS_ONLY:+-R "$TESTS_ONLY"} --output-on-failure -j "${CTEST_JOBS:-4}" 2>&1) >"$OUT/ctest_cuda.log"
  grep -E "tests passed|FAILED|Failed" "$OUT/ctest_cuda.log" | head -20
  grep -q ", 0 tests failed" "$OUT/ctest_cuda.log" || grep -q "100% tests passed" "$OUT/ctest_cuda.log" || status=1
fi
# compute-sanitizer over test_cuda: memcheck NAME FILTER / racecheck NAME FILTER, extra
# environment from the caller (e.g. OMNIMOE_EXPERTS_PATH=dense racecheck ...). cuBLASLt's
# Hopper kernels (nvjet_*) synchronise through mbarriers, which racecheck does not model: it
# reports hazards inside them; any hazard in another kernel fails the step. Racecheck of
# Cases/CudaBackward.*router_600x520_bf16 with the dense path forced needs ~130 GB of
# racecheck state (session i): it ends unchecked.
memcheck() {
  compute-sanitizer --tool memcheck --error-exitcode 3 build-gpu/tests/cuda/test_cuda --gtest_filter="$2" \
    >>"$OUT/sanitize.log" 2>&1
  local rc=$?
  echo "compute-sanitizer memcheck$1: rc=$rc" | tee -a "$OUT/sanitize.log"
  [[ $rc == 0 ]] || status=1
}
# Racecheck runs one test at a time, each in its own process under a time limit
# (RACECHECK_TIMEOUT seconds, default 120): one run over a whole filter keeps every test's
# state and was killed by the host at the largest cases (status 9, session k), losing the
# report of the tests before. A test that ends at the limit or is killed (status 124, 137)
# is listed as unchecked, not failed; any other failure or a hazard outside cuBLASLt fails
# the step.
racecheck() {
  local t rc ours checked=0 unchecked=() bad=0 log="$OUT/racecheck.log"
  for t in $(build-gpu/tests/cuda/test_cuda --gtest_list_tests --gtest_filter="$2" |
    awk '/^[^ ]/ {s = $1} /^  / {print s $1}'); do
    timeout "${RACECHECK_TIMEOUT:-120}" compute-sanitizer --tool racecheck build-gpu/tests/cuda/test_cuda \
      --gtest_filter="$t" >"$log" 2>&1
    rc=$?
    ours=$(grep -E "Race reported" "$log" | grep -vc nvjet)
    if [[ $rc == 124 || $rc == 137 ]]; then
      unchecked+=("$t (status $rc)")
      continue
    fi
    checked=$((checked + 1))
    if [[ $rc != 0 || $ours != 0 ]]; then
      bad=$((bad + 1))
      echo "racecheck$1: $t: rc=$rc, hazards outside cuBLASLt: $ours" >>"$OUT/sanitize.log"
      grep -E "Race reported" "$log" | grep -v nvjet | head -5 >>"$OUT/sanitize.log"
      [[ $rc == 0 ]] || grep -vE "^=========  |^=========$|Race reported" "$log" | tail -40 >>"$OUT/sanitize.log"
    fi
  done
  echo "compute-sanitizer racecheck$1: $checked tests checked, $bad with hazards outside cuBLASLt or failing," \
    "${#unchecked[@]} unchecked" | tee -a "$OUT/sanitize.log"
  for t in "${unchecked[@]}"; do echo "  unchecked (time or memory limit): $t"; done | tee -a "$OUT/sanitize.log"
  [[ $bad == 0 ]] || status=1
  rm -f "$log"
}
if want sanitize; then
  : >"$OUT/sanitize.log"
  filter=${SANITIZE_FILTER:-'*small*:*large_k_600*:*odd_h36*:*expert_chunks*:*Graph*:*Routed*:*Ties*:*full_axes_256*:*Backward*:*Schedule*'}
  memcheck "" "$filter"
  racecheck "" "$filter"
  # The dense path's output forms forced (the automatic choices above take each on a few
  # cases only): memcheck on both, racecheck on the sparse output (its task lists live in
  # shared memory).
  dfilter=${SANITIZE_DENSE_FILTER:-'Cases/CudaForward.*:CudaRouted.*:CudaForwardGraph.*'}
  for mode in sparse product; do
    OMNIMOE_EXPERTS_PATH=dense OMNIMOE_DENSE_OUTPUT=$mode memcheck ", dense path, $mode output" "$dfilter"
  done
  OMNIMOE_EXPERTS_PATH=dense OMNIMOE_DENSE_OUTPUT=sparse racecheck ", dense path, sparse output" "$dfilter"
fi
if want bench; then
  build-gpu/omnimoe check --device cuda >"$OUT/check_cuda.log" 2>&1 || status=1
  grep -E "FAIL|passed" "$OUT/check_cuda.log"
  build-gpu/omnimoe bench --device cuda --suite omnimoe ${BENCH_ONLY:+--only $BENCH_ONLY} --csv "$OUT/bench_omnimoe.csv" \
    >"$OUT/bench_omnimoe.log" 2>&1 || status=1
  grep -E "ceilings|context:|MISS|PASS" "$OUT/bench_omnimoe.log" | grep -v workspace
fi
if want bench_backward; then
  build-gpu/omnimoe bench --device cuda --suite omnimoe --backward ${BENCH_ONLY:+--only $BENCH_ONLY} \
    --csv "$OUT/bench_backward.csv" >"$OUT/bench_backward.log" 2>&1 || status=1
  grep -E "MISS|PASS|omnimoe:" "$OUT/bench_backward.log"
  # The expert tables' gradients in sparse form (what an optimizer of a 2^20-row table uses).
  build-gpu/omnimoe bench --device cuda --suite omnimoe --backward --sparse-grads --only ${BENCH_ONLY:-lm-} \
    --csv "$OUT/bench_backward_sparse.csv" >"$OUT/bench_backward_sparse.log" 2>&1 || status=1
  grep -E "MISS|PASS|omnimoe:" "$OUT/bench_backward_sparse.log"
fi
if want dense_outputs; then  # where the sparse output beats the product with P (dense_output_sparse)
  for mode in sparse product; do
    OMNIMOE_DENSE_OUTPUT=$mode build-gpu/omnimoe bench --device cuda --suite omnimoe --only "${BENCH_ONLY:-paper-}" \
      --csv "$OUT/dense_output_$mode.csv" >"$OUT/dense_output_$mode.log" 2>&1 || status=1
  done
fi
if want paths; then  # which experts path each pass would rather take (paper-k512: the rule picks dense)
  # BENCH_ONLY may name several configurations (space-separated): one CSV per path and step.
  for path in gather dense; do
    for step in forward train; do
      flags=()
      [[ $step == train ]] && flags=(--backward)
      csv=$OUT/path_${path}_$step.csv log=$OUT/path_${path}_$step.log
      : >"$log"
      n=0
      for cfg in ${BENCH_ONLY:-paper-k512}; do
        rm -f "$csv.part"
        OMNIMOE_EXPERTS_PATH=$path build-gpu/omnimoe bench --device cuda --suite "${BENCH_SUITE:-omnimoe}" --only "$cfg" \
          ${flags[@]+"${flags[@]}"} --csv "$csv.part" >>"$log" 2>&1 || status=1
        [[ -f $csv.part ]] || continue  # a failed run: its rows are missing, the step fails
        if ((n++ == 0)); then cat "$csv.part" >"$csv"; else tail -n +2 "$csv.part" >>"$csv"; fi
      done
      rm -f "$csv.part"
      grep -E "MISS|PASS" "$log" | grep -v workspace | sed "s/^/$path $step: /"
    done
  done
fi
if want paper; then
  build-gpu/omnimoe bench --suite paper --device cuda --csv "$OUT/paper.csv" >"$OUT/paper.log" 2>&1 || status=1
  grep -E "FAIL|error" "$OUT/paper.log" | head -5
  tail -3 "$OUT/paper.log"
fi
if want profile && [[ -n ${PROFILE_KERNEL:-} ]]; then
  : >"$OUT/profile.log"
  for cfg in ${PROFILE_ONLY:-paper-k512-t4096}; do
    for step in ${PROFILE_STEPS:-forward}; do
      flags=()
      [[ $step == backward ]] && flags=(--backward)
      echo "=== $cfg${flags:+ backward}, kernels ~ $PROFILE_KERNEL" >>"$OUT/profile.log"
      ncu --clock-control none --cache-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats -k "regex:$PROFILE_KERNEL" \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        --launch-skip "${PROFILE_SKIP:-20}" --launch-count 1 \
        build-gpu/omnimoe bench --device cuda --suite omnimoe "${flags[@]}" --only "$cfg" --reps 2 \
        >>"$OUT/profile.log" 2>&1
    done
  done
  grep -vE "^\[" "$OUT/profile.log" |
    grep -iE "^===|^  [a-zA-Z_].*\(|Throughput|Hit Rate|Duration|stalled|Occupancy|Registers Per|Bandwidth" | head -80
elif want profile; then
  : >"$OUT/profile.log"
  for cfg in ${PROFILE_ONLY:-lm-1024x1024-t4096 paper-k512-t4096}; do
    for step in ${PROFILE_STEPS:-forward backward}; do
      flags=()
      [[ $step == backward ]] && flags=(--backward)
      echo "=== $cfg${flags:+ backward}" >>"$OUT/profile.log"
      # Clocks as found and caches left warm: the times match a graph replay's kernels. At
      # most PROFILE_COUNT launches (the ceilings' few, then the warm-up calls): every
      # launch is replayed, and a paper-family training step has thousands.
      ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
        --launch-count "${PROFILE_COUNT:-600}" \
        build-gpu/omnimoe bench --device cuda --suite omnimoe "${flags[@]}" --only "$cfg" --reps 2 >>"$OUT/profile.log" 2>&1
    done
  done
  grep -E "^===|^  [a-zA-Z_].*\(|gpu__time_duration.sum" "$OUT/profile.log" >"$OUT/profile_summary.txt"
  head -80 "$OUT/profile_summary.txt"
fi
# Per-kernel medians of a few kernels (time, registers, DRAM use) in forward and training
# steps: ncu on the named kernels only (the set-up kernels before them are skipped by name),
# summarised by scripts/ncu_summary.py.
if want kernels; then
  for cfg in ${PROFILE_ONLY:-paper-k512-t4096}; do
    for step in ${PROFILE_STEPS:-forward backward}; do
      flags=()
      [[ $step == backward ]] && flags=(--backward)
      csv="$OUT/kernels_${cfg}_$step.csv"
      ncu --clock-control none --cache-control none --csv --launch-count "${PROFILE_COUNT:-40}" \
        -k "regex:${KERNELS:-^(gather_kernel|tokens_vec_kernel|dx_vec_kernel|gather_chunks_kernel|rows_kernel|pieces_kernel|flag_bad_kernel)\$}" \
        --metrics gpu__time_duration.sum,launch__registers_per_thread,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        build-gpu/omnimoe bench --device cuda --suite omnimoe "${flags[@]}" --only "$cfg" --reps 2 >"$csv" 2>&1
      python3 scripts/ncu_summary.py "$csv" "$cfg $step" | tee -a "$OUT/kernels_summary.txt"
    done
  done
fi
if want python; then
  build_python
  PYTHONPATH=$site python3 -m pytest tests/python -q -p no:cacheprovider >"$OUT/python_tests.log" 2>&1 || status=1
  tail -3 "$OUT/python_tests.log"
fi
if want train; then
  build_python
  PYTHONPATH=$site python3 examples/train_lm.py --preset gpu --corpus "${OMNIMOE_CORPUS:-data/fortunes}" \
    --out "$OUT/lm" ${TRAIN_ARGS:-} >"$OUT/train_stdout.log" 2>&1 || status=1
  grep -E "done:|train_lm:|Error|error" "$OUT/train_stdout.log" | tail -30
fi
# The device tool brings back at most 8 files: the logs travel as one archive, CSVs loose.
(cd "$OUT" && logs=$(ls | grep -E '\.(log|txt)$') && [[ -n $logs ]] && tar -czf logs.tar.gz $logs && rm -f $logs)
exit $status
