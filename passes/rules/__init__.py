"""The op-rule table: one op family per file; supporting a new op is one registered rule.

Keys: a function (torch.cat, F.conv2d, operator.add), a Tensor method name ("view"), or an
nn.Module class (nn.Conv2d). A module subclass uses its parent's rule only if it keeps the
parent's forward. Nodes with no rule freeze every channel they touch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ptgraph.passes.flow import Rule

RULES: dict[Any, Rule] = {}


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return register


def lookup(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        assert module is not None
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
