"""A plain-PyTorch GPT-style model (no Hugging Face): fused-qkv attention, SwiGLU MLP,
top-k MoE with stacked expert weights, untied or tied LM head. Used by the planner tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d, bias=False)  # fused q, k, v: [3d, d]
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.w1 = nn.Linear(d, h, bias=False)  # gate
        self.w3 = nn.Linear(d, h, bias=False)  # up
        self.w2 = nn.Linear(h, d, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TopKMoE(nn.Module):
    """Router [E, d]; experts stacked as w_in [E, 2h, d] (gate then up) and w_out [E, d, h]."""

    def __init__(self, d: int, h: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = StackedExperts(d, h, experts)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(-1)
        weight, index = probs.topk(self.top_k, dim=-1)
        dense = torch.zeros_like(probs).scatter(-1, index, weight)  # [N, E]
        return (self.experts(x) * dense.unsqueeze(-1)).sum(1).reshape(shape)


class StackedExperts(nn.Module):
    def __init__(self, d: int, h: int, experts: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, 2 * h, d) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(experts, d, h) / h**0.5)

    def forward(self, x):  # every expert on every token (tiny test model): [N, E, d]
        gate, up = torch.einsum("nd,ekd->nek", x, self.w_in).chunk(2, dim=-1)
        return torch.einsum("neh,edh->ned", F.silu(gate) * up, self.w_out)


# Gate/up order of StackedExperts.w_in: the forward uses chunk(2) (concatenated parts).
FUSED_LAYOUTS = {r"experts\.w_in$": "stacked+fused2:concat"}


class Block(nn.Module):
    def __init__(self, d, n_head, h, moe: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_head)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = TopKMoE(d, h, experts=4, top_k=2) if moe else SwiGLU(d, h)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PlainGPT(nn.Module):
    def __init__(self, vocab=64, d=32, n_head=4, h=48, layers=2, moe_every=2, tied=False, block_size=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(Block(d, n_head, h, moe=(i + 1) % moe_every == 0) for i in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
