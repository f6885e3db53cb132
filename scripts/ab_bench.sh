#!/usr/bin/env bash
# A/B timing in one device call: the working tree (build-gpu, as gpu_check.sh builds it)
# against a reference source tree, on the same GPU, alternating per configuration so that
# clock and thermal drift fall on both sides alike.
# Usage: REF=ref-tree scripts/ab_bench.sh CONFIG...
#   REF   a source tree to compare against, e.g. made here with
#         `rm -rf ref-tree && mkdir ref-tree && git archive main | tar -x -C ref-tree`
#         and sent with the device call's carry (ref-tree/ is ignored by git)
#   CONFIG  exact benchmark configuration names (omnimoe bench --only matches substrings)
#   AB_BACKWARD=0  time the forward only (default 1: forward and the training step)
# Writes $OUT/ab.csv: the bench CSV rows with two columns added, tree (a = working tree,
# b = reference) and step (forward, train).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
REF=${REF:?set REF to the reference source tree}
mkdir -p "$OUT/ab"
[[ -x build-gpu/omnimoe ]] || {
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_FUZZ=OFF ${CMAKE_ARGS:-} >"$OUT/ab_build.log" 2>&1 &&
    cmake --build build-gpu -j 16 --target omnimoe >>"$OUT/ab_build.log" 2>&1
} || { tail -30 "$OUT/ab_build.log"; exit 1; }
cmake -S "$REF" -B build-ref -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_FUZZ=OFF -DOMNIMOE_BASELINES=OFF \
  -DOMNIMOE_BUILD_TESTS=OFF >"$OUT/ab_build_ref.log" 2>&1 &&
  cmake --build build-ref -j 16 --target omnimoe >>"$OUT/ab_build_ref.log" 2>&1 ||
  { tail -30 "$OUT/ab_build_ref.log"; exit 1; }

status=0
steps=(forward)
[[ ${AB_BACKWARD:-1} == 1 ]] && steps+=(train)
for cfg in "$@"; do
  for step in "${steps[@]}"; do
    for tree in a b; do
      bin=build-gpu/omnimoe
      [[ $tree == b ]] && bin=build-ref/omnimoe
      flags=()
      [[ $step == train ]] && flags=(--backward)
      csv="$OUT/ab/$cfg.$step.$tree.csv"
      "$bin" bench --device cuda --suite omnimoe --only "$cfg" "${flags[@]}" --csv "$csv" >>"$OUT/ab.log" 2>&1 || status=1
    done
  done
done
# One CSV: the first file's header, then every file's rows with tree and step appended.
first=1
for f in "$OUT"/ab/*.csv; do
  base=${f##*/}
  tree=${base%.csv}; tree=${tree##*.}
  step=${base%.*.csv}; step=${step##*.}
  if ((first)); then head -1 "$f" | sed 's/$/,tree,step/'; first=0; fi
  tail -n +2 "$f" | sed "s/\$/,$tree,$step/"
done >"$OUT/ab.csv"
rm -rf "$OUT/ab"
# config, routing, ms, workspace MB, tree, step
awk -F, 'NR > 1 {printf "%-22s %-10s %-5s %-2s %8s ms %7s MB\n", $1, $2, $NF, $(NF-1), $10, $13}' "$OUT/ab.csv"
exit $status
