#!/usr/bin/env python3
"""Plot an `omnimoe bench --suite omnimoe --csv` result: time against the floor for each
configuration (log scale), routed and random-id series, with the dense equivalent.

usage: scripts/plot_bench.py RESULT.csv OUT.png [TITLE]
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src, dst = sys.argv[1], sys.argv[2]
    title = sys.argv[3] if len(sys.argv) > 3 else src
    rows = list(csv.DictReader(open(src)))
    routed = [r for r in rows if r["routing"] in ("router", "fwd+bwd")]
    names = [r["config"] for r in routed]
    x = range(len(names))
    num = lambda r, k: float(r[k]) if r.get(k) not in (None, "", "-") else float("nan")
    fig, ax = plt.subplots(figsize=(12, 5.5))
    ax.plot(x, [num(r, "ms") for r in routed], "o-", label="omnimoe " + ("forward + backward" if routed and routed[0]["routing"] == "fwd+bwd" else "forward (router included)"))
    rand = {r["config"]: r for r in rows if r["routing"] == "random ids"}
    ax.plot(x, [num(rand[n], "ms") if n in rand else float("nan") for n in names], "s--",
            label="omnimoe forward, random ids (paper harness)")
    ax.plot(x, [num(r, "floor ms") for r in routed], "k_", markersize=14, label="floor (issue model)")
    step = bool(routed) and routed[0]["routing"] == "fwd+bwd"
    factor = 3 if step else 2  # the issues' goals: 2x the floor forward, 3x a training step
    ax.plot(x, [factor * num(r, "floor ms") for r in routed], "r_", markersize=14,
            label=f"goal ({factor}x floor, {'training step' if step else 'forward'})")
    ax.plot(x, [num(r, "dense ms") for r in routed], "^:", label="dense equivalent (cuBLAS bf16)")
    ax.set_yscale("log")
    ax.set_ylabel("ms (median of graph replays)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main()
