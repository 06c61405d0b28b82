"""The op-rule table: one op family per file; supporting a new op is one registered rule.

Keys: a function (torch.cat, F.conv2d, operator.add), an ATen overload (aten.linear.default, in
graphs captured by torch.export; `aten("linear.default")`), a Tensor method name ("view"), or an
nn.Module class (nn.Conv2d). A module subclass uses its parent's rule only if it keeps the
parent's forward. Nodes with no rule freeze every channel they touch.

`leaf_rule("pkg.mod.Class")` registers a rule for a module class of an optional library (timm)
by its qualified name, without importing it, and makes the tracer keep instances of exactly
that class as single nodes: for modules whose traced body would be wrong or opaque, such as a
forward that reads `self.training` (traced, the mode would be baked into the graph: stochastic
depth that stays on in eval, a BatchNorm that keeps using batch statistics) or one that
transforms its own weight before use (weight standardisation).
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ptgraph.passes.flow import Rule

RULES: dict[Any, Rule] = {}
LEAF_CLASSES: set[str] = set()  # qualified class names the tracer keeps as single nodes
OPAQUE_MODULES: set[type] = set()  # classes whose rule freezes what torch.export would see inside


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return register


def aten(*names: str) -> list[Any]:
    """ATen overloads by name ("linear.default"), for a family file to register beside its torch-level
    targets (the graph torch.export captures calls these); names this torch does not have are skipped."""
    import torch

    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


def leaf_rule(*qualnames: str) -> Callable[[Rule], Rule]:
    """A rule for module classes named by qualified name; the tracer keeps them as single nodes."""
    def register(fn: Rule) -> Rule:
        for q in qualnames:
            RULES[q] = fn
            LEAF_CLASSES.add(q)
        return fn

    return register


def lookup(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        assert module is not None
        by_name = RULES.get(qualname(type(module)))  # exact class only: a subclass may change forward
        if by_name is not None:
            return by_name
        for cls in type(module).__mro__:
            if cls in RULES and type(module).forward is cls.forward:
                return RULES[cls]
        return None
    if node.op in ("call_function", "call_method"):
        try:
            return RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


# importing the families fills the table
from ptgraph.passes.rules import (  # noqa: E402,F401
    attention,
    conv,
    elementwise,
    linear,
    norm,
    reduce,
    shape,
    slicing,
)
