"""What the training loop optimises and reports: image classification or next-token prediction.

Why: the loop (loop.py) is the same for both; only the loss, the example input it traces with, the
checks that model and data fit, and the validation figures differ. A Task holds exactly those, so
the loop never asks which kind of data it runs on.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptgraph.aux_outputs import AUX_WEIGHTS
from ptgraph.errors import UserError
from ptgraph.inputs import token_vocab
from ptgraph.specs import parse_spec

if TYPE_CHECKING:
    from ptgraph.trainers.data import DataSets

DEFAULT_BLOCK = 128  # --block-size for a token model that names no block_size of its own


def logits(out: Any) -> torch.Tensor:
    """The main output of a model that may also return auxiliary heads."""
    return out if isinstance(out, torch.Tensor) else out[0]


class Task:
    """The loss and the validation figures of one kind of data; the loop calls only these."""

    clip_norm: float | None = None  # gradient norm clipped to this before each step (None: no clipping)

    def model_spec(self, spec: str) -> str:
        """The spec to build: classification fills in the data's class count."""
        return spec

    def fit(self, data: "DataSets", model: nn.Module, block_size: int | None) -> tuple["DataSets", tuple[torch.Tensor]]:
        """The data as this model reads it and an example batch of 2 to trace with; UserError where they do not fit."""
        raise NotImplementedError

    def check_output(self, shape: Any) -> None:
        """Raise a UserError when the traced output shape cannot score this data."""

    def loss(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hits(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions counted in samples (a sequence counts its share of correct tokens); a device tensor."""
        raise NotImplementedError

    def eval_sum(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        """The batch's summed validation figure (correct samples, or summed token loss)."""
        raise NotImplementedError

    def count(self, y: torch.Tensor) -> int:
        """How many predictions `eval_sum` summed over."""
        raise NotImplementedError

    def val_metrics(self, total: float, count: int) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, metrics: dict[str, Any]) -> str:
        """The validation figures of an epoch line."""
        raise NotImplementedError

    def progress(self, loss: float, acc: float, per_second: float) -> str:
        """The progress bar's figures from the running train loss, hit share and samples per second."""
        raise NotImplementedError


@dataclasses.dataclass
class Classification(Task):
    num_classes: int
    image_size: int

    def model_spec(self, spec: str) -> str:
        s = parse_spec(spec)
        if s.source in ("torchvision", "ptgraph", "timm") and "num_classes" not in dict(s.kwargs):
            return f"{spec}{'&' if '?' in spec else '?'}num_classes={self.num_classes}"
        return spec

    def fit(self, data: "DataSets", model: nn.Module, block_size: int | None) -> tuple["DataSets", tuple[torch.Tensor]]:
        if block_size is not None:
            raise UserError("--block-size is for token data (--data tokens:...); leave it out for images")
        return data, (torch.randn(2, 3, self.image_size, self.image_size),)

    def check_output(self, shape: Any) -> None:
        if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) and shape[-1] != self.num_classes:
            raise UserError(f"the model has {shape[-1]} outputs but the data has {self.num_classes} classes; "
                            f"build it with num_classes={self.num_classes}")

    def loss(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy; models that return auxiliary logits in training add them with their usual weight."""
        if isinstance(out, torch.Tensor):
            return F.cross_entropy(out, y)
        weight = AUX_WEIGHTS.get(type(out).__name__, 0.3)
        main, *aux = [o for o in out if isinstance(o, torch.Tensor)]
        return F.cross_entropy(main, y) + sum(weight * F.cross_entropy(a, y) for a in aux)

    def hits(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        return (logits(out).argmax(1) == y).sum()

    eval_sum = hits

    def count(self, y: torch.Tensor) -> int:
        return len(y)

    def val_metrics(self, total: float, count: int) -> dict[str, float]:
        return {"val_acc": total / max(count, 1)}

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"val acc {metrics['val_acc']:.2%}"

    def progress(self, loss: float, acc: float, per_second: float) -> str:
        return f"loss {loss:.3f} acc {acc:.1%} {per_second:.0f} img/s"


@dataclasses.dataclass
class NextToken(Task):
    """Next-token cross-entropy on blocks of token ids; validation loss per token and its perplexity."""

    vocab: int  # the data's: largest id + 1
    source: str  # what --data named, for messages
    train_tokens: np.ndarray | None = None
    val_tokens: np.ndarray | None = None
    block: int = 0  # set by fit
    clip_norm: float | None = 1.0  # as nanoGPT: SGD at TOKENS_LR diverged unclipped once the lasso shrank the MLPs

    def fit(self, data: "DataSets", model: nn.Module, block_size: int | None) -> tuple["DataSets", tuple[torch.Tensor]]:
        from ptgraph.trainers.tokens import VAL_BLOCKS, TokenBlocks

        table = token_vocab(model)
        if table is None:
            raise UserError(f"--data {self.source} feeds token ids, but the model has no nn.Embedding to read them; "
                            f"train a language model such as ptgraph:gpt")
        if self.vocab > table:
            raise UserError(f"the data {self.source} holds token ids up to {self.vocab - 1} but the model's embedding has "
                            f"{table} rows; build the model with a vocabulary of at least {self.vocab} "
                            f"(e.g. ptgraph:gpt?vocab_size={self.vocab})")
        model_block = getattr(model, "block_size", None)
        block = block_size or (model_block if isinstance(model_block, int) else DEFAULT_BLOCK)
        if isinstance(model_block, int) and block > model_block:
            raise UserError(f"--block-size {block} is longer than the model's block_size {model_block}; "
                            f"pass --block-size {model_block} or less, or build the model with block_size={block}")
        self.block = block
        train = TokenBlocks(self.train_tokens, block, f"the training tokens of {self.source}")
        val = TokenBlocks(self.val_tokens, block, f"the validation tokens of {self.source}", VAL_BLOCKS)
        return dataclasses.replace(data, train=train, val=val), (train.cut([0, block // 2])[0],)

    def check_output(self, shape: Any) -> None:
        if not (isinstance(shape, tuple) and len(shape) == 3 and isinstance(shape[-1], int)):
            raise UserError(f"a language model must return logits of shape (batch, time, vocab), this one returns "
                            f"{shape}; train a model such as ptgraph:gpt on --data {self.source}")
        if shape[-1] < self.vocab:
            raise UserError(f"the model predicts {shape[-1]} token ids but the data {self.source} holds ids up to "
                            f"{self.vocab - 1}; build it with a vocabulary of at least {self.vocab}")

    def loss(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(out).flatten(0, 1).float(), y.flatten())

    def hits(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        return (logits(out).argmax(-1) == y).sum() / y.size(1)

    def eval_sum(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(out).flatten(0, 1).float(), y.flatten(), reduction="sum")

    def count(self, y: torch.Tensor) -> int:
        return y.numel()

    def val_metrics(self, total: float, count: int) -> dict[str, float]:
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"val loss {metrics['val_loss']:.4f}  val ppl {metrics['val_ppl']:.2f}"

    def progress(self, loss: float, acc: float, per_second: float) -> str:
        return f"loss {loss:.3f} ppl {math.exp(min(loss, 700.0)):.2f} {per_second * self.block / 1e3:.1f}k tok/s"
