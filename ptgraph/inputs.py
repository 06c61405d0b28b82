"""Example inputs for tracing, verifying and exporting: float images, or integer token ids.

Why a module: an embedding-first model cannot run on `torch.randn` (its indices must be integers
below the vocabulary size), and the CLI, the ONNX check and checkpoint rebuilds all need the same
random inputs of the right kind.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ptgraph.errors import UserError

INPUT_DTYPES = {"float": torch.float32, "long": torch.long}


def token_vocab(model: nn.Module) -> int | None:
    """num_embeddings of the model's first nn.Embedding (the token table of an embedding-first model), or None.
    A graph captured by torch.export has no Embedding modules: its first aten.embedding's table counts."""
    found = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if found is None and isinstance(model, torch.fx.GraphModule):
        node = next((n for n in model.graph.nodes if n.op == "call_function"
                     and n.target is torch.ops.aten.embedding.default and n.args[0].op == "get_attr"), None)
        found = model.get_parameter(node.args[0].target).shape[0] if node is not None else None
    return found


def _token_ids(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    vocab = token_vocab(model)
    if vocab is None:
        raise UserError(f"--input-dtype long draws token ids below the vocabulary size of the model's first "
                        f"nn.Embedding, but {type(model).__name__} has none; use --input-dtype float")
    return torch.randint(0, vocab, shape, generator=generator)


def make_inputs(model: nn.Module, shape: tuple[int, ...], dtype: str = "float",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor]:
    """One random input of `shape`: standard normal floats, or (dtype 'long') token ids in [0, vocab)."""
    if dtype not in INPUT_DTYPES:
        raise UserError(f"input dtype '{dtype}' is not one of {', '.join(INPUT_DTYPES)}; use float or long")
    if dtype == "long":
        return (_token_ids(model, tuple(shape), generator),)
    return (torch.randn(tuple(shape), generator=generator),)


def like(model: nn.Module, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """A fresh random tensor of x's kind (floats, or token ids of the model's vocabulary), optionally another batch."""
    shape = (batch, *x.shape[1:]) if batch else tuple(x.shape)
    if x.is_floating_point():
        return torch.randn(shape, dtype=x.dtype)
    return _token_ids(model, shape, None).to(x.dtype)


def dtype_name(x: torch.Tensor) -> str:
    """'long' for integer tensors, 'float' otherwise: how checkpoints record the traced input."""
    return "float" if x.is_floating_point() else "long"


def check_input_count(model: nn.Module, given: int) -> None:
    """Refuse, in one sentence, a number of example inputs the model's forward cannot take (RAFT reads two
    images), before a trace fails on it with a message about something else."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no Python signature to read
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    if len(required) <= given <= len(positional):
        return
    shapes = "1 input shape was" if given == 1 else f"{given} input shapes were"
    named = required if given < len(required) else [p.name for p in positional]
    count = len(required) if given < len(required) else len(positional)
    takes = f"{'needs' if given < len(required) else 'takes at most'} {count} input{'s' if count != 1 else ''}"
    raise UserError(f"{type(model).__name__}.forward {takes} ({', '.join(named)}) but {shapes} given; "
                    f"pass --input-shape once for each input")
