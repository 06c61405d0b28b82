"""The IR: a torch.fx GraphModule with shapes on its nodes, traced in the mode the model trains in."""
from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx import traceback as fx_traceback

from ptgraph.decompose import mha_call, mha_forward, mha_function_call, mha_function_forward
from ptgraph.errors import UserError
from ptgraph.shapes import propagate_shapes


# Library modules whose forward reads self.training: traced through, the mode would be baked
# into the graph (stochastic depth would stay on in eval), so they stay single nodes.
_MODE_DEPENDENT = ("torchvision.ops.stochastic_depth.StochasticDepth",)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _leaf_classes() -> set[str]:
    """Classes the rule table understands as a whole (passes/rules: leaf_rule); imported late (cycle)."""
    from ptgraph.passes.rules import LEAF_CLASSES

    return LEAF_CLASSES


_PLAIN = {int, float, bool, str, type(None)}


class _FallbackTracer(fx.Tracer):
    """Traces through every module it can; a submodule whose forward cannot be traced becomes a leaf.

    The nodes the failed attempt added are rolled back, so the graph holds one call_module node
    for that submodule, and the analysis freezes the channels at its boundary.
    """

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.fallbacks: dict[str, str] = {}
        self.opened: list[str] = []  # modules traced through a decomposition (ptgraph/decompose.py)
        self.maybe_dead: list[fx.Node] = []  # their outputs nobody may read (attention weights)
        self._leaf_by_type: dict[type, bool] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or qualname in self.fallbacks:
            return True
        leaf = self._leaf_by_type.get(type(m))  # the rest depends on the class only: asked twice per call
        if leaf is None:
            leaf = self._leaf_by_type[type(m)] = self._leaf_type(m, qualname)
        return leaf

    def _leaf_type(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if _qualname(type(m)) in _MODE_DEPENDENT or _qualname(type(m)) in _leaf_classes():
            return True
        return super().is_leaf_module(m, qualname)

    # Speed only (a quarter of the trace): the two methods below return exactly what fx's would.
    def create_arg(self, a: Any) -> Any:
        """Proxies, plain constants and plain tuples/lists of them skip fx's chain of isinstance checks
        (parameter, buffer, module, named tuple, constant tensor, opaque type), which none of them is."""
        t = type(a)
        if t is fx.Proxy:
            return a.node
        if t in _PLAIN:
            return a
        if t is tuple:
            return tuple([self.create_arg(x) for x in a])
        if t is list:
            return [self.create_arg(x) for x in a]
        if t is dict and not a:
            return {}
        return super().create_arg(a)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        """fx records the module stack with copy.copy (the slow generic path); OrderedDict.copy gives the same."""
        stack = self.module_stack
        if not stack or fx_traceback.has_preserved_node_meta():
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        self.module_stack = collections.OrderedDict()  # seen empty: fx records nothing
        try:
            node = super().create_node(kind, target, args, kwargs, name, type_expr)
        finally:
            self.module_stack = stack
        node.meta["nn_module_stack"] = stack.copy()
        return node

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **more: Any) -> Any:
        """F.multi_head_attention_forward called on proxies is traced as its decomposition (ptgraph/decompose.py)
        where it can be; a call it cannot follow stays one node (no rule: its channels freeze)."""
        if kind == "call_function" and target is F.multi_head_attention_forward:
            call = mha_function_call(args, kwargs, self._parameter_of)
            if call is not None:
                last, stack_depth = self.graph._root.prev, len(self.module_stack)
                try:
                    out, weights = mha_function_forward(call)
                except Exception:  # noqa: BLE001 - the call stays one node
                    self._roll_back(last, stack_depth)
                else:
                    self.opened.append(next(reversed(self.module_stack), "") if self.module_stack else "")
                    if isinstance(weights, fx.Proxy):
                        self.maybe_dead.append(weights.node)
                    return out, weights
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def _parameter_of(self, value: Any) -> torch.Tensor | None:
        """The tensor a get_attr proxy reads, or None."""
        if not isinstance(value, fx.Proxy) or value.node.op != "get_attr":
            return None
        *path, name = str(value.node.target).split(".")
        m: Any = self.root
        for part in path:  # the module dicts: nn.Module.__getattr__ hands out proxies while fx traces
            m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if not isinstance(m, nn.Module):
            return None
        obj = m._parameters.get(name, m._buffers.get(name))
        return obj if isinstance(obj, torch.Tensor) else None

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        asked_leaf = qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types))
        call = mha_call(m, args, kwargs) if qualname and not asked_leaf else None
        if call is not None:
            last, stack_depth = self.graph._root.prev, len(self.module_stack)
            try:
                out, weights = mha_forward(m, call)
            except Exception:  # noqa: BLE001 - a call the decomposition cannot follow: the module stays whole
                self._roll_back(last, stack_depth)
            else:
                self.opened.append(qualname)
                if isinstance(weights, fx.Proxy):
                    self.maybe_dead.append(weights.node)
                return out, weights
        if qualname == "" or self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the newest node before this call
        stack_depth = len(self.module_stack)

        def guarded(*a: Any, **k: Any) -> Any:
            try:
                return forward(*a, **k)
            except Exception as e:  # noqa: BLE001 - any failure in a submodule means: make it a leaf
                self._roll_back(last, stack_depth + 1)
                self.fallbacks[qualname] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return self.create_proxy("call_module", qualname, a, k)

        return super().call_module(m, guarded, args, kwargs)

    def _roll_back(self, last: fx.Node, stack_depth: int) -> None:
        """Erase the nodes added after `last` and the module-stack entries over `stack_depth`."""
        for n in reversed(_nodes_after(self.graph, last)):
            self.graph.erase_node(n)
        while len(self.module_stack) > stack_depth:
            self.module_stack.popitem(last=True)


_DROPOUT_MODULES = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                    F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                    F.feature_alpha_dropout: nn.FeatureAlphaDropout}


def _unbake_dropout(gm: fx.GraphModule) -> int:
    """`F.dropout(x, p, training=self.training)` traces to a literal True: dropout that stays on in
    eval. Each such call becomes an nn.Dropout submodule of the graph module, which follows
    .train()/.eval() like the code it came from. Returns how many were replaced."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUT_MODULES:
            continue
        args = dict(zip(("input", "p", "training", "inplace"), node.args), **node.kwargs)
        p, training = args.get("p", 0.5), args.get("training")
        if training is not True or not isinstance(p, (int, float)) or isinstance(p, bool):
            continue  # no `training` given: the caller wants dropout in both modes
        name = f"_ptgraph_dropout{n}"
        while hasattr(gm, name):
            n += 1
            name = f"_ptgraph_dropout{n}"
        gm.add_submodule(name, _DROPOUT_MODULES[node.target](p).train(gm.training))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (args["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n += 1
    if n:
        gm.recompile()
    return n


def _nodes_after(graph: fx.Graph, last: fx.Node) -> list[fx.Node]:
    out, n = [], last.next
    while n is not graph._root:
        out.append(n)
        n = n.next
    return out


@dataclass
class Graph:
    """A traced model: `module` is the fx GraphModule (the model to train and export from now on).

    Its submodules (fx capture) or its parameters (export capture) are the user's own objects, so
    shrinking them shows in the original model too. `leaves` names the submodules that could not be
    traced (and why); `ignored` the ones the user asked to leave alone.
    """

    module: fx.GraphModule
    example_inputs: tuple
    leaves: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    capture: str = "fx"  # "fx": symbolic trace of the user's modules; "export": torch.export's ATen graph
    opened: tuple[str, ...] = ()  # fx: modules traced through a decomposition; the user's copies keep old sizes
    choice: str = ""  # why auto capture kept this path, where it compared both

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.module.graph.nodes)

    def to_networkx(self) -> nx.DiGraph:
        """A networkx view (node name -> op, target, shape), for analyses and drawing."""
        g = nx.DiGraph()
        for n in self.module.graph.nodes:
            g.add_node(n.name, op=n.op, target=str(n.target), shape=n.meta.get("shape"))
            for user in n.users:
                g.add_edge(n.name, user.name)
        return g


def trace(
    model: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[str | type] = (),
    ignore: Iterable[str] = (),
    capture: str = "auto",
) -> Graph:
    """Capture `model` as a graph in its current mode (train or eval) and record every node's shape.

    `capture`: "fx" traces symbolically (the user's modules stay the graph's submodules);
    "export" captures with torch.export (ATen ops over the model's parameters: for forwards with
    Python control flow fx cannot follow, such as Hugging Face transformers); "auto" (default)
    uses fx when it sees the whole model and torch.export when fx would have to keep some
    submodules as frozen leaves (untraceable ones, nn.MultiheadAttention) or cannot trace the top
    level at all; and where ops with no rule freeze channels of the fx graph, it captures with
    torch.export too and keeps the graph with more parameters in prunable groups (`Graph.choice`).
    `leaf_modules`: module names or types to keep as single nodes (fx only). `ignore`: module
    names whose channels must never be pruned.
    """
    if capture not in ("auto", "fx", "export"):
        raise UserError(f"capture '{capture}' is not one of auto, fx, export; pass capture='auto' to let ptgraph choose")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    leaf_modules = tuple(leaf_modules)
    names = {m for m in leaf_modules if isinstance(m, str)}
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    ignore = tuple(ignore)
    known = dict(model.named_modules())
    for name in (*names, *ignore):
        if name not in known:
            raise UserError(f"module '{name}' is not in the model; use a name from model.named_modules() (for example '{next(iter(k for k in known if k), '')}')")
    if capture == "export":
        return _with_shapes(_exported(model, example_inputs), example_inputs, {}, ignore, "export")
    try:
        gm, fallbacks, opened = _fx_capture(model, names, types, ignore)
    except _Untraceable as e:
        if capture == "fx":
            raise UserError(f"torch.fx cannot trace the top level of {type(model).__name__} ({e}); {_FIX}") from e
        try:
            exported = _exported(model, example_inputs)
        except UserError as export_error:
            why = getattr(export_error, "reason", str(export_error))
            raise UserError(f"neither torch.fx nor torch.export can trace the top level of {type(model).__name__} "
                            f"(fx: {_sentence(str(e))}; torch.export: {_sentence(why)}); {_FIX}") from export_error
        return _with_shapes(exported, example_inputs, {}, ignore, "export")
    if capture == "auto" and not leaf_modules and (fallbacks or _has_opaque_modules(gm)):
        try:
            return _with_shapes(_exported(model, example_inputs), example_inputs, {}, ignore, "export")
        except UserError:
            pass  # keep the symbolic trace with its leaves
    for name, reason in fallbacks.items():
        warnings.warn(f"ptgraph: traced '{name}' as a leaf, its channels are frozen ({reason})", stacklevel=2)
    graph = _with_shapes(gm, example_inputs, fallbacks, ignore, "fx", opened)
    if capture == "auto" and not leaf_modules and not fallbacks:
        return _more_prunable(graph, model, example_inputs, ignore)
    return graph


def _more_prunable(graph: Graph, model: nn.Module, example_inputs: tuple, ignore: tuple[str, ...]) -> Graph:
    """Where ops with no rule froze channels of the fx graph, capture with torch.export too (it decomposes
    many such calls into ops the rules know) and keep the graph whose prunable groups hold more parameters;
    fx on a tie or when export fails. `Graph.choice` says what was compared."""
    from ptgraph.passes import analyze_channels

    fx_analysis = analyze_channels(graph)
    blocked = sorted({r.split(" ('")[0][len("unsupported op "):] for r in fx_analysis.flow.space.reasons
                      if r.startswith("unsupported op ")})
    if not blocked:
        return graph
    ops = ", ".join(blocked[:3]) + (f" and {len(blocked) - 3} more" if len(blocked) > 3 else "")
    try:
        exported = _with_shapes(_exported(model, example_inputs), example_inputs, {}, ignore, "export")
    except UserError as e:
        graph.choice = f"fx (ops without a rule: {ops}; torch.export failed: {_sentence(getattr(e, 'reason', str(e)))})"
        return graph
    fx_params, export_params = fx_analysis.prunable_params(), analyze_channels(exported).prunable_params()
    kept, other = (exported, graph) if export_params > fx_params else (graph, exported)
    kept.choice = (f"{kept.capture} (ops without a rule in the fx graph: {ops}; prunable parameters: fx "
                   f"{fx_params:,}, torch.export {export_params:,})")
    return kept


try:  # generates its Python code on first use: a third of a small model's capture time otherwise
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - older torch
    _GraphModule = fx.GraphModule

_FIX = "make its forward free of data-dependent Python control flow, or wrap that part in a submodule"


class _Untraceable(Exception):
    """fx could not trace the top level (the message is the first line of why)."""


def _has_opaque_modules(gm: fx.GraphModule) -> bool:
    """A module the rules can only freeze whole (nn.MultiheadAttention) that torch.export would open up."""
    from ptgraph.passes.rules import OPAQUE_MODULES

    opaque = tuple(OPAQUE_MODULES)
    return bool(opaque) and any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), opaque)
                                for n in gm.graph.nodes)


def _fx_capture(model: nn.Module, names: set[str], types: tuple[type, ...],
                ignore: tuple[str, ...]) -> tuple[fx.GraphModule, dict[str, str], tuple[str, ...]]:
    tracer = _FallbackTracer(names | set(ignore), types)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001
        raise _Untraceable(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    for node in tracer.maybe_dead:
        if not node.users:
            graph.erase_node(node)
    gm = _GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    _unbake_dropout(gm)
    return gm, dict(tracer.fallbacks), tuple(tracer.opened)


def _exported(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    from ptgraph.export_capture import export_module

    try:
        return export_module(model, example_inputs)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        error = UserError(f"torch.export cannot capture {type(model).__name__} ({first}); {_FIX}")
        error.reason = first  # what trace names when fx failed first
        raise error from e


def _sentence(text: str, limit: int = 160) -> str:
    """The first sentence of an error message, cut to `limit` characters: two reasons must fit one line."""
    first = text.strip().split(". ", 1)[0]
    return first if len(first) <= limit else first[:limit - 3] + "..."


def _with_shapes(gm: fx.GraphModule, example_inputs: tuple, leaves: dict[str, str], ignore: tuple[str, ...],
                 capture: str, opened: tuple[str, ...] = ()) -> Graph:
    try:
        propagate_shapes(gm, example_inputs)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs if isinstance(x, torch.Tensor))
        raise UserError(
            f"the model does not run on inputs of shape {shapes} ({first}); pass the input shape it expects with --input-shape"
        ) from e
    return Graph(gm, example_inputs, leaves, ignore, capture, opened)
