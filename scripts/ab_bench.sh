#!/usr/bin/env bash
# A/B timing in one device call: the working tree (build-gpu, as gpu_check.sh builds it)
# against one or more other source trees, on the same GPU, alternating per configuration
# so that clock and thermal drift fall on every side alike.
# Usage: REF=ref-tree scripts/ab_bench.sh CONFIG...
#        REF="ref-tree exp-a exp-b:VAR=value" scripts/ab_bench.sh CONFIG...
#   REF   source trees to compare against, e.g. made here with
#         `rm -rf ref-tree && mkdir ref-tree && git archive main | tar -x -C ref-tree`
#         (or `git archive BRANCH` for an experiment) and sent with the device call's carry
#         (ref-tree/ and exp-*/ are ignored by git). Each is built once, in build-<its name>,
#         all of them at the same time (a tree's build is bound by its slowest file, not by
#         the cores). TREE:VAR=value runs TREE's binary with VAR=value in its environment
#         (an experiment switch), labelled TREE_value; a:VAR=value does so with the working
#         tree's binary (labelled a_value).
#   CONFIG  exact benchmark configuration names (omnimoe bench --only matches substrings)
#   AB_BACKWARD=0  time the forward only (default 1: forward and the training step)
#   AB_FORWARD=0   time the training step only
#   AB_SUITE  the bench suite holding the configurations (default omnimoe; e.g. wide)
# Writes $OUT/ab.csv: the bench CSV rows with two columns added, tree (a = working tree,
# else the tree's label; with a single REF it is called b) and step (forward, train).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
read -r -a refs <<<"${REF:?set REF to the reference source tree(s)}"
mkdir -p "$OUT/ab"

# Trees: label -> binary and environment (one reference keeps the label b, as the CSVs of
# earlier runs), and the builds, all at once: the working tree (as gpu_check.sh configures
# it) and each distinct tree.
declare -A bin=([a]=build-gpu/omnimoe) envs=([a]=) built=()
labels=(a)
pids=()
if [[ ! -x build-gpu/omnimoe ]]; then
  { cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_FUZZ=OFF ${CMAKE_ARGS:-} &&
    cmake --build build-gpu -j 16 --target omnimoe; } >"$OUT/ab_build.log" 2>&1 &
  pids+=($!)
fi
for ref in "${refs[@]}"; do
  tree=${ref%%:*}
  name=$(basename "$tree")
  label=$name extra=
  if [[ $ref == *:* ]]; then extra=${ref#*:}; label=${name}_${extra#*=}; fi
  ((${#refs[@]} == 1)) && label=b
  if [[ $tree == a ]]; then  # a:VAR=value: the working tree's binary with VAR=value
    [[ -n $extra ]] || { echo "ab_bench: 'a' needs :VAR=value"; exit 1; }
    label=a_${extra#*=}
    [[ $label == *.* || -n ${bin[$label]:-} ]] && { echo "ab_bench: label $label holds a dot or repeats"; exit 1; }
    bin[$label]=build-gpu/omnimoe envs[$label]=$extra
    labels+=("$label")
    continue
  fi
  [[ $label == *.* ]] && { echo "ab_bench: label $label holds a dot"; exit 1; }
  bin[$label]=build-$name/omnimoe
  envs[$label]=$extra
  labels+=("$label")
  [[ -n ${built[$name]:-} ]] && continue
  built[$name]=1
  { cmake -S "$tree" -B "build-$name" -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_FUZZ=OFF -DOMNIMOE_BASELINES=OFF \
    -DOMNIMOE_BUILD_TESTS=OFF && cmake --build "build-$name" -j 16 --target omnimoe; } >"$OUT/ab_build_$name.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { tail -n 30 "$OUT"/ab_build*.log; exit 1; }; done

status=0
steps=()
[[ ${AB_FORWARD:-1} == 1 ]] && steps+=(forward)
[[ ${AB_BACKWARD:-1} == 1 ]] && steps+=(train)
((${#steps[@]})) || { echo "ab_bench: AB_FORWARD=0 and AB_BACKWARD=0 leave nothing to time"; exit 1; }
for cfg in "$@"; do
  for step in "${steps[@]}"; do
    for tree in "${labels[@]}"; do
      flags=()
      [[ $step == train ]] && flags=(--backward)
      csv="$OUT/ab/$cfg.$step.$tree.csv"
      env ${envs[$tree]} "${bin[$tree]}" bench --device cuda --suite "${AB_SUITE:-omnimoe}" --only "$cfg" "${flags[@]}" --csv "$csv" >>"$OUT/ab.log" 2>&1 ||
        status=1
    done
  done
done
# One CSV: the first file's header, then every file's rows with tree and step appended
# (file names are CONFIG.STEP.TREE.csv; configuration names hold no dots).
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
awk -F, 'NR > 1 {printf "%-22s %-10s %-5s %-8s %8s ms %7s MB\n", $1, $2, $NF, $(NF-1), $10, $13}' "$OUT/ab.csv"
exit $status
