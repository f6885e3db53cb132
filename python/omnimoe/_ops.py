"""Python side of the torch ops: fake (meta) kernels for tracing and torch.compile, and the
autograd formula of omnimoe::layer_forward (which calls omnimoe::layer_backward).

The ops themselves (CPU and CUDA kernels) are defined in C++ (csrc/layer_ops.cpp) and
registered when omnimoe._C is imported:

    torch.ops.omnimoe.layer_forward(x, router_row, router_col, expert_in, expert_out,
        gate, up, down, running_mean_row, running_var_row, running_mean_col, running_var_col,
        top_k, router_norm, gate_fn, activation, training, return_routing, schedule="auto")
      -> (y, expert_ids, scores, gates, running_mean_row, running_var_row,
          running_mean_col, running_var_col)

x is [T, H]; expert_ids [T, K] int32; scores and gates [T, K] in the accumulation dtype
(float64 for float64 layers, else float32), or [0, K] when return_routing is false. The
forward is functional: the last four outputs are the running statistics after the call
(updated in training mode, unchanged in inference mode; [0] without batchnorm), for the
caller to copy into its buffers.

    torch.ops.omnimoe.layer_backward(grad_y, x, router_row, router_col, expert_in, expert_out,
        gate, up, down, running_mean_row, running_var_row, running_mean_col, running_var_col,
        expert_ids, top_k, router_norm, gate_fn, activation, training, schedule="auto")
      -> (grad_x, grad_router_row, grad_router_col, grad_expert_in, grad_expert_out,
          grad_gate, grad_up, grad_down)

Without the shared MLP (gate, up, down None) the last three are [0, H], [0, H], [H, 0].

schedule is the execution schedule of the CUDA experts stage (Config::schedule): 'expert'
(expert-centric tile products), 'token' (token-centric per-token gathers) or 'auto' (chosen
from the sizes and dtype); the CPU ignores it. Both schedules compute the same function, in
different summation orders: results agree within rounding, not bitwise. The autograd formula
passes the forward's schedule to the backward; under 'auto' each pass chooses its own path
(the backward keeps the gathers up to larger K, so a forward of tile products may have a
gathering backward).
"""

import torch

from . import _C  # noqa: F401  (registers torch.ops.omnimoe.*)

_NUM_PARAMS = 8  # x, router_row, router_col, expert_in, expert_out, gate, up, down
_NUM_STATS = 4  # running_mean_row, running_var_row, running_mean_col, running_var_col


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the router statistics, scores and gates of a layer of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("omnimoe::layer_forward")
def _layer_forward_fake(x, router_row, router_col, expert_in, expert_out, gate, up, down,
                        running_mean_row, running_var_row, running_mean_col, running_var_col,
                        top_k, router_norm, gate_fn, activation, training, return_routing, schedule="auto"):
    torch._check(x.dim() == 2, lambda: f"omnimoe: x must be [T, H], got shape {tuple(x.shape)}")
    torch._check(router_row.dim() == 2 and router_col.dim() == 2,
                 lambda: "omnimoe: router_row and router_col must be [Nr, H] and [Nc, H]")
    T, H = x.shape
    acc = accumulation_dtype(x.dtype)
    rows = T if return_routing else 0
    y = x.new_empty((T, H))
    ids = x.new_empty((T, top_k), dtype=torch.int32)
    scores = x.new_empty((rows, top_k), dtype=acc)
    gates = x.new_empty((rows, top_k), dtype=acc)
    if router_norm == "batchnorm":
        Nr, Nc = router_row.shape[0], router_col.shape[0]
        stats = [x.new_empty((n,), dtype=acc) for n in (Nr, Nr, Nc, Nc)]
    else:
        stats = [x.new_empty((0,), dtype=acc) for _ in range(_NUM_STATS)]
    return (y, ids, scores, gates, *stats)


@torch.library.register_fake("omnimoe::layer_backward")
def _layer_backward_fake(grad_y, x, router_row, router_col, expert_in, expert_out, gate, up, down,
                         running_mean_row, running_var_row, running_mean_col, running_var_col,
                         expert_ids, top_k, router_norm, gate_fn, activation, training, schedule="auto"):
    H = x.shape[1]
    I = gate.shape[0] if gate is not None else 0
    return (torch.empty_like(x), torch.empty_like(router_row), torch.empty_like(router_col),
            torch.empty_like(expert_in), torch.empty_like(expert_out),
            x.new_empty((I, H)), x.new_empty((I, H)), x.new_empty((H, I)))


def _forward_setup_context(ctx, inputs, output):
    params = inputs[:_NUM_PARAMS]
    top_k, router_norm, gate_fn, activation, training, _, *rest = inputs[_NUM_PARAMS + _NUM_STATS:]
    # torch.library fills in a trailing argument left at its default; fall back if it did not.
    schedule = rest[0] if rest else "auto"
    y, ids, scores, gates, *stats = output
    ctx.mark_non_differentiable(ids, scores, gates, *stats)
    # The backward reads the running statistics in inference mode (constants there) and
    # ignores them in training mode (it recomputes the batch statistics from x). The returned
    # copies are never modified afterwards, unlike the module's buffers.
    if router_norm != "batchnorm":
        stats = [None] * _NUM_STATS
    ctx.save_for_backward(*params, *stats, ids)
    ctx.config = (top_k, router_norm, gate_fn, activation, training, schedule)
    ctx.has_shared = params[5] is not None


def _forward_backward(ctx, grad_y, *unused_grads):
    saved = ctx.saved_tensors
    params = saved[:_NUM_PARAMS]
    stats = saved[_NUM_PARAMS:_NUM_PARAMS + _NUM_STATS]
    ids = saved[-1]
    grads = torch.ops.omnimoe.layer_backward(grad_y, *params, *stats, ids, *ctx.config)
    grads = list(grads)
    if not ctx.has_shared:
        grads[5:8] = [None, None, None]
    for i, needed in enumerate(ctx.needs_input_grad[:_NUM_PARAMS]):
        if not needed:
            grads[i] = None
    # No gradient for the running statistics and the non-tensor arguments (as many as the
    # forward received: the dispatcher may leave out a trailing argument at its default).
    return (*grads, *([None] * (len(ctx.needs_input_grad) - _NUM_PARAMS)))


torch.library.register_autograd("omnimoe::layer_forward", _forward_backward,
                                setup_context=_forward_setup_context)


def _backward_setup_context(ctx, inputs, output):
    pass


def _backward_backward(ctx, *grads):
    raise RuntimeError("omnimoe: double backward (gradients of gradients) is not supported")


# Gradients of the gradients are not implemented: say so instead of returning wrong ones.
torch.library.register_autograd("omnimoe::layer_backward", _backward_backward,
                                setup_context=_backward_setup_context)


# ---- baselines (csrc/baseline_ops.cpp) ---------------------------------------------------
#
#   torch.ops.omnimoe.baseline_forward(kind, x, gate, up, down, router, expert_gate, expert_up,
#       expert_down, query, keys_row, keys_col, values, expert_in, expert_out, width,
#       num_experts, grid_rows, grid_cols, top_k, shared_width, routed_ids=None, routed_gates=None)
#     -> (y, expert_ids)
#
# The baseline layers of include/omnimoe/baselines.hpp: kind is 'dense', 'gshard',
# 'deepseekmoe', 'pkm' or 'peer'; the parameters are the BaselineParams fields (None where
# the kind does not use one); x and y are [T, H]; expert_ids [T, K] int32 ([T, 0] for dense).
# With routed_ids [T, K] int32 and routed_gates [T, K] float32 the layer uses that routing
# (BaselineForwardRouted) and returns routed_ids as its expert_ids.
#
# The library has only the forward of the baselines. Their autograd formula below calls
#
#   torch.ops.omnimoe.baseline_backward(kind, grad_y, x, params, routed_gates, expert_ids,
#       config, needs) -> [grad_x, grad of each BaselineParams field, grad_routed_gates]
#
# an op defined in Python (_baseline_backward.py) that recomputes the layer in PyTorch ops on
# the routing the forward chose (its expert_ids, constants), in chunks of tokens, and
# differentiates that with torch.autograd.grad: gradients of x, of every parameter the kind
# uses and of routed_gates (forward_routed). Double backward is refused.

BASELINE_KINDS = ("dense", "gshard", "deepseekmoe", "pkm", "peer")
#: BaselineParams fields, in the op's order.
BASELINE_PARAMS = ("gate", "up", "down", "router", "expert_gate", "expert_up", "expert_down", "query",
                   "keys_row", "keys_col", "values", "expert_in", "expert_out")


@torch.library.register_fake("omnimoe::baseline_forward")
def _baseline_forward_fake(kind, x, gate, up, down, router, expert_gate, expert_up, expert_down, query, keys_row,
                           keys_col, values, expert_in, expert_out, width, num_experts, grid_rows, grid_cols,
                           top_k, shared_width, routed_ids=None, routed_gates=None):
    torch._check(kind in BASELINE_KINDS, lambda: f"omnimoe: baseline kind must be one of {BASELINE_KINDS}, got {kind!r}")
    torch._check(x.dim() == 2, lambda: f"omnimoe: x must be [T, H], got shape {tuple(x.shape)}")
    T, H = x.shape
    K = 0 if kind == "dense" else top_k
    return x.new_empty((T, H)), x.new_empty((T, K), dtype=torch.int32)


from . import _baseline_backward as _baseline_bw  # noqa: E402

# The op's arguments: kind, x, the BaselineParams (in BASELINE_PARAMS order), the six ints,
# routed_ids, routed_gates (the dispatcher may leave the last two out at their default).
_BASELINE_X = 1
_BASELINE_INTS = 2 + len(BASELINE_PARAMS)
_BASELINE_ROUTED = _BASELINE_INTS + 6


def _baseline_setup_context(ctx, inputs, output):
    ctx.kind = inputs[0]
    ctx.mark_non_differentiable(output[1])
    params = inputs[_BASELINE_X + 1:_BASELINE_INTS]
    ctx.config = tuple(inputs[_BASELINE_INTS:_BASELINE_ROUTED])
    routed_gates = inputs[_BASELINE_ROUTED + 1] if len(inputs) > _BASELINE_ROUTED + 1 else None
    # output[1]: the routing used (the library's top-K, or routed_ids as given).
    ctx.save_for_backward(inputs[_BASELINE_X], *params, routed_gates, output[1])


def _baseline_backward(ctx, grad_y, grad_ids):
    needs = ctx.needs_input_grad
    x, *params, routed_gates, ids = ctx.saved_tensors
    flags = [needs[_BASELINE_X], *needs[_BASELINE_X + 1:_BASELINE_INTS],
             len(needs) > _BASELINE_ROUTED + 1 and needs[_BASELINE_ROUTED + 1]]
    # Only what the layer uses in this mode (forward_routed: not the router, query, keys).
    flags = _baseline_bw.used_inputs(ctx.kind, params, routed_gates, flags)
    grads = [None] * len(needs)
    if grad_y is None or not any(flags):
        return tuple(grads)
    out = torch.ops.omnimoe.baseline_backward(ctx.kind, grad_y, x, params, routed_gates, ids, list(ctx.config),
                                              flags)
    out = [g if f else None for g, f in zip(out, flags)]
    grads[_BASELINE_X:_BASELINE_INTS] = out[:-1]
    if out[-1] is not None:
        grads[_BASELINE_ROUTED + 1] = out[-1]
    return tuple(grads)


torch.library.register_autograd("omnimoe::baseline_forward", _baseline_backward,
                                setup_context=_baseline_setup_context)
