"""The feed-forward blocks the example can train, every one from the omnimoe package, sized
to the same activated parameters per token.

Activated parameters are counted as docs/benchmarks.md counts them (the weights that enter a
multiply-accumulate for one token): OmniMoE (Nr + Nc) H + 2 H K + 3 H I; Dense 3 H I;
GShard N H + 3 H W K; DeepSeekMoE N H + 3 H W K + 3 H S; PKM H^2 + (Nr + Nc) H / 2 + H K;
PEER H^2 + (Nr + Nc) H / 2 + 2 H K. OmniMoE's configuration sets the budget; each baseline
gets the width (Dense, GShard, DeepSeekMoE) or the K (PKM, PEER) that comes closest.

The three ablations of the paper's Table 2 change one thing of OmniMoE each:
  omnimoe-no-shared      no shared SwiGLU (I = 0)
  omnimoe-dense-router   no Cartesian router: a 1 x N grid, so the score of expert j is
                         log_softmax over all N column logits (a dense N-way softmax gate with
                         the same batchnorm) and the top-K is taken over all N
  omnimoe-token-centric  no expert-centric scheduling: schedule='token' (each token gathers
                         its K expert rows) instead of schedule='expert' (sorted tile products)
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn
from torch.func import functional_call

import omnimoe

FFNS = ("dense", "gshard", "deepseekmoe", "pkm", "peer", "omnimoe")
ABLATIONS = ("omnimoe-no-shared", "omnimoe-dense-router", "omnimoe-token-centric")


@dataclass
class Sizes:
    """The FFN family of one preset (H is the model width)."""

    hidden: int
    omni_grid: int  # OmniMoE grid side (N = side^2), also PEER's
    omni_k: int  # OmniMoE K
    omni_shared: int  # OmniMoE shared SwiGLU width I
    gshard_experts: int
    gshard_k: int
    ds_experts: int
    ds_k: int
    ds_shared: int
    pkm_grid: int  # PKM grid side
    align: int  # widths rounded to a multiple of this (CUDA coarse layers need 8)


def omnimoe_activated(H, rows, cols, K, I):
    return (rows + cols) * H + 2 * H * K + 3 * H * I


def _round(v, align):
    return max(align, int(round(v / align)) * align)


def build(name: str, s: Sizes) -> nn.Module:
    """The FFN module `name` (FFNS or ABLATIONS) of the family `s`, at OmniMoE's budget."""
    H, side = s.hidden, s.omni_grid
    A = omnimoe_activated(H, side, side, s.omni_k, s.omni_shared)
    keys = lambda g: g * H  # (Nr + Nc) H / 2 for a g x g grid
    if name == "dense":
        return omnimoe.Dense(H, _round(A / (3 * H), s.align))
    if name == "gshard":
        N, K = s.gshard_experts, s.gshard_k
        return omnimoe.GShard(H, _round((A - N * H) / (3 * H * K), s.align), N, K)
    if name == "deepseekmoe":
        N, K, S = s.ds_experts, s.ds_k, s.ds_shared
        return omnimoe.DeepSeekMoE(H, _round((A - N * H - 3 * H * S) / (3 * H * K), s.align), N, K, S)
    if name == "pkm":
        g = s.pkm_grid
        return omnimoe.PKM(H, g * g, max(1, round((A - H * H - keys(g)) / H)))
    if name == "peer":
        return omnimoe.PEER(H, side * side, max(1, round((A - H * H - keys(side)) / (2 * H))))
    omni = dict(top_k=s.omni_k, schedule="expert")
    if name == "omnimoe":
        return omnimoe.OmniMoE(H, s.omni_shared, grid=(side, side), **omni)
    if name == "omnimoe-no-shared":
        return omnimoe.OmniMoE(H, 0, grid=(side, side), **omni)
    if name == "omnimoe-dense-router":
        return omnimoe.OmniMoE(H, s.omni_shared, grid=(1, side * side), **omni)
    if name == "omnimoe-token-centric":
        return omnimoe.OmniMoE(H, s.omni_shared, grid=(side, side), top_k=s.omni_k, schedule="token")
    raise ValueError(f"train_lm: unknown FFN {name!r}; known: {', '.join(FFNS + ABLATIONS)}")


def counts(m: nn.Module) -> Dict[str, float]:
    """Activated and total parameters of one FFN module, and its experts (0 for Dense)."""
    H = m.hidden_size
    total = sum(p.numel() for p in m.parameters())
    if isinstance(m, omnimoe.OmniMoE):
        act = omnimoe_activated(H, m.grid_rows, m.grid_cols, m.top_k, m.intermediate_size)
        return {"activated": act, "total": total, "experts": m.num_experts, "top_k": m.top_k}
    if isinstance(m, omnimoe.Dense):
        return {"activated": total, "total": total, "experts": 0, "top_k": 0}
    if isinstance(m, (omnimoe.GShard, omnimoe.DeepSeekMoE)):
        shared = 3 * H * m.shared_width
        act = m.num_experts * H + 3 * H * m.expert_width * m.top_k + shared
        return {"activated": act, "total": total, "experts": m.num_experts, "top_k": m.top_k}
    per_expert = 2 * H if isinstance(m, omnimoe.PEER) else H
    act = H * H + (m.grid_rows + m.grid_cols) * H // 2 + per_expert * m.top_k
    return {"activated": act, "total": total, "experts": m.num_experts, "top_k": m.top_k}


class FFNBlock(nn.Module):
    """One FFN module run in `compute_dtype` (bfloat16 on the GPU: the library's fast path)
    with float32 master parameters: the parameters and x are cast on the way in (the casts
    are differentiable, so the gradients reach the float32 parameters) and y is cast back.
    With `collect` set it counts how often each expert is chosen (for the routing metrics)."""

    def __init__(self, inner: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.compute_dtype = compute_dtype
        self.num_experts = counts(inner)["experts"]
        self.collect = False
        self.register_buffer("chosen", torch.zeros(max(self.num_experts, 1), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        params = {n: p.to(cd) for n, p in self.inner.named_parameters()}
        xc = x.to(cd)
        if self.collect and self.num_experts:
            kw = {"return_routing": True} if isinstance(self.inner, omnimoe.OmniMoE) else {"return_expert_ids": True}
            y, routing = functional_call(self.inner, params, (xc,), kw)
            ids = routing.expert_ids if isinstance(self.inner, omnimoe.OmniMoE) else routing
            self.chosen += torch.bincount(ids.reshape(-1).long(), minlength=self.num_experts)
        else:
            y = functional_call(self.inner, params, (xc,))
        return y.to(x.dtype)
