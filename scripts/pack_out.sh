#!/usr/bin/env bash
# Packs everything under $OUT into $OUT/out.tgz, so that one device call brings every file
# back: the device tool returns at most eight files and drops the rest (session r lost its
# test logs and path CSVs that way). Run it last in a call that wrote files from several
# steps, e.g. `...; scripts/ab_bench.sh ...; OUT=$OUT/t scripts/gpu_check.sh tests;
# scripts/pack_out.sh`. Files named in KEEP (space-separated, relative to $OUT; default
# ab.csv) stay loose beside the archive as well.
set -uo pipefail
OUT=${OUT:?set OUT to the output folder of the device call}
cd "$OUT" || exit 1
files=$(find . -type f ! -name out.tgz | sed 's|^\./||' | sort)
[[ -n $files ]] || exit 0
tmp=$(mktemp)
tar -czf "$tmp" $files || exit 1
keep=" ${KEEP:-ab.csv} "
for f in $files; do [[ $keep == *" $f "* ]] || rm -f "$f"; done
find . -mindepth 1 -type d -empty -delete
mv "$tmp" out.tgz
echo "pack_out: $(wc -w <<<"$files") files in $OUT/out.tgz"
