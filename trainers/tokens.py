"""Token data for language models: nanoGPT's flat uint16 files, or a generated source with structure to learn.

`--data tokens:PATH` reads PATH/train.bin and PATH/val.bin (token ids as little-endian uint16,
one after the other, as nanoGPT's prepare.py scripts write them) through np.memmap, so a file
larger than memory costs nothing until its blocks are read. Training takes random blocks of
`block` tokens (the targets are the same block shifted by one); validation takes fixed
consecutive blocks of val.bin, so every evaluation scores the same tokens.
`--data tokens:synthetic` generates a seeded Markov source over 256 ids instead (see
`synthetic_tokens`), for the demo and tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ptgraph.errors import UserError

VAL_BLOCKS = 1024  # validation scores at most this many consecutive blocks of val.bin (the first ones)
SYNTHETIC_VOCAB = 256


def read_tokens(path: Path) -> np.ndarray:
    """A token file as a read-only uint16 memmap, or one clear error."""
    if not path.is_file():
        raise UserError(f"token file {path} does not exist; --data tokens:PATH needs PATH/train.bin and PATH/val.bin "
                        f"(flat uint16 token ids, as nanoGPT's prepare.py writes them)")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty; write the token ids into it with np.array(ids, dtype=np.uint16).tofile(...)")
    if size % 2:
        raise UserError(f"{path} holds an odd number of bytes ({size}), so not uint16 token ids; write it with "
                        f"np.array(ids, dtype=np.uint16).tofile('{path.name}')")
    return np.memmap(path, dtype=np.uint16, mode="r")


def max_token(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id in a token array, read in chunks (a memmap is never loaded whole)."""
    return max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))


def synthetic_tokens(n_train: int = 131_072, n_val: int = 16_384, vocab: int = SYNTHETIC_VOCAB, successors: int = 4,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sparse Markov source: each id has `successors` possible next ids with random weights, and half the
    time the choice among them is fixed by the id two steps back. Why: the unigram perplexity is about
    `vocab`, the bigram one about `successors`, and only a model that attends to the earlier token gets
    below that (about 3 for 4 successors), so a tiny GPT's validation perplexity falls visibly within a few
    hundred CPU steps and keeps a reason to use attention."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, vocab, (vocab, successors)).tolist()
    cum = np.cumsum(rng.dirichlet(np.ones(successors), vocab), axis=1).tolist()
    n = n_train + n_val
    follow, draw = (rng.random(n) < 0.5).tolist(), rng.random(n).tolist()
    out, a, b = [0] * n, 0, 1
    for i in range(n):
        if follow[i]:
            c = a % successors
        else:
            c = next((j for j, w in enumerate(cum[b]) if draw[i] < w), successors - 1)
        a, b = b, nxt[b][c]
        out[i] = b
    tokens = np.asarray(out, dtype=np.uint16)
    return tokens[:n_train], tokens[n_train:]


class TokenBlocks(Dataset):
    """Blocks of `block` tokens from one array; item i is the i-th consecutive block and its shifted targets.

    Its length (blocks that fit, capped by `max_blocks`) is what an epoch means: the training batches
    (`batches(..., shuffle=True)`) draw that many random blocks, the validation batches take them in order.
    """

    def __init__(self, tokens: np.ndarray, block: int, name: str, max_blocks: int | None = None) -> None:
        if len(tokens) < block + 1:
            raise UserError(f"{name} holds {len(tokens)} tokens, too few for one block of {block} and its next-token "
                            f"targets; use a longer file or a smaller --block-size")
        self.tokens, self.block, self.name = tokens, block, name
        self.n_blocks = (len(tokens) - 1) // block
        if max_blocks is not None:
            self.n_blocks = min(self.n_blocks, max_blocks)

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.cut([i * self.block])
        return x[0], y[0]

    def cut(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, batch x block) of the blocks starting at `starts`."""
        rows = np.stack([np.asarray(self.tokens[s:s + self.block + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def batches(self, batch: int, rank: int, world: int, shuffle: bool, seed: int) -> "TokenBatches":
        """One epoch's batches for this rank: random blocks (shuffle) or the consecutive ones; the loop calls this
        instead of building a DataLoader."""
        return TokenBatches(self, batch, rank, world, shuffle, seed)


class TokenBatches:
    """One epoch's batches for rank `rank` of `world`.

    Training: every step draws world x batch random block starts from a generator seeded by `seed` and
    this rank takes every world-th, so any number of processes sees the same global batches (as
    ShardSampler does for images) and a resumed epoch draws the same blocks. Validation: consecutive
    blocks rank, rank + world, ..., in batches.
    """

    def __init__(self, blocks: TokenBlocks, batch: int, rank: int, world: int, shuffle: bool, seed: int) -> None:
        self.blocks, self.batch, self.rank, self.world, self.shuffle, self.seed = blocks, batch, rank, world, shuffle, seed
        self.mine = list(range(rank, len(blocks), world))

    def __len__(self) -> int:
        return len(self.blocks) // self.world // self.batch if self.shuffle else -(-len(self.mine) // self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.blocks
        if not self.shuffle:
            for i in range(0, len(self.mine), self.batch):
                yield b.cut([j * b.block for j in self.mine[i:i + self.batch]])
            return
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(len(self)):
            starts = torch.randint(0, len(b.tokens) - b.block, (self.world * self.batch,), generator=gen)
            yield b.cut(starts[self.rank::self.world].tolist())
