#!/usr/bin/env python3
"""Plot an `omnimoe bench --suite paper --csv` result as two figures in the manner of the
paper's Figure 4 (docs/benchmarks.md explains what is measured):

  OUT_params.png  latency and peak memory against activated parameters, K sweep at T = T0
  OUT_tokens.png  latency and peak memory against the number of tokens T, each layer at its
                  smallest K (the dense SwiGLU at its smallest width)

Solid lines: routing included (the dense layer has none); dashed: routing excluded
(uniform random ids through forward_routed, as the paper's harness timed it).

usage: scripts/plot_paper.py RESULT.csv OUT_PREFIX
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAYERS = ["omnimoe", "dense", "gshard", "deepseekmoe", "pkm", "peer"]
LABELS = {"omnimoe": "OmniMoE", "dense": "Dense SwiGLU", "gshard": "GShard", "deepseekmoe": "DeepSeekMoE",
          "pkm": "PKM", "peer": "PEER"}
COLORS = {"omnimoe": "C3", "dense": "C7", "gshard": "C0", "deepseekmoe": "C1", "pkm": "C2", "peer": "C4"}


def num(row, key):
    v = row.get(key, "")
    try:
        return float(v)
    except ValueError:
        return float("nan")


def series(rows, layer, sweep, routing, xkey):
    pts = [r for r in rows if r["layer"] == layer and sweep in r["sweep"].split() and r["routing"] == routing
           and r["ms"] not in ("", "-")]
    pts.sort(key=lambda r: num(r, xkey))
    return pts


def panel(ax_ms, ax_mem, rows, sweep, xkey, xscale=1.0):
    peak = max((num(r, "peak MB") for r in rows if num(r, "peak MB") == num(r, "peak MB")), default=0)
    unit, div = ("GiB", 1024.0) if peak > 2048 else ("MB", 1.0)
    for layer in LAYERS:
        for routing, style in (("router", "-"), ("dense", "-"), ("random ids", "--")):
            pts = series(rows, layer, sweep, routing, xkey)
            if not pts:
                continue
            xs = [num(r, xkey) / xscale for r in pts]
            label = LABELS[layer] + (" (random ids)" if routing == "random ids" else "")
            kw = dict(color=COLORS[layer], linestyle=style, marker="o" if style == "-" else "s", markersize=4,
                      label=label)
            ax_ms.plot(xs, [num(r, "ms") for r in pts], **kw)
            if routing != "random ids":  # memory differs only by the routing tensors
                ax_mem.plot(xs, [num(r, "peak MB") / div for r in pts], **kw)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("forward latency, ms (median, log scale)")
    ax_mem.set_ylabel(f"peak memory, {unit} (weights, x, y, routing, workspace)")
    for ax in (ax_ms, ax_mem):
        ax.grid(True, which="both", alpha=0.3)


def main():
    src, prefix = sys.argv[1], sys.argv[2]
    rows = list(csv.DictReader(open(src)))
    if not rows:
        sys.exit(f"{src}: no rows")
    device, dtype, date = rows[0]["device"], rows[0]["dtype"], rows[0]["date"]
    t0 = int(min(num(r, "T") for r in rows if "k" in r["sweep"].split()))
    subtitle = f"{device}, {dtype}, {date}"

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.2))
    panel(a, b, rows, "k", "activated params", 1e6)
    for ax in (a, b):
        ax.set_xlabel("activated parameters per token (millions)")
    a.set_title(f"latency vs activated parameters, T = {t0}")
    b.set_title(f"peak memory vs activated parameters, T = {t0}")
    a.legend(fontsize=7, ncol=2)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix + "_params.png", dpi=110)

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.2))
    panel(a, b, rows, "t", "T")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
    a.set_title("latency vs tokens, smallest activated-parameter budget")
    b.set_title("peak memory vs tokens, smallest activated-parameter budget")
    a.legend(fontsize=7, ncol=2)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(prefix + "_tokens.png", dpi=110)


if __name__ == "__main__":
    main()
