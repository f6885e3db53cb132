"""Routing metrics over a set of chosen-expert counts, and the FFN's cost in isolation."""

import math
import statistics
import time
from typing import Dict, List

import torch


def routing_metrics(chosen: List[torch.Tensor]) -> Dict[str, float]:
    """Per layer: usage = share of the N experts chosen at least once; unevenness = KL
    divergence of the chosen-expert frequency f from uniform, sum_e f_e log(f_e N) (nats;
    0 when every expert is chosen equally often, log N when one expert takes every choice).
    Returned as means over the layers."""
    usage, kl = [], []
    for c in chosen:
        c = c.double().cpu()
        N = c.numel()
        f = c / c.sum()
        nz = f > 0
        usage.append(nz.double().mean().item())
        kl.append((f[nz] * (f[nz] * N).log()).sum().item())
    return {"expert_usage": statistics.fmean(usage), "kl_uniform": statistics.fmean(kl)}


def ffn_cost(block: torch.nn.Module, tokens: int, hidden: int, device: torch.device, reps: int) -> Dict[str, float]:
    """Forward + backward of one FFN block alone on [tokens, hidden] random inputs, in
    training mode: median milliseconds (CUDA events on the GPU, the wall clock on the CPU) and,
    on the GPU, the peak memory beyond what was allocated before the timed call (parameters,
    their gradients, x and its gradient are allocated by the warm-up)."""
    x = torch.randn(tokens, hidden, device=device, requires_grad=True)
    gy = torch.randn(tokens, hidden, device=device)

    def step():
        y = block(x)
        y.backward(gy)

    for _ in range(2):
        step()
    cuda = device.type == "cuda"
    times = []
    peak_mb = float("nan")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    block.zero_grad(set_to_none=True)
    return {"ffn_ms": statistics.median(times), "ffn_peak_mb": peak_mb}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
