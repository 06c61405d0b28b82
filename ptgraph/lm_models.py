"""A tiny GPT as a built-in spec (`ptgraph:gpt?vocab_size=256&block_size=64&n_layer=2&n_head=4&n_embd=64`).

Why: the language-model path (token inputs, `--data tokens:...`, perplexity) needs a model that
ships with ptgraph and trains on the CPU in seconds. It is the nanoGPT layout (token + position
embedding, pre-LN blocks of causal self-attention and a GELU MLP, final LayerNorm, lm_head tied to
the token embedding by default), written so that torch.fx traces it whole: sizes are read with
`x.size(i)` and heads are split with `view(B, T, n_head, -1)`, so no Python value depends on data
and a shrunk head dimension needs no rewritten constant.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptgraph.errors import UserError


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/out projections (one channel group each, for pruning)."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_embd, n_embd)
        self.k = nn.Linear(n_embd, n_embd)
        self.v = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.size(0), x.size(1)
        q = self.q(x).view(b, t, self.n_head, -1).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_head, -1).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token ids (batch, time) -> next-token logits (batch, time, vocab_size)."""

    def __init__(self, vocab_size: int = 256, block_size: int = 64, n_layer: int = 2, n_head: int = 4,
                 n_embd: int = 64, tie: bool = True) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_embd", n_embd)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"ptgraph:gpt needs a positive integer {name}, not {value!r}; e.g. ?{name}=64")
        if n_embd % n_head:
            raise UserError(f"ptgraph:gpt's n_embd ({n_embd}) must be a multiple of n_head ({n_head}); "
                            f"e.g. n_embd={n_head * max(1, n_embd // n_head)}")
        self.block_size = block_size  # the longest sequence the position embedding covers (read by the trainer)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
        if tie:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        return self.lm_head(self.ln_f(self.blocks(x)))


def gpt(vocab_size: int = 256, block_size: int = 64, n_layer: int = 2, n_head: int = 4, n_embd: int = 64,
        tie: bool = True) -> GPT:
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, tie)


MODELS = {"gpt": gpt}
