"""Shared helpers of the omnimoe package tests: layer cases, random modules (fresh random
values, never zeros), the float64 reference built from the same values, error measures."""

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import omnimoe  # noqa: E402
from reference import ReferenceOmniMoE  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    hidden: int
    intermediate: int
    grid: tuple
    top_k: int
    router_norm: str = "batchnorm"
    gate: str = "exp"
    activation: str = "silu"

    def __str__(self):
        return self.name


# Every switch is covered: both norms, both gates, the three activations, no shared branch, K = N.
CASES = [
    Case("default", 16, 24, (4, 6), 5),
    Case("softmax-gelu", 12, 20, (5, 3), 4, gate="softmax", activation="gelu"),
    Case("none-relu", 8, 16, (3, 4), 3, router_norm="none", activation="relu"),
    Case("no-shared", 10, 0, (4, 4), 6, gate="softmax"),
    Case("k-equals-n", 6, 8, (2, 3), 6),
]


def make_module(case, dtype=torch.float32, device="cpu", seed=0, schedule="auto"):
    """A random OmniMoE of `case`; random (non-trivial) running statistics."""
    g = torch.Generator().manual_seed(seed)
    m = omnimoe.OmniMoE(case.hidden, case.intermediate, case.grid, case.top_k, case.router_norm, case.gate,
                        case.activation, schedule=schedule)
    with torch.no_grad():
        for p in m.parameters():
            # Spread the expert rows wider than the default init so the routed branch is not
            # negligible next to the shared one.
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        if case.router_norm == "batchnorm":
            m.running_mean_row.copy_(torch.randn(case.grid[0], generator=g, dtype=torch.float64) * 0.3)
            m.running_mean_col.copy_(torch.randn(case.grid[1], generator=g, dtype=torch.float64) * 0.3)
            m.running_var_row.copy_(torch.rand(case.grid[0], generator=g, dtype=torch.float64) + 0.5)
            m.running_var_col.copy_(torch.rand(case.grid[1], generator=g, dtype=torch.float64) + 0.5)
    return m.to(device=device, dtype=dtype)


def reference_of(module, case):
    """The float64 reference holding the module's current parameters and statistics."""
    ref = ReferenceOmniMoE(case.hidden, case.intermediate, case.grid, case.top_k, case.router_norm, case.gate,
                           case.activation)
    sd = {k: v.detach().double().cpu() for k, v in module.state_dict().items()}
    ref.load_state_dict(sd)
    ref.train(module.training)
    return ref


def random_x(case, tokens=(3, 5), dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*tokens, case.hidden, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def rel_error(got, want):
    """||got - want|| / ||want|| in float64; inf when got has a NaN (NaN never passes)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return float("inf")
    denom = want.norm().item()
    return (got - want).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(got, want, tol, what):
    err = rel_error(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


# Relative tolerances by storage dtype (DESIGN section 5: fp32 ~1e-5, bf16 1e-3..1e-2).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(params=CASES, ids=str)
def case(request):
    return request.param


def check_current_stream_and_graph_capture(m, x, x2):
    """An inference module m on CUDA: called on a side stream it queues on torch's current
    stream (same result), and it captures into a CUDA graph that, replayed on new input x2,
    gives m(x2) bitwise (capture fails if anything runs on another stream or synchronises)."""
    with torch.no_grad():
        want = m(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the op must queue on torch's current stream
            got = m(x)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(got, want)
        static_x = x.clone()
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            m(static_x)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = m(static_x)
        static_x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, m(x2))
