#!/usr/bin/env python3
"""Train small byte-level language models whose feed-forward blocks come from the omnimoe
package (dense, gshard, deepseekmoe, pkm, peer, omnimoe) at matched activated parameters,
plus the paper's Table 2 ablations of OmniMoE, and write a results table and loss curves.

    python3 examples/train_lm.py --preset cpu-smoke --out out/lm-cpu     # about a minute
    python3 examples/train_lm.py --preset gpu --out out/lm-gpu           # one H100, minutes

Outputs in --out: results.csv (one row per FFN), curves.csv (train and validation loss by
step), log.txt (what was printed) and, with matplotlib, curves.png. docs/training.md reads a
committed GPU run. Needs the omnimoe package (README) and the corpus (examples/lm/data.py:
Debian's fortunes packages, installed by the project's setup). --check exits non-zero unless
every model's validation loss fell during training (the CI smoke test uses it).
"""

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm import data, ffns, metrics  # noqa: E402
from lm.model import LM  # noqa: E402

PRESETS = {
    # A few seconds per FFN on two CPU cores: shows the pipeline works and the loss falls.
    "cpu-smoke": dict(
        d=64, layers=2, heads=2, seq=64, batch=16, steps=60, lr=3e-3, eval_every=20, eval_windows=64, cost_reps=3,
        sizes=ffns.Sizes(hidden=64, omni_grid=16, omni_k=8, omni_shared=64, gshard_experts=8, gshard_k=2,
                         ds_experts=16, ds_k=4, ds_shared=32, pkm_grid=32, align=8)),
    # One H100: about two epochs of the corpus per model, all nine models in one device call.
    "gpu": dict(
        d=256, layers=4, heads=4, seq=256, batch=32, steps=600, lr=2e-3, eval_every=50, eval_windows=512,
        cost_reps=20,
        sizes=ffns.Sizes(hidden=256, omni_grid=64, omni_k=32, omni_shared=256, gshard_experts=16, gshard_k=2,
                         ds_experts=32, ds_k=4, ds_shared=128, pkm_grid=128, align=16)),
}


def mean_last(xs, n):
    tail = xs[-n:]
    return sum(tail) / len(tail)


def wsd(step: int, steps: int, warmup: float = 0.1, decay: float = 0.2) -> float:
    """Warmup-stable-decay: linear warmup over the first 10 % of the steps, constant, then a
    linear decay to zero over the last 20 %."""
    w, d = max(1, int(warmup * steps)), max(1, int(decay * steps))
    if step < w:
        return (step + 1) / w
    if step >= steps - d:
        return max(0.0, (steps - step) / d)
    return 1.0


def optimizer(model, lr):
    """AdamW; weight decay 0.1 on the matrices of the blocks, none on embeddings, positions,
    LayerNorms."""
    decay, plain = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and n.startswith("blocks.") else plain).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=next(model.parameters()).is_cuda)


@torch.no_grad()
def evaluate(model, windows, batch, device, collect=False):
    """Mean next-byte cross-entropy over the validation windows (and, with collect, the
    chosen-expert counts of every FFN). Eval mode: batchnorm uses its running statistics."""
    model.eval()
    for f in model.ffns():
        f.collect = collect
        f.chosen.zero_()
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch].to(device)
        loss = model(w[:, :-1], w[:, 1:])
        total += loss.item() * w.shape[0]
        n += w.shape[0]
    for f in model.ffns():
        f.collect = False
    model.train()
    return total / n


def train_one(name, cfg, splits, device, compute_dtype, log, curves):
    sizes = cfg["sizes"]
    torch.manual_seed(0)
    make = lambda: ffns.FFNBlock(ffns.build(name, sizes), compute_dtype)
    model = LM(data.VOCAB, cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"], make).to(device)
    c = ffns.counts(model.ffns()[0].inner)
    log(f"[{name}] {model.ffns()[0].inner!r}")
    log(f"[{name}] per FFN layer: activated {c['activated'] / 1e3:.1f} K, total {c['total'] / 1e6:.2f} M; "
        f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    opt = optimizer(model, cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd(s, cfg["steps"]))
    train, val = splits
    batches = data.Batches(train, cfg["seq"], cfg["batch"])
    windows = data.validation_windows(val, cfg["seq"], cfg["eval_windows"])
    first_val = evaluate(model, windows, cfg["batch"], device)
    curves.append((name, 0, "val", first_val))
    log(f"[{name}] step 0: val loss {first_val:.4f}")
    recent, t_train = [], 0.0
    for step in range(1, cfg["steps"] + 1):
        x, y = batches.next(device)
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = loss.item()  # synchronises: the step's time is its whole time
        t_train += time.perf_counter() - t0
        if not math.isfinite(lv):
            raise FloatingPointError(f"train_lm: {name}: loss {lv} at step {step}")
        recent.append(lv)
        curves.append((name, step, "train", lv))
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            v = evaluate(model, windows, cfg["batch"], device)
            curves.append((name, step, "val", v))
            log(f"[{name}] step {step}: train loss {mean_last(recent, cfg['eval_every']):.4f}"
                f", val loss {v:.4f}, {1e3 * t_train / step:.1f} ms/step")
    final_val = evaluate(model, windows, cfg["batch"], device, collect=True)
    row = {"ffn": name, **{k: int(v) for k, v in c.items()}, "steps": cfg["steps"],
           "tokens": cfg["steps"] * cfg["batch"] * cfg["seq"], "train_loss": mean_last(recent, 20),
           "val_loss_start": first_val, "val_loss": final_val, "val_ppl": metrics.perplexity(final_val),
           "step_ms": 1e3 * t_train / cfg["steps"]}
    if c["experts"]:
        row.update(metrics.routing_metrics([f.chosen for f in model.ffns()]))
    # The FFN alone at the training shape (a fresh block: the trained model is left as it is).
    torch.manual_seed(1)
    row.update(metrics.ffn_cost(make().to(device), cfg["batch"] * cfg["seq"], cfg["d"], device, cfg["cost_reps"]))
    log(f"[{name}] done: val loss {first_val:.4f} -> {final_val:.4f} (ppl {row['val_ppl']:.3f}), "
        f"FFN fwd+bwd {row['ffn_ms']:.3f} ms"
        + (f", peak {row['ffn_peak_mb']:.1f} MB" if math.isfinite(row["ffn_peak_mb"]) else "")
        + (f", usage {row['expert_usage']:.3f}, KL {row['kl_uniform']:.3f}" if c["experts"] else ""))
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


COLUMNS = ["ffn", "activated", "total", "experts", "top_k", "steps", "tokens", "train_loss", "val_loss_start",
           "val_loss", "val_ppl", "step_ms", "ffn_ms", "ffn_peak_mb", "expert_usage", "kl_uniform"]


def fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smoke")
    ap.add_argument("--ffn", default="all",
                    help="comma-separated FFNs: " + ", ".join(ffns.FFNS + ffns.ABLATIONS) + " (default: all)")
    ap.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", choices=["", "float32", "bfloat16"], default="",
                    help="FFN compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--steps", type=int, default=0, help="override the preset's step count")
    ap.add_argument("--corpus", default="", help=f"fortunes directory (default $OMNIMOE_CORPUS or {data.DEFAULT_CORPUS})")
    ap.add_argument("--out", default="out/lm", help="output directory")
    ap.add_argument("--check", action="store_true", help="fail unless every validation loss fell")
    args = ap.parse_args(argv)

    cfg = dict(PRESETS[args.preset])
    if args.steps:
        cfg["steps"] = args.steps
        cfg["eval_every"] = max(1, min(cfg["eval_every"], args.steps))
    names = list(ffns.FFNS + ffns.ABLATIONS) if args.ffn == "all" else [n.strip() for n in args.ffn.split(",")]
    for n in names:
        if n not in ffns.FFNS + ffns.ABLATIONS:
            ap.error(f"unknown FFN {n!r}; known: {', '.join(ffns.FFNS + ffns.ABLATIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bfloat16 FFNs on the GPU (the library's fast path; float32 master weights), float32 on the CPU.
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.dtype:
        compute_dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        # The baselines' backward (PyTorch recomputation, omnimoe/_baseline_backward.py) works
        # through the tokens in chunks of at most CHUNK_BYTES of intermediates: 1 GiB instead of
        # 128 MiB on the GPU, so PEER's backward runs in a few chunks, not dozens.
        import omnimoe._baseline_backward as bb
        bb.CHUNK_BYTES = 1 << 30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    splits = data.load_split(data.corpus_root(args.corpus))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"train_lm: preset {args.preset} on {where}, FFN dtype {compute_dtype}, corpus train {splits[0].numel()} "
        f"bytes, validation {splits[1].numel()} bytes; {time.strftime('%Y-%m-%d %H:%M:%S')}")
    log(f"train_lm: config {({k: v for k, v in cfg.items() if k != 'sizes'})}")
    rows, curves = [], []
    t0 = time.perf_counter()
    for n in names:
        rows.append(train_one(n, cfg, splits, device, compute_dtype, log, curves))
    log(f"train_lm: {len(names)} models in {time.perf_counter() - t0:.1f} s")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + ["device", "ffn_dtype"])
        for r in rows:
            w.writerow([fmt(r[c]) if c in r else "" for c in COLUMNS] + [where, str(compute_dtype).replace("torch.", "")])
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ffn", "step", "split", "loss"])
        w.writerows((n, s, sp, f"{v:.6g}") for n, s, sp, v in curves)
    try:
        from lm.plot import plot_curves
        plot_curves(out / "curves.csv", out / "curves.png", title=f"byte-level LM on fortunes, {where}")
    except ImportError as e:
        log(f"train_lm: no curves.png ({e})")
    fell = [r for r in rows if r["val_loss"] < r["val_loss_start"]]
    log(f"train_lm: validation loss fell for {len(fell)} of {len(rows)} models")
    if args.check and len(fell) != len(rows):
        bad = ", ".join(r["ffn"] for r in rows if r not in fell)
        log(f"train_lm: FAILED: the validation loss did not fall for {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
