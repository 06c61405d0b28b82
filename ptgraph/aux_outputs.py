"""Models whose training forward also returns auxiliary classifier logits (GoogLeNet, Inception v3).

ptgraph traces models in training mode, so their graph keeps the auxiliary heads and returns the
namedtuple. In eval mode the original classes return the main logits alone; `without_aux_heads`
gives the graph that does the same (for export), and `AUX_WEIGHTS` the usual weights of the
auxiliary losses (for training).
"""
from __future__ import annotations

import copy

from torch import fx, nn

AUX_WEIGHTS = {"GoogLeNetOutputs": 0.3, "InceptionOutputs": 0.4}


def _aux_tuple(gm: fx.GraphModule) -> fx.Node | None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, fx.Node) and value.op == "call_function" \
            and getattr(value.target, "__name__", None) in AUX_WEIGHTS:
        return value
    return None


def without_aux_heads(module: nn.Module) -> nn.Module:
    """The module as its class runs in eval mode: the main logits only, the auxiliary heads dropped.
    Returns `module` itself when it has no auxiliary outputs; otherwise a new GraphModule sharing its weights."""
    if not isinstance(module, fx.GraphModule) or _aux_tuple(module) is None:
        return module
    graph = copy.deepcopy(module.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    aux = output.args[0]
    main = aux.args[0] if aux.args else next(iter(aux.kwargs.values()))
    output.args = (main,)
    pruned = fx.GraphModule(module, graph, class_name=type(module).__name__)
    pruned.graph.eliminate_dead_code()
    pruned.delete_all_unused_submodules()
    pruned.recompile()
    pruned.train(module.training)
    return pruned
