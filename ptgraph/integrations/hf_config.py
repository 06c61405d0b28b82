"""A Hugging Face model pruned under the `config` allocation stays a model of its family: the config is
rewritten from the kept widths, the model's Python side (the sizes its __init__ derived from the config:
GPT-2's split size, a Conv1D's `nf`, a Linear's `out_features`) is rebuilt from it, and `save_pretrained` then
writes a standard checkpoint. Everything is found by probing: the model's class is built from edited configs
on the meta device (no memory, a fraction of a second) and its parameter shapes compared; nothing here names
a model.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ptgraph.errors import UserError
from ptgraph.passes import ChannelAnalysis
from ptgraph.trainers.uniform_blocks import Blocks, Knob, find_blocks

_WIDTH_NAMES = re.compile(r"inner|intermediate|ffn|ff_|mlp")  # where a config keeps its MLP width (None: derived)


def _meta(model: nn.Module, config: Any) -> nn.Module:
    """The model's class built from `config`, on the meta device (no weights, no initialisation cost)."""
    with torch.device("meta"), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return type(model)(config)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _edited(config: Any, **values: int) -> Any:
    config = copy.deepcopy(config)
    for k, v in values.items():
        setattr(config, k, v)
    return config


def _moves(model: nn.Module, config: Any, members: list[tuple[str, int]], base: dict[str, tuple[int, ...]]) -> bool:
    """Whether building from `config` changes any of `members` (name, axis) along its axis; a config the class
    refuses counts as a change."""
    try:
        shapes = _shapes(_meta(model, config))
    except Exception:  # noqa: BLE001 - e.g. "embed_dim must be divisible by num_heads"
        return True
    return any(shapes.get(n, (None,) * (a + 1))[a] != base[n][a] for n, a in members if n in base)


def _members(analysis: ChannelAnalysis, gid: int) -> list[tuple[str, int]]:
    return sorted({(m.name, m.axis) for m in analysis.group(gid).members})


def fit_blocks(model: nn.Module, analysis: ChannelAnalysis, multiple: int = 8) -> Blocks:
    """The config allocation's widths for a Hugging Face model: each width named by its config attribute, the
    stream tied to the heads where the config derives the heads' width from the hidden size, and groups outside
    the blocks that the config sizes by the hidden size (BERT's pooler) following the stream; a width the config
    has no attribute for is left whole."""
    config, base = model.config, _shapes(model)
    size = {g.id: g.size for g in analysis.groups}
    blocks = find_blocks(analysis, multiple)
    hidden = getattr(config, "hidden_size", None)
    nh, nkv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    probe = _edited(config, hidden_size=hidden + multiple * nh) if isinstance(hidden, int) and isinstance(nh, int) else None
    heads = [k for k in blocks.knobs if k.heads]
    head_members = [m for k in heads for m in _members(analysis, k.groups[0])]
    pinned: tuple[tuple[str, int], ...] = ()
    if heads and probe is not None and _moves(model, probe, head_members, base):
        # the heads' width follows the hidden size unless the config can say it (Qwen2 reads head_dim if set)
        pin = (("head_dim", hidden // nh),) if hidden % nh == 0 else ()
        if pin and not _moves(model, _edited(config, **dict(pin)), [(n, a) for n in base for a in range(len(base[n]))],
                              base) and not _moves(model, _edited(probe, **dict(pin)), head_members, base):
            pinned = pin
        else:
            blocks = find_blocks(analysis, multiple, tie=True)
    attrs, kept = [], []
    for knob in blocks.knobs:
        g = knob.groups[0]
        found = []
        if knob.heads and isinstance(nh, int):
            if isinstance(nkv, int) and nkv == size[g] and nh % nkv == 0:
                found = [("num_key_value_heads", g, 1), ("num_attention_heads", g, nh // nkv)]
            elif nh == size[g]:
                found = [("num_attention_heads", g, 1)]
            if knob.followers:
                stream = knob.followers[0][0]
                found = found + [("hidden_size", stream, 1)] if found and hidden == size[stream] else []
        elif knob.stream:
            found = [("hidden_size", g, 1)] if hidden == size[g] else []
        elif not knob.heads:
            found = [(a, g, 1) for a in _width_attr(model, config, analysis, knob, size[g], base)]
        if found:
            attrs += found
            kept.append(knob)
    holder = next((i for i, k in enumerate(kept) if any(a == "hidden_size" for a, g, _ in attrs if g in
                                                           k.groups + tuple(f for f, _ in k.followers))), None)
    outside = set(blocks.outside) | {g for k in blocks.knobs if k not in kept
                                     for g in k.groups + tuple(f for f, _ in k.followers)}
    if holder is not None and probe is not None:  # sized by the hidden size though outside the blocks
        knob = kept[holder]
        ratio = next((r for f, r in knob.followers), 1)
        tagged = [g for g in sorted(blocks.outside)
                  if size[g] == hidden and _moves(model, probe, _members(analysis, g), base)]
        kept[holder] = replace(knob, followers=knob.followers + tuple((g, ratio) for g in tagged))
        outside -= set(tagged)
    return replace(blocks, knobs=tuple(kept), outside=frozenset(outside), attrs=tuple(attrs), pinned=pinned)


def _width_attr(model: nn.Module, config: Any, analysis: ChannelAnalysis, knob: Knob, width: int,
                base: dict[str, tuple[int, ...]]) -> list[str]:
    """The config attribute that sets this width (e.g. intermediate_size, or GPT-2's n_inner, None by default):
    the first candidate whose edit moves the width's parameters."""
    values = config.to_dict()
    candidates = [a for a, v in values.items() if type(v) is int and v == width]
    candidates += [a for a, v in values.items() if v is None and _WIDTH_NAMES.search(a)]
    members = _members(analysis, knob.groups[0])
    for a in candidates:
        if a != "hidden_size" and _moves(model, _edited(config, **{a: max(1, width - knob.unit)}), members, base):
            return [a]
    return []


def pruned_config(model: nn.Module, blocks: Blocks, analysis: ChannelAnalysis) -> Any:
    """The model's config with every width the allocation cut set to what it keeps now, and the sizes it must
    now state because they no longer follow from the others (head_dim, where derived from the hidden size)."""
    size = {g.id: g.size for g in analysis.groups}
    return _edited(model.config, **dict(blocks.pinned), **{a: size[g] * per for a, g, per in blocks.attrs})


def mismatch(model: nn.Module, config: Any) -> str | None:
    """The first parameter whose shape `config` does not give (one sentence), or None."""
    try:
        want = _shapes(_meta(model, config))
    except Exception as e:  # noqa: BLE001
        return f"its class refuses the rewritten config ({e})"
    have = _shapes(model)
    for name, shape in have.items():
        if want.get(name) != shape:
            return f"'{name}' is {tuple(shape)} but the rewritten config gives {want.get(name)}"
    return None


def adopt(model: nn.Module, config: Any) -> None:
    """Make `model` the model `config` describes, keeping every parameter object (optimizer state and the
    traced graph share them): its config and every size its modules derived from the config."""
    problem = mismatch(model, config)
    if problem:
        raise UserError(f"the pruned {type(model).__name__} is no longer expressible by its "
                        f"{type(config).__name__}: {problem}; prune it with allocation='config' (PruneTrainCallback "
                        f"does) and leave out groups outside its repeated blocks, or save the graph module instead")
    twin = _meta(model, config)
    for name, new in twin.named_modules():
        old = model.get_submodule(name)
        assert type(old) is type(new), f"{name}: {type(old).__name__} vs {type(new).__name__}"
        for key, value in vars(new).items():
            if not key.startswith("_") and key != "training" and _plain(value):
                old.__dict__[key] = value
    model.config = config


def _plain(value: Any) -> bool:
    """Sizes and settings a module's __init__ derives, never tensors, modules or bound methods."""
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return hasattr(value, "to_dict") and hasattr(value, "model_type")  # a PretrainedConfig
