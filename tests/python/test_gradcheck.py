"""torch.autograd.gradcheck in float64 on the CPU: the library's gradients of x and every
parameter against finite differences, through the registered autograd formula."""

import pytest
import torch

import omnimoe
from conftest import CASES, make_module, random_x

PARAM_NAMES = ("router_row", "router_col", "expert_in", "expert_out", "gate", "up", "down")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_f64(case, training):
    m = make_module(case, torch.float64).train(training)
    x = random_x(case, tokens=(5,), dtype=torch.float64)
    names = [n for n in PARAM_NAMES if getattr(m, n) is not None]
    inputs = [x] + [getattr(m, n).detach().clone() for n in names]
    for t in inputs:
        t.requires_grad_(True)
    stats = [m.running_mean_row, m.running_var_row, m.running_mean_col, m.running_var_col]

    def layer(x, *params):
        p = dict(zip(names, params))
        return omnimoe.omnimoe_layer(
            x, p["router_row"], p["router_col"], p["expert_in"], p["expert_out"], p.get("gate"), p.get("up"),
            p.get("down"), *[None if s is None else s.clone() for s in stats], top_k=case.top_k,
            router_norm=case.router_norm, gate_fn=case.gate, activation=case.activation, training=training)

    # Finite differences of 1e-6 do not flip these random routings (scores are O(1) apart).
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
