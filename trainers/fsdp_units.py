"""Repeated blocks as called submodules, so that FSDP2 can shard a torch.export-captured graph block by block.

FSDP2 gathers a unit's parameters in a hook on the unit's forward. A graph captured by torch.fx calls its
modules (`call_module`), so a block's modules are such units. A graph captured by torch.export calls none: it
reads every parameter with `get_attr` and runs ATen ops on them, so no hook would ever fire and the only unit
would be the root (the whole model gathered in every forward). `with_called_blocks` rewrites a copy of such a
graph module: the ops of each repeated block, from the first that reads one of its parameters to the last,
move into a graph module installed at the block's own path (`model.layers.3`), which the root graph calls.
Every parameter and buffer keeps its name and object, so the sharded copy's names are the skeleton's.
"""
from __future__ import annotations

import copy
import itertools
import operator

from torch import fx, nn


def _block_of(target: str, blocks: list[str]) -> str | None:
    return next((b for b in blocks if target == b or target.startswith(b + ".")), None)


def _spans(graph: fx.Graph, blocks: list[str]) -> list[tuple[int, int, str]] | None:
    """Per block, the first and last op (by position) that reads one of its tensors; None if some block is
    read by no op or two blocks' spans interleave (then the graph is left as it is)."""
    nodes = list(graph.nodes)
    uses: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        for a in n.all_input_nodes:
            b = _block_of(a.target, blocks) if a.op == "get_attr" else None
            if b:
                uses.setdefault(b, []).append(i)
    if set(uses) != set(blocks):
        return None
    spans = sorted((min(v), max(v), b) for b, v in uses.items())
    if any(s <= prev_end for (_, prev_end, _), (s, _, _) in itertools.pairwise(spans)):
        return None
    return spans


def _move_span(gm: fx.GraphModule, nodes: list[fx.Node], block: str, blocks: list[str]) -> None:
    """The ops `nodes` (one block's span) become a graph module at `block`'s path, called from the root."""
    inside = {n for n in nodes if n.op not in ("get_attr", "placeholder", "output")}
    body = [n for n in nodes if n in inside]
    own = lambda a: a.op == "get_attr" and _block_of(a.target, blocks) == block  # noqa: E731
    inputs = list(dict.fromkeys(a for n in body for a in n.all_input_nodes if a not in inside and not own(a)))
    outputs = [n for n in body if any(u not in inside for u in n.users)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: g.placeholder(a.name) for a in inputs}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            assert own(a), f"{a.name} is neither an input nor a tensor of {block}"
            env[a] = g.get_attr(a.target[len(block) + 1:])
        return env[a]

    for n in body:
        env[n] = g.node_copy(n, lookup)
    g.output(tuple(env[o] for o in outputs))
    sub = fx.GraphModule(gm.get_submodule(block), g, class_name="Block")  # the same parameter objects
    parent, _, name = block.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, sub)
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(block, tuple(inputs))
    with gm.graph.inserting_after(call):
        for i, o in enumerate(outputs):
            item = gm.graph.call_function(operator.getitem, (call, i))
            o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in inside)
    for n in reversed(body):
        gm.graph.erase_node(n)


def _names(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in [*module.named_parameters(remove_duplicate=False),
                                           *module.named_buffers(remove_duplicate=False)]}


def with_called_blocks(gm: fx.GraphModule, blocks: list[str]) -> fx.GraphModule:
    """A copy of `gm` whose repeated `blocks` are called submodules (see the module's docstring), or `gm` itself
    when its graph calls them already, reads none of them, or interleaves two of them."""
    if not blocks or any(n.op == "call_module" and _block_of(n.target, blocks) for n in gm.graph.nodes):
        return gm
    spans = _spans(gm.graph, blocks)
    if spans is None:
        return gm
    out = copy.deepcopy(gm)
    nodes = list(out.graph.nodes)
    for start, end, block in reversed(spans):  # from the last: earlier positions stay valid
        _move_span(out, nodes[start:end + 1], block, blocks)
    for n in list(out.graph.nodes):
        if n.op == "get_attr" and not n.users:
            out.graph.erase_node(n)
    out.graph.lint()
    out.recompile()
    if _names(out) != _names(gm):  # a tensor the graph never reads would be dropped with its block
        return gm
    return out
