"""torch.compile(fullgraph=True) of the module (no graph break) gives the eager results:
outputs, every gradient, and the running statistics updated in training mode."""

import pytest
import torch

from conftest import CASES, make_module, random_x

PARAM_NAMES = ("router_row", "router_col", "expert_in", "expert_out", "gate", "up", "down")
STAT_NAMES = ("running_mean_row", "running_var_row", "running_mean_col", "running_var_col")


def step(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend, training):
    case = CASES[0]
    torch._dynamo.reset()
    eager = make_module(case).train(training)
    compiled_module = make_module(case).train(training)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    for seed in (1, 2):  # a second call reuses the compiled graph
        x = random_x(case, seed=seed)
        y_e, gx_e = step(eager, x)
        y_c, gx_c = step(compiled, x)
        torch.testing.assert_close(y_c, y_e)
        torch.testing.assert_close(gx_c, gx_e)
    for n in PARAM_NAMES:
        torch.testing.assert_close(getattr(compiled_module, n).grad, getattr(eager, n).grad, msg=n)
    for n in STAT_NAMES:
        torch.testing.assert_close(getattr(compiled_module, n), getattr(eager, n), msg=n)


def test_compile_dynamic_token_count():
    case = CASES[1]
    torch._dynamo.reset()
    eager = make_module(case).train()
    compiled_module = make_module(case).train()
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens in ((3, 5), (2, 7), (11,)):
        x = random_x(case, tokens=tokens)
        y_e, gx_e = step(eager, x)
        y_c, gx_c = step(compiled, x)
        torch.testing.assert_close(y_c, y_e)
        torch.testing.assert_close(gx_c, gx_e)
    for n in STAT_NAMES:
        torch.testing.assert_close(getattr(compiled_module, n), getattr(eager, n), msg=n)
