"""Functional form of the OmniMoE layer (DESIGN.md section 1), differentiable with respect to
x and every parameter; the math is the omnimoe library's (torch.ops.omnimoe.*)."""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers the ops, their fake kernels and autograd)

ROUTER_NORMS = ("batchnorm", "none")
GATES = ("exp", "softmax")
ACTIVATIONS = ("silu", "gelu", "relu")
#: Execution schedules of the CUDA experts stage (Config::schedule); the CPU ignores them.
SCHEDULES = ("auto", "expert", "token")


class Routing(NamedTuple):
    """The routing of a forward, shaped like x without its last dimension, plus K.
    Not differentiable (the library differentiates y only)."""

    expert_ids: Tensor  # [..., K] int32, e = i * Nc + j, by descending score then ascending e
    scores: Tensor  # [..., K] S(e) = pr[i] + pc[j], float32 (float64 for float64 layers)
    gates: Tensor  # [..., K] the gates g applied to the chosen experts, same dtype as scores


def omnimoe_layer(
    x: Tensor,
    router_row: Tensor,
    router_col: Tensor,
    expert_in: Tensor,
    expert_out: Tensor,
    gate: Optional[Tensor] = None,
    up: Optional[Tensor] = None,
    down: Optional[Tensor] = None,
    running_mean_row: Optional[Tensor] = None,
    running_var_row: Optional[Tensor] = None,
    running_mean_col: Optional[Tensor] = None,
    running_var_col: Optional[Tensor] = None,
    *,
    top_k: int,
    router_norm: str = "batchnorm",
    gate_fn: str = "exp",
    activation: str = "silu",
    training: bool = False,
    return_routing: bool = False,
    schedule: str = "auto",
):
    """y = OmniMoE(x) for x [..., H]; returns y (shaped like x), or (y, Routing) with
    return_routing=True.

    Parameters are named and shaped as in DESIGN.md section 1: router_row [Nr, H],
    router_col [Nc, H], expert_in and expert_out [N = Nr * Nc, H], the shared MLP gate and up
    [I, H] and down [H, I] (all three None: no shared branch). With router_norm='batchnorm'
    the four running statistics ([Nr], [Nr], [Nc], [Nc], float32, or float64 for a float64
    layer) are required; in training mode the batch statistics normalise the router logits
    and the running statistics are updated in place, like torch.nn.functional.batch_norm.
    Every tensor must share x's dtype (float32, bfloat16, float16; float64 on the CPU) and
    device (CPU or CUDA).

    schedule picks how the CUDA experts stage runs, forward and backward: 'expert'
    (expert-centric: tasks sorted by expert group, tensor-core tile products), 'token'
    (token-centric: one warp per token gathers its K expert rows; the paper's ablation
    without expert-centric scheduling) or 'auto' (chosen from T, K, N, H and the dtype). The
    CPU computes the same math one way and ignores it. The schedules agree within rounding,
    not bitwise.
    """
    H = x.shape[-1]
    stats = (running_mean_row, running_var_row, running_mean_col, running_var_col)
    y, ids, scores, gates, *new_stats = torch.ops.omnimoe.layer_forward(
        x.reshape(-1, H), router_row, router_col, expert_in, expert_out, gate, up, down, *stats,
        top_k, router_norm, gate_fn, activation, training, return_routing, schedule)
    if training and router_norm == "batchnorm":
        with torch.no_grad():
            for buf, new in zip(stats, new_stats):
                buf.copy_(new)
    y = y.view(x.shape)
    if not return_routing:
        return y
    lead = x.shape[:-1]
    return y, Routing(ids.view(*lead, top_k), scores.view(*lead, top_k), gates.view(*lead, top_k))
