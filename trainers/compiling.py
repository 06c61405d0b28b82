"""torch.compile for a model whose shapes change while it trains (the CLI loop and integrations.ddp.Runner).

Dynamo guards each compiled frame on its tensors' shapes. A shrink fails those guards, so the next call compiles
the same frame again, and past `torch._dynamo.config.recompile_limit` (8) compiles of one code object dynamo
stops compiling it and runs it eagerly, reporting that only as a log line. So every compile after the first
resets dynamo first (`torch._dynamo.reset()`): the old shapes' graphs go, each shrink is a fresh compile and
never counts towards the limit. What else recompiles a frame (eval mode, a last smaller batch) can still reach
it; `eager_note()` turns that into one sentence for the caller to show, from dynamo's own counters.

Cost (docs/USER_GUIDE.md): on a CPU each reconfiguration is a full inductor compile of the training graph.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def eager_fallbacks() -> int:
    """How often this process's dynamo gave up compiling a frame for a recompile limit (the frame then runs
    eagerly): its `unimplemented` counters, which `torch._dynamo.reset()` does not clear."""
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())


class Compiler:
    """Compiles a module anew after each shrink; `options` are torch.compile's keyword arguments."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self.compiles = 0
        self._eager_seen = eager_fallbacks()

    def __call__(self, module: nn.Module) -> nn.Module:
        """torch.compile(module); from the second call on after a dynamo reset (other compiled functions of the
        process recompile at their next call)."""
        if self.compiles:
            torch._dynamo.reset()
        self.compiles += 1
        return torch.compile(module, **self.options)

    def eager_note(self) -> str | None:
        """One sentence if dynamo ran a frame eagerly for its recompile limit since the last note, else None."""
        now = eager_fallbacks()
        if now == self._eager_seen:
            return None
        self._eager_seen = now
        limit = torch._dynamo.config.recompile_limit
        return (f"torch.compile runs part of the model eagerly: one of its functions reached dynamo's recompile limit "
                f"(torch._dynamo.config.recompile_limit = {limit}) and is no longer compiled (TORCH_LOGS=recompiles "
                f"says why); raise that limit, or train without compiling")
