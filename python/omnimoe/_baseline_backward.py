"""The backward of omnimoe::baseline_forward: PyTorch autograd of a recomputation of the
layer on the routing the library's forward chose, as the op omnimoe::baseline_backward.

The omnimoe library has only the forward of the baselines (include/omnimoe/baselines.hpp).
Their gradients are computed here by recomputing each layer in plain PyTorch ops, with the
expert ids the forward returned held fixed (selected indices are constants, as for the
OmniMoE layer: the router learns through the gates), and differentiating that recomputation
with torch.autograd.grad, chunk by chunk. The autograd formula of baseline_forward (_ops.py)
calls it as one op, so that torch.compile sees one opaque node (its fake kernel gives the
shapes) rather than tracing the chunk and expert loops. Per kind (x [T, H]; e = i * Nc + j
for pkm / peer):

    dense        y = down (silu(gate x) * (up x)).
    gshard       p = softmax(router x) over N; g_k = p[e_k] / sum_k' p[e_k'];
                 y = sum_k g_k SwiGLU_{e_k}(x), one pass per expert over the (token, slot)
                 pairs routed to it (grouped by a stable argsort; index_select of x,
                 index_add_ into y).
    deepseekmoe  as gshard with g_k = p[e_k], plus the shared SwiGLU (gate, up, down).
    pkm          q = query x; s1 = keys_row q[:H/2], s2 = keys_col q[H/2:];
                 w = softmax_k(s1[i_k] + s2[j_k]); y = embedding_bag(e, values, w).
    peer         as pkm; a_k = gelu(expert_in[e_k] . x) (exact erf GELU, through an
                 index_select of expert_in and a bmm); y = embedding_bag(e, expert_out, w a).

With the routing given (forward_routed) the gates are the given ones (g_k, w_k above) and the
router / query / keys take no part: they get no gradient, the given gates do.

Precision: the recomputation runs in float64 for float64 layers, else in float32 (bfloat16 /
float16 tensors are cast up); each gradient is cast back to its tensor's dtype.

Memory: the tokens are processed in chunks of Tc tokens (each chunk's graph is built,
differentiated, and its parameter gradients accumulated), Tc chosen so that a chunk's
largest per-token intermediates (the [Tc, K, H] gather of expert_in for peer, the
[Tc, K, W] / [Tc, K, H] expert activations of gshard / deepseekmoe, the segment partials of
embedding_bag's backward for pkm) stay within CHUNK_BYTES; beyond that the backward holds
float32 copies of x, grad_y and the parameters, and (at most twice) their gradients.

Double backward raises (omnimoe::baseline_backward's own autograd formula), as for
omnimoe::layer_backward.

Determinism: as deterministic as PyTorch's index / scatter ops are (index_add_, the backward of
index_select and gather, embedding_bag's backward); torch.use_deterministic_algorithms(True)
makes them deterministic on CUDA. The chunks are accumulated in a fixed order.
"""

import contextlib
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# _ops imports this module after defining BASELINE_PARAMS (the op's order of the fields).
from ._ops import BASELINE_PARAMS

#: Bound, in bytes, on a chunk's largest intermediates (see the module docstring).
CHUNK_BYTES = 128 << 20
#: When set, the tokens per chunk instead of the CHUNK_BYTES bound (the tests set it to
#: exercise the chunking on small inputs).
CHUNK_TOKENS: Optional[int] = None

_SHARED = ("gate", "up", "down")


def used_params(kind: str, routed: bool, params: Mapping[str, Optional[Tensor]]) -> Sequence[str]:
    """The parameters the layer's output depends on (in this mode)."""
    if kind == "dense":
        return _SHARED
    if kind in ("gshard", "deepseekmoe"):
        names = ["expert_gate", "expert_up", "expert_down"]
        if not routed:
            names.append("router")
        if kind == "deepseekmoe" and params.get("gate") is not None:
            names += _SHARED
        return names
    names = ["values"] if kind == "pkm" else ["expert_in", "expert_out"]
    if not routed:
        names += ["query", "keys_row", "keys_col"]
    return names


def chunk_tokens(kind: str, hidden: int, config: Sequence[int], itemsize: int) -> int:
    """Tokens per chunk: CHUNK_BYTES over the bytes of a token's intermediates (estimated
    generously: activations and their gradients), or CHUNK_TOKENS when set."""
    if CHUNK_TOKENS is not None:
        return max(1, int(CHUNK_TOKENS))
    width, num_experts, grid_rows, grid_cols, top_k, shared_width = config
    H, K = hidden, top_k
    if kind == "dense":
        per_token = 6 * width + 4 * H
    elif kind in ("gshard", "deepseekmoe"):
        per_token = K * (4 * H + 6 * width) + 3 * num_experts + 6 * shared_width + 4 * H
    else:
        # embedding_bag's CUDA backward keeps per-segment partial sums: ~ K H / 8 a token.
        per_token = K * H // 8 + 6 * H + 3 * (grid_rows + grid_cols) + 8 * K
        if kind == "peer":
            per_token += 2 * K * H  # the gather of expert_in and its gradient
    return max(1, CHUNK_BYTES // (itemsize * per_token))


def _swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def _coarse(kind, x, p, ids, gates, config):
    """gshard / deepseekmoe on the chunk x [Tc, H] with ids [Tc, K] (int64)."""
    width, N, _, _, K, _ = config
    Tc, H = x.shape
    if gates is None:
        prob = torch.softmax(x @ p["router"].t(), dim=-1)
        gates = prob.gather(1, ids)
        if kind == "gshard":
            gates = gates / gates.sum(-1, keepdim=True)
    eg = p["expert_gate"].view(N, width, H).unbind(0)
    eu = p["expert_up"].view(N, width, H).unbind(0)
    ed = p["expert_down"].view(N, H, width).unbind(0)
    # The (token, slot) pairs grouped by expert; one host synchronisation for the group sizes
    # (this runs eagerly, inside the op's kernel, even under torch.compile).
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=N).tolist()
    tok = torch.div(order, K, rounding_mode="floor")  # pair t * K + slot -> token t
    g = gates.reshape(-1).index_select(0, order)
    y = x.new_zeros((Tc, H))
    start = 0
    for e, n in enumerate(counts):
        if n:
            t = tok[start:start + n]
            out = _swiglu(x.index_select(0, t), eg[e], eu[e], ed[e])
            y.index_add_(0, t, out * g[start:start + n].unsqueeze(1))
        start += n
    if kind == "deepseekmoe" and p.get("gate") is not None:
        y = y + _swiglu(x, p["gate"], p["up"], p["down"])
    return y


def _product_key(kind, x, p, ids, gates, config):
    """pkm / peer on the chunk x [Tc, H] with ids [Tc, K] (int64)."""
    _, _, _, grid_cols, K, _ = config
    Tc, H = x.shape
    if gates is None:
        q = x @ p["query"].t()
        s1 = q[:, : H // 2] @ p["keys_row"].t()
        s2 = q[:, H // 2:] @ p["keys_col"].t()
        scores = s1.gather(1, torch.div(ids, grid_cols, rounding_mode="floor")) + s2.gather(1, ids % grid_cols)
        gates = torch.softmax(scores, dim=-1)
    if kind == "pkm":
        return F.embedding_bag(ids, p["values"], per_sample_weights=gates, mode="sum")
    e_in = p["expert_in"].index_select(0, ids.reshape(-1)).view(Tc, K, H)
    a = F.gelu(torch.bmm(e_in, x.unsqueeze(-1)).squeeze(-1))  # exact (erf) GELU
    return F.embedding_bag(ids, p["expert_out"], per_sample_weights=gates * a, mode="sum")


def recompute(kind: str, x: Tensor, params: Mapping[str, Tensor], ids: Tensor, gates: Optional[Tensor],
              config: Sequence[int]) -> Tensor:
    """y [Tc, H] of the layer for x [Tc, H] on the routing ids [Tc, K] (int64); `gates`
    [Tc, K] imposes the gates (forward_routed), else they follow from the router."""
    if kind == "dense":
        return _swiglu(x, params["gate"], params["up"], params["down"])
    if kind in ("gshard", "deepseekmoe"):
        return _coarse(kind, x, params, ids, gates, config)
    return _product_key(kind, x, params, ids, gates, config)


@contextlib.contextmanager
def _autograd_in_kernel():
    """Autograd on, inside an op's kernel. torch.library runs the kernel of an op that has an
    autograd formula below autograd (torch._C._AutoDispatchBelowAutograd: the autograd
    dispatch keys excluded), so that nothing it does is recorded; the recomputation needs the
    recording back, for its own graph, which never leaves the kernel."""
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    autograd = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(include, exclude - autograd), torch.enable_grad():
        yield


def _needed(kind: str, x: Tensor, params: Sequence[Optional[Tensor]], routed_gates: Optional[Tensor],
            needs: Sequence[bool]):
    """(x needs grad, names of the parameters that need one, gates need grad), restricted to
    what the layer uses in this mode."""
    named = dict(zip(BASELINE_PARAMS, params))
    routed = routed_gates is not None
    used = used_params(kind, routed, named)
    wanted = [n for n, need in zip(BASELINE_PARAMS, needs[1:-1]) if need and n in used and named[n] is not None]
    return bool(needs[0]), wanted, bool(needs[-1]) and routed


# cudagraph_unsafe: the kernel synchronises with the host (the expert group sizes of gshard /
# deepseekmoe; embedding_bag's CUDA backward), so torch.compile's CUDA graphs
# (mode="reduce-overhead") leave it out instead of failing to capture it.
@torch.library.custom_op("omnimoe::baseline_backward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def baseline_backward(kind: str, grad_y: Tensor, x: Tensor, params: List[Optional[Tensor]],
                      routed_gates: Optional[Tensor], expert_ids: Tensor, config: List[int],
                      needs: List[bool]) -> List[Tensor]:
    """Gradients of <baseline_forward(kind, x, *params, *config, routed ids, routed_gates), grad_y>
    on the routing expert_ids [T, K]: [grad_x, one per BaselineParams field (BASELINE_PARAMS
    order), grad_routed_gates], each in its tensor's dtype, contiguous; `needs` (as many
    flags) selects them, and an unneeded one (or one of a tensor the layer does not use in
    this mode) is an empty [0] tensor of x's dtype.

    An opaque op: under torch.compile the backward graph holds one call of it (its fake
    kernel below gives the shapes) instead of the unrolled chunk and expert loops, which
    inductor would take minutes to compile."""
    needs_x, wanted, needs_gates = _needed(kind, x, params, routed_gates, needs)
    named = dict(zip(BASELINE_PARAMS, params))
    routed = routed_gates is not None
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    T, H = x.shape
    out = [x.new_empty(0) for _ in range(len(BASELINE_PARAMS) + 2)]
    if not (needs_x or wanted or needs_gates):
        return out
    if kind != "dense" and expert_ids.numel():
        # The GPU forward cannot report ids outside [0, N) of forward_routed (it writes NaN rows
        # instead); the recomputation would index out of range, so say what is wrong here.
        n_experts = config[1]
        lo, hi = torch.stack(torch.aminmax(expert_ids)).tolist()  # one host synchronisation
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"omnimoe: baseline '{kind}' backward: expert ids span [{lo}, {hi}], outside "
                             f"[0, {n_experts}) (forward_routed was given invalid ids)")
    # The recomputation's inputs in the compute dtype; leaves for the differentiated ones.
    leaves = {}
    for n in used_params(kind, routed, named):
        t = named[n].detach().to(cdt)
        leaves[n] = t.detach().requires_grad_(True) if n in wanted else t
    xs = x.detach().to(cdt)
    gys = grad_y.detach().to(cdt)
    gs = routed_gates.detach().to(cdt) if routed else None
    Tc = chunk_tokens(kind, H, config, torch.finfo(cdt).bits // 8)
    gx_parts, gg_parts = [], []
    acc: Dict[str, Optional[Tensor]] = {n: None for n in wanted}
    for s in range(0, T, Tc):
        e = min(s + Tc, T)
        with _autograd_in_kernel():
            xc = xs[s:e].detach().requires_grad_(needs_x)
            gc = gs[s:e].detach().requires_grad_(needs_gates) if routed else None
            y = recompute(kind, xc, leaves, expert_ids[s:e].long(), gc, config)
            inputs = ([xc] if needs_x else []) + [leaves[n] for n in wanted] + ([gc] if needs_gates else [])
            # allow_unused: x takes no part in pkm under forward_routed.
            grads = list(torch.autograd.grad(y, inputs, gys[s:e], allow_unused=True))
        del y  # the chunk's graph
        if needs_x:
            g = grads.pop(0)
            gx_parts.append(torch.zeros_like(xc) if g is None else g)
        if needs_gates:
            gg_parts.append(grads.pop())
        for n, g in zip(wanted, grads):
            if g is not None:  # (a fresh tensor: accumulated into in place)
                acc[n] = g if acc[n] is None else acc[n].add_(g)
    if needs_x:
        out[0] = (torch.cat(gx_parts) if gx_parts else xs.new_zeros((T, H))).to(x.dtype).contiguous()
    for i, n in enumerate(BASELINE_PARAMS):
        if n in acc:
            g = acc[n] if acc[n] is not None else torch.zeros(named[n].shape, dtype=cdt, device=x.device)
            out[1 + i] = g.to(named[n].dtype).contiguous()
    if needs_gates:
        out[-1] = (torch.cat(gg_parts) if gg_parts else gs.new_zeros(gs.shape)).to(routed_gates.dtype).contiguous()
    return out


@baseline_backward.register_fake
def _baseline_backward_fake(kind, grad_y, x, params, routed_gates, expert_ids, config, needs):
    needs_x, wanted, needs_gates = _needed(kind, x, params, routed_gates, needs)
    out = [x.new_empty(0) for _ in range(len(BASELINE_PARAMS) + 2)]
    if needs_x:
        out[0] = x.new_empty(x.shape)
    for i, (n, p) in enumerate(zip(BASELINE_PARAMS, params)):
        if n in wanted:
            out[1 + i] = p.new_empty(p.shape)
    if needs_gates:
        out[-1] = routed_gates.new_empty(routed_gates.shape)
    return out


def _backward_setup_context(ctx, inputs, output):
    pass


def _backward_backward(ctx, *grads):
    raise RuntimeError("omnimoe: double backward (gradients of gradients) of the baseline layers is not supported")


# Gradients of the gradients are not implemented: say so (at double-backward time, as
# omnimoe::layer_backward does) instead of returning wrong ones.
torch.library.register_autograd("omnimoe::baseline_backward", _backward_backward,
                                setup_context=_backward_setup_context)


def used_inputs(kind: str, params: Sequence[Optional[Tensor]], routed_gates: Optional[Tensor], needs: Sequence[bool]):
    """The `needs` flags of baseline_backward restricted to what the layer uses: the autograd
    formula returns None (no gradient) for the others."""
    needs_x, wanted, needs_gates = _needed(kind, None, params, routed_gates, needs)
    return [needs_x] + [n in wanted for n in BASELINE_PARAMS] + [needs_gates]
