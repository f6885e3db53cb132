"""torch.library.opcheck on the registered ops: schema, fake (meta) kernels, autograd
registration and AOT dispatch with dynamic shapes."""

import pytest
import torch

import omnimoe  # noqa: F401  (registers the ops)
from conftest import CASES, make_module, random_x

PARAM_NAMES = ("router_row", "router_col", "expert_in", "expert_out", "gate", "up", "down")
STAT_NAMES = ("running_mean_row", "running_var_row", "running_mean_col", "running_var_col")


def op_args(m, case, x, training, return_routing, requires_grad):
    params = [getattr(m, n) for n in PARAM_NAMES]
    params = [None if p is None else p.detach().clone().requires_grad_(requires_grad) for p in params]
    stats = [getattr(m, n) for n in STAT_NAMES]
    stats = [None if s is None else s.clone() for s in stats]
    return (x.reshape(-1, case.hidden).clone().requires_grad_(requires_grad), *params, *stats, case.top_k,
            case.router_norm, case.gate, case.activation, training, return_routing)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_layer_forward(case, training):
    for dtype in (torch.float32, torch.float64):
        m = make_module(case, dtype).train(training)
        x = random_x(case, dtype=dtype)
        for return_routing in (False, True):
            for requires_grad in (False, True):
                args = op_args(m, case, x, training, return_routing, requires_grad)
                torch.library.opcheck(torch.ops.omnimoe.layer_forward.default, args)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_layer_backward(case, training):
    m = make_module(case).train(training)
    x = random_x(case)
    args = op_args(m, case, x, training, False, False)
    y, ids, _, _, *new_stats = torch.ops.omnimoe.layer_forward(*args)
    stats = new_stats if case.router_norm == "batchnorm" else [None] * 4
    grad_y = torch.randn_like(y)
    bargs = (grad_y, *args[:8], *stats, ids, case.top_k, case.router_norm, case.gate, case.activation, training)
    torch.library.opcheck(torch.ops.omnimoe.layer_backward.default, bargs)


@pytest.mark.parametrize("schedule", ["auto", "expert", "token"])
def test_opcheck_with_schedule(schedule):
    # The trailing schedule argument, given explicitly: schema, fake kernels and autograd
    # (which hands the forward's schedule to the backward op).
    case = CASES[1]
    m = make_module(case).train()
    args = (*op_args(m, case, random_x(case), True, True, True), schedule)
    torch.library.opcheck(torch.ops.omnimoe.layer_forward.default, args)
    fargs = (*op_args(m, case, random_x(case), True, False, False), schedule)
    y, ids, _, _, *new_stats = torch.ops.omnimoe.layer_forward(*fargs)
    bargs = (torch.randn_like(y), *fargs[:8], *new_stats, ids, case.top_k, case.router_norm, case.gate,
             case.activation, True, schedule)
    torch.library.opcheck(torch.ops.omnimoe.layer_backward.default, bargs)


def test_forward_op_does_not_mutate_its_inputs():
    case = CASES[0]
    m = make_module(case).train()
    args = op_args(m, case, random_x(case), True, True, False)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.ops.omnimoe.layer_forward(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
