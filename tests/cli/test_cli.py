#!/usr/bin/env python3
"""CLI tests of `omnimoe` (run, check, bench), one ctest per case.

usage: test_cli.py OMNIMOE CASE     run one case (exit 0 on success)
       test_cli.py --list           print the case names (CMake registers them; names
                                    starting with cuda_ need a GPU: ctest label cuda)
"""
import math
import os
import subprocess
import sys
import tempfile

sys.dont_write_bytecode = True  # keep the source tree clean
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402
import safetensors_io as st  # noqa: E402

OMNIMOE = None
CASES = {}
LAYER_NAMES = ["router_row", "router_col", "expert_in", "expert_out", "gate", "up", "down"]
STAT_NAMES = ["running_mean_row", "running_var_row", "running_mean_col", "running_var_col"]


def case(fn):
    CASES[fn.__name__] = fn
    return fn


class Failure(Exception):
    pass


def expect(cond, message):
    if not cond:
        raise Failure(message)


def omnimoe(*args):
    """Runs the tool; returns (exit status, stdout, stderr)."""
    p = subprocess.run([OMNIMOE, *map(str, args)], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


# ---- inputs -------------------------------------------------------------------------

SIZES = dict(T=5, H=6, I=4, Nr=3, Nc=4, K=3)


def make_layer(seed=1, dtype="F32", stat_dtype=None, shared=True, norm="batchnorm", gate="exp",
               activation="silu", **sizes):
    """(tensors for st.write, metadata, cfg for reference.forward, values as stored)."""
    s = dict(SIZES, **sizes)
    I = s["I"] if shared else 0
    raw = reference.random_layer(seed, s["T"], s["H"], I, s["Nr"], s["Nc"], batchnorm=norm == "batchnorm")
    tensors, values = {}, {}
    for name, (shape, vals) in raw.items():
        dt = (stat_dtype or dtype) if name in STAT_NAMES else dtype
        tensors[name] = (dt, shape, vals)
        values[name] = st.round_to(dt, vals)  # the reference sees exactly what the file holds
    metadata = {"top_k": str(s["K"]), "grid_rows": str(s["Nr"]), "grid_cols": str(s["Nc"]),
                "router_norm": norm, "gate": gate, "activation": activation}
    cfg = dict(H=s["H"], I=I, grid_rows=s["Nr"], grid_cols=s["Nc"], top_k=s["K"],
               router_norm=norm, gate=gate, activation=activation)
    return tensors, metadata, cfg, values


class Workdir:
    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory()
        return self

    def __exit__(self, *exc):
        self.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)


def run_layer(tensors, metadata, *flags):
    """Writes the input, runs `omnimoe run`, returns the output's (tensors, metadata)."""
    with Workdir() as w:
        st.write(w.path("in.safetensors"), tensors, metadata)
        code, out, err = omnimoe("run", "--in", w.path("in.safetensors"), "--out", w.path("out.safetensors"), *flags)
        expect(code == 0, "omnimoe run failed (%d): %s" % (code, err))
        return st.read(w.path("out.safetensors"))


# ---- comparisons ----------------------------------------------------------------------

def close(name, got, want, rtol, atol=0.0):
    expect(len(got) == len(want), "%s: %d values, expected %d" % (name, len(got), len(want)))
    scale = max([abs(v) for v in want] + [1e-30])
    for i, (g, w) in enumerate(zip(got, want)):
        expect(math.isfinite(g), "%s[%d] = %r is not finite" % (name, i, g))
        expect(abs(g - w) <= atol + rtol * (abs(w) + scale),
               "%s[%d] = %.9g, expected %.9g" % (name, i, g, w))


def check_outputs(out, ref, dtype, T, K, H, rtol):
    tensors, _ = out
    for name, shape, dt in [("y", [T, H], dtype), ("expert_ids", [T, K], "I64"),
                            ("scores", [T, K], dtype), ("gates", [T, K], dtype)]:
        expect(name in tensors, "output has no tensor %r (has %s)" % (name, sorted(tensors)))
        expect(tensors[name][0] == dt and tensors[name][1] == shape,
               "%s: %s %s, expected %s %s" % (name, tensors[name][0], tensors[name][1], dt, shape))
    ids = tensors["expert_ids"][2]
    expect(ids == [e for row in ref["ids"] for e in row], "expert_ids %s, expected %s" % (ids, ref["ids"]))
    close("scores", tensors["scores"][2], ref["scores"], rtol)
    close("gates", tensors["gates"][2], ref["gates"], rtol)
    close("y", tensors["y"][2], ref["y"], rtol)


# ---- run: values ------------------------------------------------------------------------

@case
def run_f32_inference():
    tensors, md, cfg, vals = make_layer(seed=1)
    out = run_layer(tensors, md)
    check_outputs(out, reference.forward(vals, cfg, training=False), "F32", 5, 3, 6, 1e-5)
    extra = set(out[0]) - {"y", "expert_ids", "scores", "gates"}
    expect(not extra, "inference output has unexpected tensors %s" % sorted(extra))


@case
def run_f64_train_softmax_gelu():
    tensors, md, cfg, vals = make_layer(seed=2, dtype="F64", gate="softmax", activation="gelu")
    out = run_layer(tensors, md, "--train")
    ref = reference.forward(vals, cfg, training=True)
    check_outputs(out, ref, "F64", 5, 3, 6, 1e-10)
    for name in STAT_NAMES:
        expect(out[0][name][0] == "F64" and out[0][name][1] == [len(vals[name])],
               "%s: %s %s" % (name, out[0][name][0], out[0][name][1]))
        close(name, out[0][name][2], ref[name], 1e-10)


@case
def run_bf16_train_converts_statistics():
    tensors, md, cfg, vals = make_layer(seed=3, dtype="BF16", stat_dtype="BF16")
    out = run_layer(tensors, md, "--train")
    ref = reference.forward(vals, cfg, training=True)
    tensors_out = out[0]
    expect(tensors_out["y"][0] == "BF16" and tensors_out["scores"][0] == "BF16", "outputs must be BF16")
    close("y", tensors_out["y"][2], ref["y"], 2e-2)
    for name in STAT_NAMES:
        expect(tensors_out[name][0] == "BF16", "%s must keep its input dtype BF16" % name)
        close(name, tensors_out[name][2], ref[name], 1e-2)


@case
def run_f32_stats_f64_file():
    # Running statistics may come in any float dtype: here F64 beside an F32 layer.
    tensors, md, cfg, vals = make_layer(seed=4, dtype="F32", stat_dtype="F64")
    out = run_layer(tensors, md, "--train")
    ref = reference.forward(vals, cfg, training=True)
    for name in STAT_NAMES:
        expect(out[0][name][0] == "F64", "%s must keep its input dtype F64" % name)
        close(name, out[0][name][2], ref[name], 1e-5)


@case
def run_y_depends_on_x():
    tensors, md, _, _ = make_layer(seed=5)
    y1 = run_layer(tensors, md)[0]["y"][2]
    dtype, shape, x = tensors["x"]
    tensors["x"] = (dtype, shape, [v * 0.5 + 0.1 for v in x])
    y2 = run_layer(tensors, md)[0]["y"][2]
    expect(all(math.isfinite(v) for v in y1 + y2), "y is not finite")
    expect(y1 != y2, "y did not change with x")


@case
def run_schedule_option():
    # The CPU computes one way whatever the schedule: each value gives the reference result
    # (and the same bytes as the default); the output's metadata records the schedule.
    tensors, md, cfg, vals = make_layer(seed=9, dtype="F64")
    ref = reference.forward(vals, cfg, training=True)
    default = run_layer(tensors, md, "--train")
    expect(default[1].get("schedule") == "auto", "default schedule in the metadata: %r" % default[1])
    for schedule in ("auto", "expert", "token"):
        out = run_layer(tensors, md, "--train", "--schedule", schedule)
        check_outputs(out, ref, "F64", 5, 3, 6, 1e-10)
        expect(out[1].get("schedule") == schedule, "--schedule %s: metadata %r" % (schedule, out[1]))
        expect(out[0] == default[0], "--schedule %s changed the CPU results" % schedule)


# ---- run: gradients -------------------------------------------------------------------

def check_backward(out, vals, cfg, training, shared):
    tensors = out[0]
    names = ["x"] + [n for n in LAYER_NAMES if shared or n not in ("gate", "up", "down")]
    for name in ("gate", "up", "down"):
        expect(shared or "grad_" + name not in tensors, "grad_%s present without a shared branch" % name)
    numeric = reference.numeric_gradients(vals, cfg, training, names)
    for name in names:
        g = "grad_" + name
        expect(g in tensors, "output has no %s" % g)
        expect(tensors[g][0] == "F64", "%s: dtype %s, expected F64" % (g, tensors[g][0]))
        close(g, tensors[g][2], numeric[name], 1e-6, 1e-8)


@case
def run_backward_train():
    tensors, md, cfg, vals = make_layer(seed=6, dtype="F64")
    check_backward(run_layer(tensors, md, "--train", "--backward"), vals, cfg, True, True)


@case
def run_backward_inference_no_shared():
    tensors, md, cfg, vals = make_layer(seed=7, dtype="F64", shared=False, norm="none", gate="softmax",
                                        activation="relu")
    check_backward(run_layer(tensors, md, "--backward"), vals, cfg, False, False)


# ---- run: bad input -------------------------------------------------------------------

def expect_rejected(data, what, *flags, status=(1, 127)):
    """Runs on file bytes `data`; expects the status range, one 'omnimoe: ' message that
    mentions `what`, and no output file."""
    with Workdir() as w:
        with open(w.path("in.safetensors"), "wb") as f:
            f.write(data)
        out_path = w.path("out.safetensors")
        code, _, err = omnimoe("run", "--in", w.path("in.safetensors"), "--out", out_path, *flags)
        expect(status[0] <= code <= status[1], "%s: exit status %d, expected %d..%d (stderr: %s)"
               % (what, code, status[0], status[1], err.strip()))
        expect(err.startswith("omnimoe: "), "%s: message must start with 'omnimoe: ', got %r" % (what, err))
        expect(what.lower() in err.lower(), "%s: message does not name it: %r" % (what, err))
        expect(not os.path.exists(out_path), "%s: an output file was written" % what)
        leftovers = [n for n in os.listdir(w.tmp.name) if n != "in.safetensors"]
        expect(not leftovers, "%s: files left behind: %s" % (what, leftovers))


def bad_file(seed=8, drop=(), metadata=None, replace=None, **layer_args):
    tensors, md, _, _ = make_layer(seed=seed, **layer_args)
    for name in drop:
        del tensors[name]
    for name, value in (replace or {}).items():
        tensors[name] = value
    md.update(metadata or {})
    md = {k: v for k, v in md.items() if v is not None}
    return st.serialize(tensors, md)


@case
def bad_missing_tensor():
    for name in ["x", "router_row", "router_col", "expert_in", "expert_out", "running_var_col"]:
        expect_rejected(bad_file(drop=[name]), name)
    expect_rejected(bad_file(drop=["up"]), "up")  # gate and down without up
    tensors, md, _, _ = make_layer(seed=8)
    del tensors["grad_y"]
    expect_rejected(st.serialize(tensors, md), "grad_y", "--backward")


@case
def bad_shapes():
    f32 = lambda *shape: ("F32", list(shape), [0.5] * math.prod(shape))  # noqa: E731
    T, H, I, Nr, Nc = 5, 6, 4, 3, 4
    expect_rejected(bad_file(replace={"router_row": f32(Nr + 1, H)}), "router_row")
    expect_rejected(bad_file(replace={"router_col": f32(Nc, H + 1)}), "router_col")
    expect_rejected(bad_file(replace={"expert_in": f32(Nr * Nc - 1, H)}), "expert_in")
    expect_rejected(bad_file(replace={"expert_out": f32(Nr * Nc, H, 1)}), "expert_out")
    expect_rejected(bad_file(replace={"down": f32(I, H)}), "down")
    expect_rejected(bad_file(replace={"running_mean_row": f32(Nc)}), "running_mean_row")
    expect_rejected(bad_file(replace={"x": f32(T * H)}), "x")
    expect_rejected(bad_file(replace={"expert_in": ("F64", [Nr * Nc, H], [0.5] * (Nr * Nc * H))}), "expert_in")
    expect_rejected(bad_file(replace={"x": ("I32", [T, H], [1] * (T * H))}), "x")


@case
def bad_metadata():
    expect_rejected(bad_file(metadata={"top_k": "13"}), "top_k")  # K > N = 12
    for bad in ["12abc", "-3", "1e3", "0", "", " 3", "+3", "3.0", "99999999999999999999999", "2147483648"]:
        expect_rejected(bad_file(metadata={"top_k": bad}), "top_k")
    expect_rejected(bad_file(metadata={"grid_rows": "three"}), "grid_rows")
    expect_rejected(bad_file(metadata={"grid_cols": None}), "grid_cols")
    expect_rejected(bad_file(metadata={"router_norm": "layernorm"}), "router_norm")
    expect_rejected(bad_file(metadata={"gate": "sigmoid"}), "gate")
    expect_rejected(bad_file(metadata={"activation": "tanh"}), "activation")


@case
def bad_file_format():
    good = bad_file()
    expect_rejected(good[:-7], "in.safetensors")           # truncated data
    expect_rejected(good[:5], "in.safetensors")            # truncated length
    expect_rejected(good[:8] + b"{not json" + good[17:], "in.safetensors")
    expect_rejected((10 ** 9).to_bytes(8, "little") + good[8:], "in.safetensors")
    expect_rejected(b"", "in.safetensors")
    with Workdir() as w:
        code, _, err = omnimoe("run", "--in", w.path("absent.safetensors"), "--out", w.path("o.safetensors"))
        expect(1 <= code <= 127 and "absent.safetensors" in err, "missing input file: %d %r" % (code, err))


@case
def bad_command_line():
    with Workdir() as w:
        st.write(w.path("in.safetensors"), *make_layer()[:2])
        inp, out = w.path("in.safetensors"), w.path("out.safetensors")
        for args in [["run", "--in", inp], ["run", "--in", inp, "--out", out, "--bogus"],
                     ["run", "--in", inp, "--out", out, "--device", "tpu"], ["frobnicate"],
                     ["bench", "--suite", "nope"], ["bench", "--reps", "0"], ["check", "--seed", "x"]]:
            code, _, err = omnimoe(*args)
            expect(code == 2 and err.startswith("omnimoe: "), "%s: exit %d, %r" % (args, code, err))
            expect(not os.path.exists(out), "%s: wrote an output" % args)
        for args in [["run", "--in", inp, "--out", out, "--schedule", "fast"], ["run", "--in", inp, "--out", out,
                     "--schedule"], ["check", "--schedule", "dense"], ["bench", "--schedule=expert_centric"]]:
            code, _, err = omnimoe(*args)
            expect(code == 2 and err.startswith("omnimoe: ") and "--schedule" in err,
                   "%s: exit %d, %r (the message must name --schedule)" % (args, code, err))
            expect(not os.path.exists(out), "%s: wrote an output" % args)
    code, text, _ = omnimoe("--help")
    expect(code == 0 and "run" in text and "check" in text and "bench" in text, "--help")
    code, _, _ = omnimoe()
    expect(code == 2, "no command must exit 2")


# ---- check and bench --------------------------------------------------------------------

@case
def check_passes():
    code, out, err = omnimoe("check", "--device", "cpu")
    expect(code == 0, "omnimoe check failed (%d):\n%s%s" % (code, out, err))
    lines = out.splitlines()
    expect(any(l.startswith("PASS gradients") for l in lines), "no gradient checks ran:\n" + out)
    expect(not any(l.startswith("FAIL") for l in lines), out)


@case
def bench_smoke_csv():
    with Workdir() as w:
        csv = w.path("bench.csv")
        code, out, err = omnimoe("bench", "--device", "cpu", "--suite", "smoke", "--reps", "2", "--csv", csv)
        expect(code == 0, "omnimoe bench failed (%d): %s" % (code, err))
        expect("tiny-8x8-t64" in out and "[1/1]" in err, "table or progress line missing:\n%s%s" % (out, err))
        with open(csv) as f:
            rows = [line.rstrip("\n").split(",") for line in f]
        expect(len(rows) == 2 and rows[0][0] == "config" and "ms" in rows[0], "CSV: %s" % rows)
        expect(len(rows[1]) == len(rows[0]) and rows[1][0] == "tiny-8x8-t64", "CSV row: %s" % rows)
        expect(float(rows[1][rows[0].index("ms")]) > 0, "CSV ms: %s" % rows[1])


# ---- CUDA (label cuda: registered only in CUDA builds, run where a GPU is present) --------

@case
def cuda_check_passes():
    code, out, err = omnimoe("check", "--device", "cuda")
    expect(code == 0, "omnimoe check --device cuda failed (%d):\n%s%s" % (code, out, err))
    expect(any(l.startswith("PASS cuda-forward") for l in out.splitlines()), "no CUDA check passed:\n" + out)
    expect(not any(l.startswith(("FAIL", "SKIP")) for l in out.splitlines()), out)


@case
def cuda_run_matches_reference():
    for dtype, rtol in [("F32", 2e-3), ("BF16", 3e-2)]:
        tensors, md, cfg, vals = make_layer(seed=11, dtype=dtype, stat_dtype="F32")
        for flags, training in [((), False), (("--train",), True)]:
            out = run_layer(tensors, md, "--device", "cuda", *flags)
            ref = reference.forward(vals, cfg, training=training)
            check_outputs(out, ref, dtype, 5, 3, 6, rtol)


@case
def cuda_run_schedules_match_reference():
    # Both experts paths chosen through --schedule (training forward, F32) against the
    # float64 reference. The sizes make the automatic rule pick one of them, so one value
    # changes the path: the library's CUDA tests check that the config decides it.
    tensors, md, cfg, vals = make_layer(seed=13, dtype="F32", stat_dtype="F32")
    ref = reference.forward(vals, cfg, training=True)
    for schedule in ("expert", "token"):
        out = run_layer(tensors, md, "--device", "cuda", "--train", "--schedule", schedule)
        check_outputs(out, ref, "F32", 5, 3, 6, 2e-3)
        expect(out[1].get("schedule") == schedule, "--schedule %s: metadata %r" % (schedule, out[1]))


@case
def cuda_run_refuses_f64():
    tensors, md, _, _ = make_layer(seed=12, dtype="F64")
    expect_rejected(st.serialize(tensors, md), "F64", "--device", "cuda")


@case
def cuda_bench_smoke():
    code, out, err = omnimoe("bench", "--device", "cuda", "--suite", "smoke", "--reps", "3")
    expect(code == 0 and "tiny-8x8-t64" in out, "omnimoe bench --device cuda failed (%d): %s" % (code, err))


def main(argv):
    global OMNIMOE
    if argv[1:] == ["--list"]:
        print(";".join(CASES))
        return 0
    if len(argv) != 3 or argv[2] not in CASES:
        print(__doc__, file=sys.stderr)
        return 2
    OMNIMOE = argv[1]
    try:
        CASES[argv[2]]()
    except Failure as e:
        print("FAIL %s: %s" % (argv[2], e))
        return 1
    print("PASS %s" % argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
