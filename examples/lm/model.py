"""A small decoder-only transformer (pre-norm GPT) whose feed-forward block is given."""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ffn = ffn

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class LM(nn.Module):
    """Byte-level language model: embeddings (tied with the output layer), learned positions,
    `layers` pre-norm blocks, final LayerNorm."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int, make_ffn: Callable[[], nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(Block(d, heads, make_ffn()) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        for b in self.blocks:
            nn.init.normal_(b.attn.qkv.weight, std=0.02)
            nn.init.normal_(b.attn.proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx, targets=None):
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        logits = self.ln(x) @ self.embed.weight.t()
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def ffns(self):
        return [b.ffn for b in self.blocks]
