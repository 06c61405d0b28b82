"""Data held on the training device: a whole split as one tensor, batches cut and augmented there.

Why: a CIFAR ResNet step on a GPU takes a few milliseconds, less than a loader process needs to
decode and augment 128 JPEGs, so a loader-fed run measures the loader, not the model (and not what
pruning saves). Decoded once, CIFAR-10 is 150 MB of uint8; the standard augmentation (pad-4 random
crop, horizontal flip) and the normalisation are then a handful of batched kernels per step.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ptgraph.trainers.data import CIFAR_MEAN, CIFAR_STD, JpegNpz

PAD = 4  # the CIFAR random crop's padding


@dataclass(frozen=True)
class ImageTensors:
    """One split in memory: images (uint8 NCHW to be normalised, or float ready to use) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    augment: bool  # pad-4 random crop + horizontal flip
    mean: tuple[float, ...] | None = None  # normalisation of uint8 images (after /255)
    std: tuple[float, ...] | None = None

    def to(self, device: torch.device) -> "ImageTensors":
        return ImageTensors(self.images.to(device), self.labels.to(device), self.augment, self.mean, self.std)


def _decode(jpegs: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(jpegs[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
              for i in range(len(offsets) - 1)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def image_tensors(dataset: Dataset, train: bool) -> ImageTensors | None:
    """The split as tensors, or None for data sets too large or too varied to hold (ImageNet folders)."""
    if isinstance(dataset, TensorDataset):  # synthetic: float images, no augmentation in either path
        images, labels = dataset.tensors
        return ImageTensors(images, labels.long(), augment=False)
    if isinstance(dataset, JpegNpz):
        return ImageTensors(_decode(dataset.jpeg, dataset.offsets), torch.from_numpy(dataset.labels).long(), train,
                            CIFAR_MEAN, CIFAR_STD)
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if isinstance(data, np.ndarray) and data.ndim == 4 and data.dtype == np.uint8 and targets is not None:
        images = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()  # torchvision CIFAR: NHWC uint8
        return ImageTensors(images, torch.as_tensor(targets).long(), train, CIFAR_MEAN, CIFAR_STD)
    return None


class DeviceBatches:
    """The batches of one epoch over `indices` (this rank's share, in order), made on the split's device.

    Crop offsets and flips for the whole epoch come from one CPU generator seeded by `seed`, so an
    epoch's batches are the same on any device and after a resume.
    """

    def __init__(self, split: ImageTensors, indices: Sequence[int], batch: int, drop_last: bool, seed: int,
                 channels_last: bool = False) -> None:
        self.split, self.batch, self.drop_last, self.channels_last = split, batch, drop_last, channels_last
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        n = len(self.indices)
        self.offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=gen)
        self.flips = torch.rand(n, generator=gen) < 0.5

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch if self.drop_last else -(-n // self.batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.split.images.device
        indices, offsets, flips = (t.to(device) for t in (self.indices, self.offsets, self.flips))
        mean = std = None
        if self.split.mean is not None:
            mean = torch.tensor(self.split.mean, device=device).view(1, -1, 1, 1) * 255
            std = torch.tensor(self.split.std, device=device).view(1, -1, 1, 1) * 255
        for k in range(len(self)):
            part = slice(k * self.batch, (k + 1) * self.batch)
            idx = indices[part]
            x = self.split.images[idx]
            if self.split.augment:
                x = _crop_flip(x, offsets[part], flips[part])
            x = x.float()
            if mean is not None:
                x = (x - mean) / std
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.split.labels[idx]


def _crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per-sample random crop of the zero-padded images, then per-sample horizontal flip, in two gathers."""
    b, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (b, h)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (b, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
