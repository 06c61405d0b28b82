"""Traceable forwards for library modules and calls that torch.fx would keep whole: nn.MultiheadAttention
and F.multi_head_attention_forward called directly (an attention-pooling head with its own projections).

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


_FN_ARGS = tuple(__import__("inspect").signature(F.multi_head_attention_forward).parameters)


def mha_function_call(args: tuple, kwargs: dict, tensor_of: Any) -> dict[str, Any] | None:
    """The arguments of an F.multi_head_attention_forward call by name when it can be decomposed, else None:
    no masks, no bias_k/bias_v or zero attention, no static keys; separate q/k/v weights, or a packed one for
    self-attention; weights the graph reads as parameters (`tensor_of` gives their tensor, or None), so the
    head size is known."""
    if len(args) > len(_FN_ARGS):
        return None
    call = {**dict(zip(_FN_ARGS, args)), **kwargs}
    defaults = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
                "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
                "is_causal": False}
    call = {**defaults, **call}
    if set(call) != set(_FN_ARGS):
        return None
    none = ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")
    flags = ("training", "need_weights", "average_attn_weights", "use_separate_proj_weight", "add_zero_attn",
             "is_causal")
    if any(call[k] is not None for k in none) or not all(isinstance(call[k], bool) for k in flags):
        return None
    if call["add_zero_attn"] or call["is_causal"] or not isinstance(call["num_heads"], int):
        return None
    if not isinstance(call["dropout_p"], (int, float)) or not isinstance(call["query"], fx.Proxy):
        return None
    if call["use_separate_proj_weight"]:
        first = call["q_proj_weight"]
    else:
        x = call["query"]
        first = call["in_proj_weight"] if call["key"] is x and call["value"] is x else None
    weight = tensor_of(first) if first is not None else None
    out_weight = tensor_of(call["out_proj_weight"])
    if weight is None or out_weight is None or weight.dim() != 2 or out_weight.shape[1] % call["num_heads"]:
        return None
    call["head_dim"] = out_weight.shape[1] // call["num_heads"]
    return call


def mha_function_forward(call: dict[str, Any]) -> tuple[Any, Any]:
    """F.multi_head_attention_forward's result, (seq, batch, embed) or unbatched (seq, embed), for a call
    `mha_function_call` accepted, written with ops the rules follow: heads go whole as for the module."""
    heads, head_dim = call["num_heads"], call["head_dim"]
    if call["use_separate_proj_weight"]:
        bias = call["in_proj_bias"]
        parts = bias.chunk(3) if bias is not None else (None, None, None)
        q, k, v = (F.linear(call[x], call[f"{x[0]}_proj_weight"], parts[i]).unflatten(-1, (heads, head_dim))
                   for i, x in enumerate(("query", "key", "value")))
    else:
        qkv = F.linear(call["query"], call["in_proj_weight"], call["in_proj_bias"])
        parts = qkv.unflatten(-1, (3, heads, head_dim)).unbind(-3)
        q, k, v = parts[0], parts[1], parts[2]
    q, k, v = (t.movedim(0, -2) for t in (q, k, v))  # (seq, ..., heads, head_dim) -> (..., heads, seq, head_dim)
    dropout = call["dropout_p"] if call["training"] else 0.0
    weights = None
    if call["need_weights"] or dropout > 0:
        weights = torch.softmax((q * (1 / math.sqrt(head_dim))) @ k.transpose(-2, -1), dim=-1)
        if dropout > 0:
            weights = F.dropout(weights, dropout, training=True)  # becomes an nn.Dropout: follows train/eval
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out = F.linear(out.movedim(-2, 0).flatten(-2), call["out_proj_weight"], call["out_proj_bias"])
    if not call["need_weights"]:
        return out, None
    return out, (weights.mean(dim=-3) if call["average_attn_weights"] else weights)
