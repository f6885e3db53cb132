"""The paper's baseline feed-forward layers (include/omnimoe/baselines.hpp) as nn.Modules:
Dense, GShard, DeepSeekMoE, PKM and PEER, computed by the omnimoe library through the torch
op torch.ops.omnimoe.baseline_forward.

TRAINABLE: gradients flow to x and to every parameter (and to the gates of forward_routed).
The library has only the forward of the baselines; the backward (torch.ops.omnimoe.
baseline_backward, omnimoe/_baseline_backward.py) is PyTorch autograd of a recomputation of
the layer in PyTorch ops on the routing the library's forward chose: the expert ids are
constants (as for the OmniMoE layer, the router learns through the gates), the gates and
everything else are recomputed and differentiated. Details:

* precision: the recomputation runs in float32 (float64 for float64 layers; bfloat16 and
  float16 tensors are cast up) and each gradient is cast back to its tensor's dtype;
* memory: the tokens are processed in chunks whose largest intermediates (for PEER the
  [Tc, K, H] gather of expert_in; for GShard / DeepSeekMoE the chosen experts' activations)
  stay under omnimoe._baseline_backward.CHUNK_BYTES = 128 MiB, so the backward needs that
  plus float32 copies of x, grad_y, the parameters and (twice) their gradients (the sums of
  PKM / PEER go through F.embedding_bag; GShard / DeepSeekMoE loop over the experts with
  index_select / index_add_, never gathering a weight matrix per token);
* determinism: as deterministic as PyTorch's index / scatter ops (index_add_, the backward of
  index_select and gather, embedding_bag's backward) are: deterministic on the CPU, and on
  CUDA under ``torch.use_deterministic_algorithms(True)``;
* torch.compile: the backward is one opaque op in the compiled graph (fullgraph works with
  gradients); double backward (gradients of gradients) raises.

The parameters are nn.Parameters (state_dict, ``.to()``, ``.cuda()`` and ``.half()`` work as
usual); under ``torch.no_grad()`` / ``torch.inference_mode()`` nothing is recorded.

Each maps x [..., H] to y [..., H]; SwiGLU(x; G, U, D) = D (silu(G x) * (U x)):

    Dense        y = SwiGLU(x; gate, up, down), width I.
    GShard       p = softmax(router x) over N experts; the top-K by p (ties: smaller id);
                 y = sum_k p_k / (sum of the K chosen p) * SwiGLU_e(x), experts of width W.
    DeepSeekMoE  as GShard with gates p_k themselves, plus a shared SwiGLU of width S.
    PKM          q = query x; s1 = keys_row q[:H/2], s2 = keys_col q[H/2:]; the exact top-K of
                 s1[i] + s2[j] over the Nr x Nc grid (e = i * Nc + j); w = softmax of the K
                 scores; y = sum_k w_k values[e_k].
    PEER         retrieval as PKM; y = sum_k w_k gelu(expert_in[e_k] . x) expert_out[e_k].

Parameters are named after the BaselineParams fields; the multi-expert tensors are stacked
along the rows (expert e of GShard owns rows [e W, (e + 1) W) of expert_gate / expert_up and
rows [e H, (e + 1) H) of expert_down). Dtypes: float32, bfloat16, float16 (CPU and CUDA),
float64 (CPU only).
"""

import math
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._ops import BASELINE_KINDS, BASELINE_PARAMS


def baseline_layer(
    kind: str,
    x: Tensor,
    params: Mapping[str, Optional[Tensor]],
    *,
    width: int = 0,
    num_experts: int = 0,
    grid_rows: int = 0,
    grid_cols: int = 0,
    top_k: int = 0,
    shared_width: int = 0,
    expert_ids: Optional[Tensor] = None,
    gates: Optional[Tensor] = None,
    return_expert_ids: bool = False,
):
    """y = baseline(x) for x [..., H], differentiable in x and the tensors of `params` (and
    `gates`; see the module docstring). `params` maps BaselineParams field names to tensors
    (missing or None: unused by the kind); the ints are the BaselineConfig fields (0 where the
    kind does not use one). With `expert_ids` and `gates` ([..., K]) the layer uses that
    routing instead of its router (forward_routed; not for 'dense'). Returns y, or (y,
    expert_ids [..., K] int32) with return_expert_ids=True."""
    unknown = set(params) - set(BASELINE_PARAMS)
    if unknown:
        raise ValueError(f"omnimoe: unknown baseline parameters {sorted(unknown)}; known: {BASELINE_PARAMS}")
    if (expert_ids is None) != (gates is None):
        raise ValueError("omnimoe: expert_ids and gates go together (both given: the routing is imposed)")
    H = x.shape[-1]
    lead = x.shape[:-1]
    routed = ()
    if expert_ids is not None:
        routed = (expert_ids.reshape(-1, expert_ids.shape[-1]).to(torch.int32),
                  gates.reshape(-1, gates.shape[-1]).to(torch.float32))
    y, ids = torch.ops.omnimoe.baseline_forward(
        kind, x.reshape(-1, H), *(params.get(n) for n in BASELINE_PARAMS), width, num_experts, grid_rows, grid_cols,
        top_k, shared_width, *routed)
    y = y.view(x.shape)
    if not return_expert_ids:
        return y
    return y, ids.view(*lead, ids.shape[-1])


def _positive_int(cls, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")
    return value


def _uniform(w: Optional[Tensor], fan_in: int) -> None:
    if w is not None:
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(w, -bound, bound)


class _Baseline(nn.Module):
    """Common part: the parameters (BaselineParams fields), the config, the forward."""

    kind = ""

    def _param(self, name, shape, factory):
        self.register_parameter(name, nn.Parameter(torch.empty(*shape, **factory)) if shape is not None else None)

    def config(self) -> dict:
        """The BaselineConfig fields other than kind and hidden (0 where unused)."""
        return {"width": 0, "num_experts": 0, "grid_rows": 0, "grid_cols": 0, "top_k": 0, "shared_width": 0}

    def _params(self):
        return {n: getattr(self, n, None) for n in BASELINE_PARAMS}

    def forward(self, x: Tensor, return_expert_ids: bool = False):
        """y [..., H] for x [..., H]; with return_expert_ids=True, (y, expert_ids [..., K]
        int32, the chosen experts in descending score order; K = 0 for Dense).
        Differentiable: see the module docstring."""
        return baseline_layer(self.kind, x, self._params(), return_expert_ids=return_expert_ids, **self.config())


class _Routed(_Baseline):
    def forward_routed(self, x: Tensor, expert_ids: Tensor, gates: Tensor) -> Tensor:
        """y [..., H] with the routing given: expert_ids [..., K] (ids in [0, N)) and gates
        [..., K], used as given (converted to int32 and float32), as the benchmark's
        "random ids" series does. Differentiable in x, the parameters the experts use and the
        gates (the router, query and keys take no part and get no gradient)."""
        return baseline_layer(self.kind, x, self._params(), expert_ids=expert_ids, gates=gates, **self.config())


class Dense(_Baseline):
    """Dense SwiGLU MLP: y = down (silu(gate x) * (up x)). Trainable (the backward is PyTorch
    autograd of a recomputation, in token chunks; see omnimoe.baselines).

    Parameters: gate [I, H], up [I, H], down [H, I], initialised as nn.Linear weights
    (U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""

    kind = "dense"

    def __init__(self, hidden_size: int, intermediate_size: int, *, device=None, dtype=None):
        super().__init__()
        self.hidden_size = _positive_int("Dense", "hidden_size", hidden_size)
        self.intermediate_size = _positive_int("Dense", "intermediate_size", intermediate_size)
        f = {"device": device, "dtype": dtype}
        H, I = hidden_size, intermediate_size
        self._param("gate", (I, H), f)
        self._param("up", (I, H), f)
        self._param("down", (H, I), f)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform(self.gate, self.hidden_size)
        _uniform(self.up, self.hidden_size)
        _uniform(self.down, self.intermediate_size)

    def config(self) -> dict:
        return {**super().config(), "width": self.intermediate_size}

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


class _Coarse(_Routed):
    """GShard and DeepSeekMoE: a softmax router over N SwiGLU experts of width W."""

    def __init__(self, hidden_size, expert_width, num_experts, top_k, shared_width, device, dtype):
        super().__init__()
        name = type(self).__name__
        self.hidden_size = _positive_int(name, "hidden_size", hidden_size)
        self.expert_width = _positive_int(name, "expert_width", expert_width)
        self.num_experts = _positive_int(name, "num_experts", num_experts)
        self.top_k = _positive_int(name, "top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"{name}: top_k = {top_k} exceeds num_experts = {num_experts}")
        if isinstance(shared_width, bool) or not isinstance(shared_width, int) or shared_width < 0:
            raise ValueError(f"{name}: shared_width must be an int >= 0, got {shared_width!r}")
        self.shared_width = shared_width
        f = {"device": device, "dtype": dtype}
        H, W, N, S = hidden_size, expert_width, num_experts, shared_width
        self._param("router", (N, H), f)
        self._param("expert_gate", (N * W, H), f)
        self._param("expert_up", (N * W, H), f)
        self._param("expert_down", (N * H, W), f)
        if self.kind == "deepseekmoe":
            self._param("gate", (S, H) if S > 0 else None, f)
            self._param("up", (S, H) if S > 0 else None, f)
            self._param("down", (H, S) if S > 0 else None, f)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) for every weight, per expert."""
        for w in (self.router, self.expert_gate, self.expert_up, self._params()["gate"], self._params()["up"]):
            _uniform(w, self.hidden_size)
        _uniform(self.expert_down, self.expert_width)
        _uniform(self._params()["down"], max(self.shared_width, 1))

    def config(self) -> dict:
        return {**super().config(), "width": self.expert_width, "num_experts": self.num_experts, "top_k": self.top_k,
                "shared_width": self.shared_width}

    def extra_repr(self) -> str:
        r = (f"hidden_size={self.hidden_size}, expert_width={self.expert_width}, "
             f"num_experts={self.num_experts}, top_k={self.top_k}")
        return r + (f", shared_width={self.shared_width}" if self.kind == "deepseekmoe" else "")


class GShard(_Coarse):
    """GShard MoE: softmax router over N SwiGLU experts of width W, top-K, gates renormalised
    over the K chosen. Trainable: the backward is PyTorch autograd of a recomputation on the
    library's routing (the router learns through the gates), bounded in memory; see
    omnimoe.baselines.

    Parameters: router [N, H], expert_gate [N W, H], expert_up [N W, H], expert_down [N H, W]
    (expert e: rows e W.. of expert_gate / expert_up, rows e H.. of expert_down), initialised
    as nn.Linear weights of each expert."""

    kind = "gshard"

    def __init__(self, hidden_size: int, expert_width: int, num_experts: int, top_k: int, *, device=None,
                 dtype=None):
        super().__init__(hidden_size, expert_width, num_experts, top_k, 0, device, dtype)


class DeepSeekMoE(_Coarse):
    """DeepSeekMoE: as GShard but the gates are the softmax probabilities themselves (no
    renormalisation over the K chosen), plus an always-on shared SwiGLU expert of width
    ``shared_width`` (0: none). Trainable: the backward is PyTorch autograd of a recomputation
    on the library's routing, bounded in memory; see omnimoe.baselines.

    Parameters: those of GShard, and (shared_width > 0) gate [S, H], up [S, H], down [H, S]."""

    kind = "deepseekmoe"

    def __init__(self, hidden_size: int, expert_width: int, num_experts: int, top_k: int, shared_width: int = 0, *,
                 device=None, dtype=None):
        super().__init__(hidden_size, expert_width, num_experts, top_k, shared_width, device, dtype)


class PKM(_Routed):
    """Product-key memory (Lample et al. 2019), single head, no query batchnorm: N = Nr x Nc
    value rows addressed by the exact top-K of s1[i] + s2[j]. Trainable: the backward is
    PyTorch autograd of a recomputation on the library's routing (query and keys learn through
    the softmax weights), bounded in memory; see omnimoe.baselines.

    Args:
        hidden_size: H (even: the query splits into two halves).
        num_experts: N as a perfect square (grid sqrt(N) x sqrt(N)) or the grid (Nr, Nc).
        top_k: K value rows per token.

    Parameters: query [H, H], keys_row [Nr, H/2], keys_col [Nc, H/2] (nn.Linear-like uniform
    init) and values [N, H] (normal, std 1/sqrt(H))."""

    kind = "pkm"

    def __init__(self, hidden_size: int, num_experts: Union[int, Tuple[int, int]], top_k: int, *, device=None,
                 dtype=None):
        super().__init__()
        name = type(self).__name__
        self.hidden_size = _positive_int(name, "hidden_size", hidden_size)
        if hidden_size % 2 != 0:
            raise ValueError(f"{name}: hidden_size must be even (the query splits into two halves), got {hidden_size}")
        if isinstance(num_experts, (tuple, list)):
            if len(num_experts) != 2:
                raise ValueError(f"{name}: num_experts must be an int or (Nr, Nc), got {num_experts!r}")
            rows, cols = (_positive_int(name, "grid size", int(v)) for v in num_experts)
        else:
            n = _positive_int(name, "num_experts", num_experts)
            rows = math.isqrt(n)
            if rows * rows != n:
                raise ValueError(f"{name}: num_experts = {n} is not a perfect square; pass the grid (Nr, Nc)")
            cols = rows
        self.grid_rows, self.grid_cols = rows, cols
        self.num_experts = rows * cols
        self.top_k = _positive_int(name, "top_k", top_k)
        if top_k > self.num_experts:
            raise ValueError(f"{name}: top_k = {top_k} exceeds num_experts = {self.num_experts}")
        f = {"device": device, "dtype": dtype}
        H, N = hidden_size, self.num_experts
        self._param("query", (H, H), f)
        self._param("keys_row", (rows, H // 2), f)
        self._param("keys_col", (cols, H // 2), f)
        self._make_experts(H, N, f)
        self.reset_parameters()

    def _make_experts(self, H, N, f):
        self._param("values", (N, H), f)

    def reset_parameters(self) -> None:
        _uniform(self.query, self.hidden_size)
        _uniform(self.keys_row, self.hidden_size // 2)
        _uniform(self.keys_col, self.hidden_size // 2)
        self._reset_experts()

    def _reset_experts(self) -> None:
        nn.init.normal_(self.values, std=1.0 / math.sqrt(self.hidden_size))

    def config(self) -> dict:
        return {**super().config(), "num_experts": self.num_experts, "grid_rows": self.grid_rows,
                "grid_cols": self.grid_cols, "top_k": self.top_k}

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, grid=({self.grid_rows}, {self.grid_cols}), top_k={self.top_k}"


class PEER(PKM):
    """PEER (He 2024), single head: product-key retrieval as PKM over N single-neuron experts,
    y = sum_k w_k gelu(expert_in[e_k] . x) expert_out[e_k] (exact erf GELU). Trainable: the
    backward is PyTorch autograd of a recomputation on the library's routing, in token chunks
    that bound its [Tc, K, H] gathers; see omnimoe.baselines.

    Parameters: query, keys_row, keys_col as PKM; expert_in [N, H] and expert_out [N, H]
    (U(-1/sqrt(H), 1/sqrt(H)), as OmniMoE's experts)."""

    kind = "peer"

    def _make_experts(self, H, N, f):
        self._param("expert_in", (N, H), f)
        self._param("expert_out", (N, H), f)

    def _reset_experts(self) -> None:
        _uniform(self.expert_in, self.hidden_size)
        _uniform(self.expert_out, self.hidden_size)


__all__ = ["Dense", "GShard", "DeepSeekMoE", "PKM", "PEER", "baseline_layer", "BASELINE_KINDS", "BASELINE_PARAMS"]
