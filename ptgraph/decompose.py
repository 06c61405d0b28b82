"""Traceable forwards for library modules that torch.fx would keep whole: nn.MultiheadAttention.

fx stops at nn.MultiheadAttention (its forward branches on shapes and flags), and a whole module
freezes the embedding stream it reads and writes, and its heads. For the common self-attention
call (one tensor for query, key and value; no masks; no bias_k/bias_v) the forward is written
again with ops the rules follow: the packed in-projection unflattened to (3, heads, head_dim),
attention over (..., heads, seq, head_dim), the out-projection. Heads then go whole (exact) and
the stream is prunable like any linear's. Other calls stay single nodes (auto capture then goes
to torch.export). The graph module, not the user's module, then runs the pruned model: the
user's module keeps its old embed_dim.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
_MHA_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
                 "is_causal": False}


def mha_call(m: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name when this module and call can be decomposed, else None."""
    if not isinstance(m, nn.MultiheadAttention) or len(args) > len(_MHA_ARGS):
        return None
    call = {**_MHA_DEFAULTS, **dict(zip(_MHA_ARGS, args)), **kwargs}
    if set(call) != set(_MHA_ARGS):
        return None
    x = call["query"]
    plain = (m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None and m.bias_v is None
             and not m.add_zero_attn)
    self_attention = isinstance(x, fx.Proxy) and call["key"] is x and call["value"] is x
    no_masks = call["key_padding_mask"] is None and call["attn_mask"] is None and call["is_causal"] is False
    flags = isinstance(call["need_weights"], bool) and isinstance(call["average_attn_weights"], bool)
    return call if plain and self_attention and no_masks and flags else None


def mha_forward(m: nn.MultiheadAttention, call: dict[str, Any]) -> tuple[Any, Any]:
    """nn.MultiheadAttention's result for a call `mha_call` accepted, batched or not, batch_first or not.
    Called under the fx tracer: parameters become get_attr nodes, m.out_proj a call_module node."""
    heads, head_dim = m.num_heads, m.head_dim
    qkv = F.linear(call["query"], m.in_proj_weight, m.in_proj_bias).unflatten(-1, (3, heads, head_dim))
    # (..., seq, heads, head_dim) -> (..., heads, seq, head_dim); not batch_first: seq is axis 0
    parts = qkv.unbind(-3)
    q, k, v = (parts[i].transpose(-3, -2) if m.batch_first else parts[i].movedim(0, -2) for i in range(3))
    weights = None
    if call["need_weights"] or m.dropout > 0:
        weights = torch.softmax((q * (1 / math.sqrt(head_dim))) @ k.transpose(-2, -1), dim=-1)
        if m.dropout > 0:
            weights = F.dropout(weights, m.dropout, training=True)  # becomes an nn.Dropout: follows train/eval
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = (out.transpose(-3, -2) if m.batch_first else out.movedim(-2, 0)).flatten(-2)
    out = m.out_proj(out)
    if not call["need_weights"]:
        return out, None
    return out, (weights.mean(dim=-3) if call["average_attn_weights"] else weights)
