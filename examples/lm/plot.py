"""Loss curves of a train_lm run: curves.csv -> PNG (training loss smoothed, validation
loss as points), one line per FFN."""

import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(csv_path, png_path, title=""):
    series = defaultdict(lambda: defaultdict(list))
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            series[r["ffn"]][r["split"]].append((int(r["step"]), float(r["loss"])))
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (name, s) in enumerate(series.items()):
        style = dict(color=f"C{i % 10}", linestyle="--" if name.startswith("omnimoe-") else "-", label=name)
        tr = s.get("train", [])
        if tr:
            k = max(1, len(tr) // 50)  # moving average over about 2 % of the run
            xs = [tr[j][0] for j in range(k - 1, len(tr))]
            ys = [sum(v for _, v in tr[j - k + 1:j + 1]) / k for j in range(k - 1, len(tr))]
            ax_t.plot(xs, ys, **style)
        va = s.get("val", [])
        ax_v.plot([p[0] for p in va], [p[1] for p in va], marker="o", markersize=3, **style)
    for ax, what in ((ax_t, "training loss (moving average)"), (ax_v, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(what + ", nats per byte")
        ax.grid(alpha=0.3)
    ax_v.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
