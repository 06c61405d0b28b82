"""In-place writes into slices of intermediate tensors, made functional for the TorchScript ONNX exporter.

A torch.export graph keeps `mask[a:b, c:d] = v` as written: slices of an intermediate tensor and an in-place
op (`fill_`, `copy_`, `add_`, ...) on the last one (torchvision's Swin builds its shifted-window mask so). The
TorchScript exporter drops such a write (the tensor stays as it was), and the ONNX model computes something
else. `functional_slice_writes` rewrites a copy of the graph: the written slice computed out of place, put
back along the chain (the parts before and after it concatenated around it), and every later reader of the
base tensor reads the result.
"""
from __future__ import annotations

import copy

import torch
from torch import fx

aten = torch.ops.aten
_END = 2 ** 62  # aten.slice's "to the end"


def _writes_in_place(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return n.op == "call_function" and schema is not None and bool(schema.arguments) \
        and bool(getattr(schema.arguments[0].alias_info, "is_write", False))


def _slice_chain(view: fx.Node) -> list[fx.Node] | None:
    """The slices from a base tensor to `view`, outermost first; None unless every link is a slice with no other
    reader (a second reader of a slice would need its value before the write too)."""
    chain = []
    while view.op == "call_function" and view.target is aten.slice.Tensor:
        if len(view.users) != 1 or view.args[4:] not in ((), (1,)) or view.kwargs:  # a step: not handled
            return None
        chain.append(view)
        view = view.args[0]
    return chain[::-1] or None


def _out_of_place(n: fx.Node, view: fx.Node, g: fx.Graph) -> fx.Node | None:
    """The value the in-place op `n` writes into `view`, computed without writing."""
    name = n.target._schema.name.split("::")[1]
    if name in ("fill_", "copy_", "zero_"):
        value = 0.0 if name == "zero_" else n.args[1]  # aten.zero, the functional zero_, trips that exporter
        if not isinstance(value, fx.Node):  # a Python number: a constant tensor (full_like trips that exporter)
            gm = g.owning_module
            const = f"_onnx_fill_{len([k for k in gm._buffers if k.startswith('_onnx_fill_')])}"
            gm.register_buffer(const, torch.tensor(value), persistent=False)
            value = g.get_attr(const)
        return g.call_function(aten.expand_as.default, (g.call_function(aten.to.other, (value, view)), view))
    plain = getattr(aten, name[:-1], None)
    overload = getattr(plain, n.target._overloadname, None) if plain is not None else None
    return g.call_function(overload, (view, *n.args[1:]), dict(n.kwargs)) if overload is not None else None


def _put_back(g: fx.Graph, view: fx.Node, value: fx.Node) -> fx.Node:
    """`view.args[0]` with the slice `view` replaced by `value`: the parts before and after it concatenated around
    it (`slice_scatter` has no ONNX symbolic in the TorchScript exporter; slices and cat do)."""
    base, dim, start, end = (list(view.args) + [0, None, None])[:4]
    start, end = start or 0, _END if end is None else end
    before = g.call_function(aten.slice.Tensor, (base, dim, 0, start))
    after = g.call_function(aten.slice.Tensor, (base, dim, end, _END))
    return g.call_function(aten.cat.default, ([before, value, after], dim))


def functional_slice_writes(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` without in-place writes into slices (see the module's docstring), or `gm` if it has none."""
    targets = [n for n in gm.graph.nodes if _writes_in_place(n) and isinstance(n.args[0], fx.Node)
               and _slice_chain(n.args[0]) is not None and not n.users]
    if not targets:
        return gm
    out = copy.deepcopy(gm)
    g = out.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in [m for m in g.nodes if m.name in {t.name for t in targets}]:
        chain = _slice_chain(n.args[0])
        base = chain[0].args[0]
        with g.inserting_before(n):
            value = _out_of_place(n, chain[-1], g)
            if value is None:
                continue
            for view in reversed(chain):  # put the new slice back, level by level
                value = _put_back(g, view, value)
        later = [u for u in base.users if order.get(u, -1) > order[n]]
        for u in later:
            u.replace_input_with(base, value)
        g.erase_node(n)
        for view in reversed(chain):
            if not view.users:
                g.erase_node(view)
    g.lint()
    out.recompile()
    return out
