"""Example inputs for tracing, verifying and exporting: float images, or integer token ids.

Why a module: an embedding-first model cannot run on `torch.randn` (its indices must be integers
below the vocabulary size), and the CLI, the ONNX check and checkpoint rebuilds all need the same
random inputs of the right kind.
"""
from __future__ import annotations

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
