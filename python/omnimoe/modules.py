"""nn.Module wrappers of the library's layers."""

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._ops import accumulation_dtype
from .functional import ACTIVATIONS, GATES, ROUTER_NORMS, SCHEDULES, omnimoe_layer

_STATS = ("running_mean_row", "running_var_row", "running_mean_col", "running_var_col")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"OmniMoE: {name} must be a positive int, got {value!r}")
    return value


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"OmniMoE: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


class OmniMoE(nn.Module):
    """The OmniMoE feed-forward layer (DESIGN.md section 1): N = Nr x Nc atomic experts chosen
    per token by a Cartesian-product router, K per token, beside a dense SwiGLU MLP of width
    ``intermediate_size`` (0: none). Maps [..., hidden_size] to [..., hidden_size].

    Args:
        hidden_size: H.
        intermediate_size: I, the shared SwiGLU width; 0 turns the shared branch off.
        num_experts: N as an int that is a perfect square (grid sqrt(N) x sqrt(N)), or the grid
            (Nr, Nc) itself; or leave it out and pass ``grid=(Nr, Nc)``.
        top_k: K, experts per token, 1 <= K <= N.
        router_norm: 'batchnorm' (default; no affine part, eps 1e-5, momentum 0.1) or 'none'.
        gate: 'exp' (g = exp(S), default) or 'softmax' (over the K chosen scores). Stored as
            ``gate_fn``: the attribute ``gate`` is the shared MLP's parameter.
        activation: 'silu' (default), 'gelu' (exact) or 'relu'.
        schedule: how the CUDA experts stage runs, forward and backward: 'auto' (default:
            chosen from T, K, N, H and the dtype), 'expert' (expert-centric tile products) or
            'token' (token-centric per-token gathers: the paper's ablation without
            expert-centric scheduling). The CPU ignores it. Schedules agree within rounding,
            not bitwise.

    Parameters: router_row [Nr, H], router_col [Nc, H], expert_in [N, H], expert_out [N, H],
    and (I > 0) gate [I, H], up [I, H], down [H, I]. Buffers (batchnorm): running_mean_row,
    running_var_row [Nr], running_mean_col, running_var_col [Nc]; they stay float32 when the
    module moves to bfloat16 / float16 (float64 for a float64 module), as the library keeps
    them. ``train()`` mode normalises the router logits with the batch statistics (T >= 2
    tokens) and updates the running ones; ``eval()`` mode uses the running statistics.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: Union[int, Tuple[int, int], None] = None,
        top_k: Optional[int] = None,
        router_norm: str = "batchnorm",
        gate: str = "exp",
        activation: str = "silu",
        schedule: str = "auto",
        *,
        grid: Optional[Tuple[int, int]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if grid is None:
            if isinstance(num_experts, (tuple, list)):
                grid = tuple(num_experts)
            elif num_experts is None:
                raise ValueError("OmniMoE: give num_experts (a perfect square, or (Nr, Nc)) or grid=(Nr, Nc)")
            else:
                n = _positive_int("num_experts", num_experts)
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"OmniMoE: num_experts = {n} is not a perfect square; pass grid=(Nr, Nc)")
                grid = (side, side)
        elif num_experts is not None:
            same = (tuple(num_experts) == tuple(grid) if isinstance(num_experts, (tuple, list))
                    else num_experts == grid[0] * grid[1])
            if not same:
                raise ValueError(f"OmniMoE: num_experts = {num_experts!r} disagrees with grid = {grid!r}")
        if len(grid) != 2:
            raise ValueError(f"OmniMoE: grid must be (Nr, Nc), got {grid!r}")
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) or intermediate_size < 0:
            raise ValueError(f"OmniMoE: intermediate_size must be an int >= 0, got {intermediate_size!r}")
        self.intermediate_size = intermediate_size
        self.grid_rows = _positive_int("grid rows", grid[0])
        self.grid_cols = _positive_int("grid columns", grid[1])
        self.num_experts = self.grid_rows * self.grid_cols
        self.top_k = _positive_int("top_k", top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"OmniMoE: top_k = {top_k} exceeds num_experts = {self.num_experts}")
        self.router_norm = _choice("router_norm", router_norm, ROUTER_NORMS)
        self.gate_fn = _choice("gate", gate, GATES)
        self.activation = _choice("activation", activation, ACTIVATIONS)
        self.schedule = _choice("schedule", schedule, SCHEDULES)

        f = {"device": device, "dtype": dtype}
        H, I, Nr, Nc, N = hidden_size, intermediate_size, self.grid_rows, self.grid_cols, self.num_experts
        self.router_row = nn.Parameter(torch.empty(Nr, H, **f))
        self.router_col = nn.Parameter(torch.empty(Nc, H, **f))
        self.expert_in = nn.Parameter(torch.empty(N, H, **f))
        self.expert_out = nn.Parameter(torch.empty(N, H, **f))
        for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            self.register_parameter(name, nn.Parameter(torch.empty(*shape, **f)) if I > 0 else None)
        acc = accumulation_dtype(self.router_row.dtype)
        for name in _STATS:
            n = Nr if name.endswith("_row") else Nc
            buf = torch.empty(n, device=device, dtype=acc) if router_norm == "batchnorm" else None
            self.register_buffer(name, buf)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router and shared MLP as nn.Linear initialises its weight (U(-1/sqrt(fan_in),
        1/sqrt(fan_in))); expert_in and expert_out U(-1/sqrt(H), 1/sqrt(H)); running means 0,
        running variances 1."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in (self.router_row, self.router_col, self.expert_in, self.expert_out, self.gate, self.up):
            if w is not None:
                nn.init.uniform_(w, -bound, bound)
        if self.down is not None:
            nn.init.uniform_(self.down, -1.0 / math.sqrt(self.intermediate_size), 1.0 / math.sqrt(self.intermediate_size))
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        if self.router_norm == "batchnorm":
            for name in _STATS:
                getattr(self, name).fill_(0.0 if "mean" in name else 1.0)

    def forward(self, x: Tensor, return_routing: bool = False):
        """y [..., H] for x [..., H]; with return_routing=True, (y, Routing)."""
        return omnimoe_layer(
            x, self.router_row, self.router_col, self.expert_in, self.expert_out, self.gate, self.up, self.down,
            self.running_mean_row, self.running_var_row, self.running_mean_col, self.running_var_col,
            top_k=self.top_k, router_norm=self.router_norm, gate_fn=self.gate_fn, activation=self.activation,
            training=self.training, return_routing=return_routing, schedule=self.schedule)

    def _apply(self, fn, recurse=True):
        # Running statistics follow the module's device but keep the accumulation dtype
        # (float32, float64 for a float64 module): convert them from their old values, not
        # through a bfloat16 round trip.
        old = {n: self._buffers[n] for n in _STATS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        acc = accumulation_dtype(self.router_row.dtype)
        for n, before in old.items():
            after = self._buffers[n]
            if after.dtype != acc:
                self._buffers[n] = before.to(device=after.device, dtype=acc)
        return self

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"grid=({self.grid_rows}, {self.grid_cols}), top_k={self.top_k}, router_norm={self.router_norm!r}, "
                f"gate={self.gate_fn!r}, activation={self.activation!r}, schedule={self.schedule!r}")
