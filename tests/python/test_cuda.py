"""The CUDA backend through the package, float32 and bfloat16: forward, routing and every
gradient against the float64 reference (on the library's own routing), training and
inference, torch.compile, opcheck, torch's current stream (a side stream and CUDA-graph
capture). Skipped without a GPU."""

import pytest
import torch

import omnimoe
from conftest import (CASES, Case, assert_close, check_current_stream_and_graph_capture, make_module, random_x,
                      reference_of)
from test_module import PARAM_NAMES, STAT_NAMES, check_routing

HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")

# The library's own CUDA tests use 1e-5 (f32) and 1e-2 (bf16) for y, 1e-4 and 3e-2 for the
# gradients, against its float64 CPU backward; a little slack on top.
Y_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 5e-4, torch.bfloat16: 4e-2}
ROUTING_TOL = 1e-4  # scores are float32 whatever the storage dtype

GPU_CASES = CASES + [
    # T K >> N: many tokens per expert.
    Case("many-tokens", 128, 256, (16, 16), 8),
    # T K << N: about one token per expert.
    Case("wide-grid", 64, 96, (64, 64), 4, gate="softmax", activation="gelu"),
]
TOKENS = {"many-tokens": (4, 128), "wide-grid": (2, 32)}


def test_cuda_backend_was_built():
    assert omnimoe.cuda_built, ("this machine has a GPU but omnimoe was built without CUDA: rebuild with a CUDA "
                                "toolkit (OMNIMOE_CUDA=1 pip install --no-build-isolation ./python)")
    assert omnimoe.cuda_available()


@pytest.mark.parametrize("path", ["gather", "dense"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_matches_reference(case, dtype, training, path, monkeypatch):
    monkeypatch.setenv("OMNIMOE_EXPERTS_PATH", path)  # the library's two experts paths
    check_cuda_against_reference(make_module(case, dtype, "cuda").train(training), case, dtype)


# The grid 1 x 4096: a dense 4096-way softmax router (the training example's ablation).
SCHEDULE_CASES = GPU_CASES[-2:] + [Case("grid-1x4096", 64, 64, (1, 4096), 32)]
TOKENS["grid-1x4096"] = (64,)


@pytest.mark.parametrize("schedule", ["token", "expert"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=str)
def test_cuda_schedule_matches_reference(case, dtype, training, schedule, monkeypatch):
    # The experts path chosen through the module's schedule argument, not the test variable.
    monkeypatch.delenv("OMNIMOE_EXPERTS_PATH", raising=False)
    check_cuda_against_reference(make_module(case, dtype, "cuda", schedule=schedule).train(training), case, dtype)


def test_cuda_schedule_reaches_the_library(monkeypatch):
    # Both schedules compute the same function in different summation orders: equal within
    # rounding, and not bit for bit, which shows the argument changed the path that ran.
    monkeypatch.delenv("OMNIMOE_EXPERTS_PATH", raising=False)
    case = GPU_CASES[-2]
    x = random_x(case, tokens=TOKENS[case.name], dtype=torch.float32, device="cuda")
    ys = [make_module(case, torch.float32, "cuda", schedule=s).eval()(x) for s in ("token", "expert")]
    assert_close(ys[0], ys[1], 1e-5, "token vs expert")
    assert not torch.equal(ys[0], ys[1]), "token and expert schedules gave bitwise equal y: was the schedule ignored?"


def check_cuda_against_reference(m, case, dtype):
    """Forward, routing, running statistics and every gradient of CUDA module m against the
    float64 reference on the library's own routing."""
    ref = reference_of(m, case)
    x = random_x(case, tokens=TOKENS.get(case.name, (3, 5)), dtype=dtype, device="cuda").requires_grad_(True)
    y, routing = m(x, return_routing=True)
    assert y.device.type == "cuda" and y.dtype == dtype
    check_routing(routing.__class__(*(t.cpu() for t in routing)), ref, x.detach().cpu(), ROUTING_TOL)
    xr = x.detach().cpu().double().requires_grad_(True)
    y_ref, _, _, gates_ref = ref(xr, expert_ids=routing.expert_ids.cpu())
    assert_close(y, y_ref, Y_TOL[dtype], "y")
    assert_close(routing.gates.reshape(-1, case.top_k), gates_ref, ROUTING_TOL, "gates")
    if case.router_norm == "batchnorm":
        for n in STAT_NAMES:
            assert_close(getattr(m, n), getattr(ref, n), 1e-5, n)
    gy = torch.randn(y_ref.shape, dtype=torch.float64)
    (y * gy.to("cuda", dtype)).sum().backward()
    (y_ref * gy.to(dtype).double()).sum().backward()
    assert_close(x.grad, xr.grad, GRAD_TOL[dtype], "grad x")
    for n in PARAM_NAMES:
        p = getattr(m, n)
        if p is not None:
            assert p.grad.device.type == "cuda" and p.grad.dtype == dtype
            assert_close(p.grad, getattr(ref, n).grad, GRAD_TOL[dtype], f"grad {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cuda_compile_fullgraph_training_step(dtype):
    case = GPU_CASES[-2]
    torch._dynamo.reset()
    eager = make_module(case, dtype, "cuda").train()
    compiled_module = make_module(case, dtype, "cuda").train()
    compiled = torch.compile(compiled_module, fullgraph=True)
    for seed in (1, 2):
        x = random_x(case, tokens=(2, 64), dtype=dtype, device="cuda", seed=seed)
        outs = []
        for model in (eager, compiled):
            xi = x.clone().requires_grad_(True)
            y = model(xi)
            (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
            outs.append((y.detach(), xi.grad))
        torch.testing.assert_close(outs[1][0], outs[0][0])
        torch.testing.assert_close(outs[1][1], outs[0][1])
    for n in PARAM_NAMES:
        torch.testing.assert_close(getattr(compiled_module, n).grad, getattr(eager, n).grad, msg=n)
    for n in STAT_NAMES:
        torch.testing.assert_close(getattr(compiled_module, n), getattr(eager, n), msg=n)


def test_cuda_opcheck():
    from test_ops import op_args

    case = CASES[0]
    for training in (False, True):
        m = make_module(case, torch.float32, "cuda").train(training)
        x = random_x(case, dtype=torch.float32, device="cuda")
        args = op_args(m, case, x, training, True, True)
        torch.library.opcheck(torch.ops.omnimoe.layer_forward.default, args)


def test_cuda_current_stream_and_graph_capture():
    case = GPU_CASES[-2]
    m = make_module(case, torch.bfloat16, "cuda").eval()
    x = random_x(case, tokens=(256,), dtype=torch.bfloat16, device="cuda")
    x2 = random_x(case, tokens=(256,), dtype=torch.bfloat16, device="cuda", seed=9)
    check_current_stream_and_graph_capture(m, x, x2)


def test_cuda_and_cpu_agree():
    case = GPU_CASES[-2]
    m = make_module(case, torch.float32, "cpu").eval()
    x = random_x(case, tokens=(64,), dtype=torch.float32)
    y_cpu, r_cpu = m(x, return_routing=True)
    m.cuda()
    y_gpu, r_gpu = m(x.cuda(), return_routing=True)
    same = (r_cpu.expert_ids == r_gpu.expert_ids.cpu()).all(dim=-1)
    assert same.float().mean() > 0.9  # near-ties may flip between backends
    assert_close(y_gpu.cpu()[same], y_cpu[same], 1e-4, "y on tokens routed alike")


def test_cuda_experts_paths_agree(monkeypatch):
    # The same layer through the library's gather and dense experts paths.
    case = GPU_CASES[-1]
    m = make_module(case, torch.float32, "cuda").eval()
    x = random_x(case, tokens=(16,), dtype=torch.float32, device="cuda")
    ys = []
    for path in ("gather", "dense"):
        monkeypatch.setenv("OMNIMOE_EXPERTS_PATH", path)
        ys.append(m(x))
    assert_close(ys[0], ys[1], 1e-5, "gather vs dense")
