"""Channel flow: walk the graph once, let each op's rule say how channel types flow and couple.

The result (`ChannelFlow`) is the whole analysis state: the element union-find, every node's
channel type, every parameter axis's elements, and the callbacks that keep module attributes
and graph constants true after a shrink. Dropped elements are marked dead in `alive`, so a
shrink updates the state in place and nothing is ever re-traced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ptgraph.channels import ChannelSpace, TensorType
from ptgraph.graph import Graph

NodeType = Any  # TensorType, or a tuple of NodeType for tuple outputs, or None for non-tensors
Counter = Callable[[np.ndarray], int]  # alive elements among ids
OnShrink = Callable[[Counter], None]  # sets a module attribute or node argument from the survivors


@dataclass
class ChannelFlow:
    graph: Graph
    space: ChannelSpace
    types: dict[fx.Node, NodeType]
    param_axes: dict[str, dict[int, np.ndarray]]  # param/buffer name -> axis -> elements
    module_fixes: list[OnShrink]  # module attributes (in_channels, num_features, ...)
    graph_rewrites: list[OnShrink]  # constants in the graph (reshape sizes, split sections, ...)
    canonical: dict[str, str] = field(default_factory=dict)  # tied parameters -> one name
    hints: dict[str, Any] = field(default_factory=dict)  # whole-graph facts a rule computes once (head axes)
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    axis_index: Any = None  # every tracked axis as one array, built on first use (passes/shrink.py)
    roots: np.ndarray | None = None  # every element's union-find root, cached on first use (passes/shrink.py)

    def count(self, ids: np.ndarray) -> int:
        return int(self.alive[ids].sum())

    def current_shape(self, node: fx.Node) -> Any:
        return _current(self.types.get(node), node.meta.get("shape"), self.count)


def _current(t: NodeType, shape: Any, count: Counter) -> Any:
    if shape is None or not t:
        return shape
    if isinstance(t, tuple):
        return tuple(_current(ti, si, count) for ti, si in zip(t, shape))
    return tuple(count(t[a]) if a in t else s for a, s in enumerate(shape))


class Context:
    """What a rule sees: its node, the node's module, argument types and shapes, and the space."""

    def __init__(self, flow: ChannelFlow, node: fx.Node, module: nn.Module | None = None) -> None:
        self.flow = flow
        self.space = flow.space
        self.node = node
        if module is None and node.op == "call_module":  # run_flow passes it: get_submodule costs 50 us
            module = flow.graph.module.get_submodule(node.target)
        self.module: nn.Module | None = module

    # -- arguments ---------------------------------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        if name == "input" and "self" in self.node.kwargs:  # ATen schemas call the first tensor `self`
            return self.node.kwargs["self"]
        return self.node.kwargs.get(name, default) if name else default

    def type_of(self, value: Any) -> TensorType:
        if not isinstance(value, fx.Node):
            return {}
        t = self.flow.types.get(value)
        if t is None and value.op == "get_attr":
            index = _is_index(value.meta.get("dtype"))  # position ids, relative-position tables: no channels
            t = self.flow.types[value] = {} if index else self.attr_type(value.target, value.meta.get("shape"))
        return t if isinstance(t, dict) else {}

    def shape_of(self, value: Any) -> tuple | None:
        if isinstance(value, fx.Node):
            s = value.meta.get("shape")
            return s if isinstance(s, tuple) and all(isinstance(d, int) for d in s) else None
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        return ()  # python scalar: broadcasts

    @property
    def out_shape(self) -> Any:
        return self.node.meta.get("shape")

    def tensor_args(self) -> list[fx.Node]:
        return [n for n in self.node.all_input_nodes if isinstance(self.shape_of(n), tuple) and self.shape_of(n)]

    # -- parameters --------------------------------------------------------------------------
    def param_name(self, local: str) -> str:
        assert self.node.op == "call_module"
        return f"{self.node.target}.{local}" if self.node.target else local

    def attr_name(self, value: Any) -> str | None:
        return value.target if isinstance(value, fx.Node) and value.op == "get_attr" else None

    def param_axis(self, name: str, axis: int, size: int) -> np.ndarray:
        """The elements along a parameter axis; born fresh on first use (a new space)."""
        axes = self.flow.param_axes.setdefault(self.flow.canonical.get(name, name), {})
        if axis not in axes:
            axes[axis] = self.space.new(size)
        return axes[axis]

    def bind(self, name: str, axis: int, ids: np.ndarray) -> None:
        """Parameter `name` has the channels `ids` along `axis` (unified with any earlier binding)."""
        axes = self.flow.param_axes.setdefault(self.flow.canonical.get(name, name), {})
        if axis in axes:
            self.space.unify(axes[axis], ids)
        else:
            axes[axis] = ids

    def attr_type(self, name: str, shape: tuple | None) -> TensorType:
        """A tensor attribute used directly (class token, layer scale): each axis over 1 is a space."""
        if not shape:
            return {}
        return {a: self.param_axis(name, a, s) for a, s in enumerate(shape) if s > 1}

    # -- coupling ------------------------------------------------------------------------------
    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        self.space.unify(a, b)

    def freeze(self, t: TensorType | np.ndarray, reason: str | None = None) -> None:
        reason = reason or f"unsupported op {describe(self.node)}"
        if isinstance(t, dict):
            self.space.freeze_type(t, reason)
        else:
            self.space.freeze(t, reason)

    def inexact(self, ids: np.ndarray, reason: str) -> None:
        self.space.mark_inexact(ids, reason)

    def on_shrink(self, fn: OnShrink) -> None:
        """After each shrink, fn sets a module attribute from the surviving channels."""
        self.flow.module_fixes.append(fn)

    def rewrite(self, fn: OnShrink) -> None:
        """After each shrink, fn rewrites a constant of this node (the graph is recompiled)."""
        self.flow.graph_rewrites.append(fn)


def _is_index(dtype: Any) -> bool:
    """An integer or boolean tensor attribute holds indices or flags: its axes are positions, not channels.
    Untyped, an axis it shares with channels keeps them fixed wherever it meets them (unify_aligned)."""
    return isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex)


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Set a call's argument, wherever it was given: positionally at `index`, or as keyword `name`."""
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(node.graph.owning_module.get_submodule(node.target)).__name__} ('{node.target}')"
    if node.op == "call_method":
        return f"Tensor.{node.target} ('{node.name}')"
    name = getattr(node.target, "__name__", str(node.target))
    mod = getattr(node.target, "__module__", "") or ""
    return f"{mod + '.' if mod and mod != 'builtins' and mod != '_operator' else ''}{name} ('{node.name}')"


def _all_types(t: NodeType) -> list[TensorType]:
    if isinstance(t, dict):
        return [t]
    if isinstance(t, tuple):
        return [x for ti in t for x in _all_types(ti)]
    return []


def freeze_everything(ctx: Context, reason: str | None = None) -> NodeType:
    """The rule for anything not understood: every channel it touches keeps its size forever."""
    for n in ctx.node.all_input_nodes:
        ctx.freeze(ctx.type_of(n), reason)
        for t in _all_types(ctx.flow.types.get(n)):
            ctx.freeze(t, reason)
    return _untyped(ctx.out_shape)


def _untyped(shape: Any) -> NodeType:
    if isinstance(shape, tuple) and shape and not all(isinstance(s, int) for s in shape):
        return tuple(_untyped(s) for s in shape)
    return {} if shape is not None else None


Rule = Callable[[Context], NodeType]


def run_flow(graph: Graph, rules: Callable[[fx.Node, nn.Module | None], Rule | None]) -> ChannelFlow:
    """Run the rules over every node in order and return the analysis state."""
    named = list(graph.module.named_modules(remove_duplicate=False))
    modules = dict(named)
    flow = ChannelFlow(graph, ChannelSpace(), {}, {}, [], [], _canonical_names(graph.module, named))
    ignored = set(graph.ignored)
    for node in graph.module.graph.nodes:
        ctx = Context(flow, node, modules.get(node.target) if node.op == "call_module" else None)
        if node.op == "placeholder":
            flow.types[node] = _untyped(node.meta.get("shape"))
        elif node.op == "get_attr":
            pass  # typed lazily: a conv binds chosen axes; data use (x * scale) types every axis
        elif node.op == "output":
            for n in node.all_input_nodes:
                for t in _all_types(flow.types.get(n)):
                    ctx.freeze(t, "model output")
        else:
            rule = rules(node, ctx.module)
            if node.op == "call_module" and node.target in ignored:
                flow.types[node] = freeze_everything(ctx, f"ignored by the user ('{node.target}')")
            elif node.op == "call_module" and node.target in graph.leaves and rule is None:
                flow.types[node] = freeze_everything(ctx, f"untraceable submodule '{node.target}'")
            elif rule is None:
                flow.types[node] = freeze_everything(ctx)
            else:
                flow.types[node] = rule(ctx)
    for name, axes in flow.param_axes.items():  # an exported graph has no module nodes to ignore
        if any(name.startswith(prefix + ".") for prefix in ignored):
            for ids in axes.values():
                flow.space.freeze(ids, f"ignored by the user ('{name}')")
    flow.alive = np.ones(len(flow.space), dtype=bool)
    return flow


def _canonical_names(module: nn.Module, named: list[tuple[str, nn.Module]] | None = None) -> dict[str, str]:
    """Every name of a tied (shared) tensor maps to its first name, so it is sliced once. The order of
    named_parameters then named_buffers (remove_duplicate=False), from one walk over the modules."""
    named = list(module.named_modules(remove_duplicate=False)) if named is None else named
    first: dict[int, str] = {}
    out = {}
    for table in ("_parameters", "_buffers"):
        for prefix, m in named:
            for k, t in getattr(m, table).items():
                if t is not None:
                    name = f"{prefix}.{k}" if prefix else k
                    out[name] = first.setdefault(id(t), name)
    return out
