#!/usr/bin/env python3
"""Per-kernel medians from `ncu --csv` output (one row per launch and metric).

Usage: ncu_summary.py FILE.csv [LABEL]
Prints one line per kernel (name without template arguments or parameters): launches and
the median of each metric, in the order the metrics first appear. Lines before the CSV
header (the profiled program's own output) are skipped.
"""
import csv
import re
import statistics
import sys


def short(name):
    # ncu writes the anonymous namespace as "(anonymous namespace)" or "<unnamed>" (its CSV
    # has shown "unnamed>::"); either would unbalance the template brackets below.
    name = re.sub(r"\(anonymous namespace\)::|(?<![\w>])<unnamed>::|unnamed>::", "", name)
    name = re.sub(r"\(.*$", "", name)  # parameters
    name = re.sub(r"^\S+\s+(?=\S)", "", name) if " " in name.split("<")[0] else name  # return type
    depth, out = 0, []
    for ch in name:  # drop template arguments, keeping the base name
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    base = "".join(out)
    m = re.search(r"<([^<>]*)>", name)  # innermost template arguments, for context
    return base.split("::")[-1] + (f"<{m.group(1)}>" if m else "")


def main():
    path = sys.argv[1]
    label = sys.argv[2] if len(sys.argv) > 2 else path
    with open(path, newline="") as f:
        lines = f.readlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        print(f"{label}: no ncu CSV rows")
        return
    values, metrics, launches = {}, [], {}
    for row in csv.DictReader(lines[start:]):
        k, m = short(row["Kernel Name"]), row["Metric Name"]
        try:
            v = float(row["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        if m not in metrics:
            metrics.append(m)
        values.setdefault(k, {}).setdefault(m, []).append(v)
        launches.setdefault(k, set()).add(row["ID"])
    print(f"== {label}: kernel, launches, median " + ", ".join(metrics))
    for k, per in values.items():
        cols = [f"{statistics.median(per[m]):.4g}" if m in per else "-" for m in metrics]
        print(f"{k}, {len(launches[k])}, " + ", ".join(cols))


if __name__ == "__main__":
    main()
