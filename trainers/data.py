"""Data sets for `--data SPEC`: synthetic, cifar10/cifar100 folders, the CIFAR-10 JPEG npz, ImageNet folders,
token files (tokens:PATH, tokens:synthetic).

Each spec gives train and validation sets with the standard augmentations (random crop + flip
for CIFAR; random-resized-crop + flip for ImageNet), the number of classes, the image size,
the paper's default schedule family ("cifar", "imagenet" or "tokens") and the task (what the
loss and the validation figures are; trainers/task.py).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ptgraph.errors import UserError
from ptgraph.trainers.task import Classification, NextToken, Task

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataSets:
    train: Dataset
    val: Dataset
    num_classes: int
    image_size: int
    family: str  # "cifar" (and synthetic), "imagenet" or "tokens": picks the default schedule
    task: Task = field(default=None)  # type: ignore[assignment]  # classification unless the spec says otherwise

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = Classification(self.num_classes, self.image_size)


def _transforms(family: str, size: int, train: bool):
    from torchvision import transforms as T

    if family == "imagenet":
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    if train:
        return T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.ToTensor(), norm])


def synthetic(n_train: int = 2560, n_val: int = 512, num_classes: int = 10, size: int = 32, seed: int = 0,
              easy: bool = False) -> DataSets:
    """Learnable images: each class is a fixed smooth pattern (a shared base plus a class-specific part),
    each sample that pattern randomly shifted and scaled, plus noise. Not separable at a glance, so
    accuracy climbs over the first epochs; a small CNN gets well above chance in a few hundred steps.
    `easy` (more class signal, less noise) is learnt within tens of steps, for quick tests."""
    gen = torch.Generator().manual_seed(seed)
    signal, noise = (1.0, 0.5) if easy else (0.35, 1.5)
    coarse = torch.randn(1, 3, 8, 8, generator=gen) + signal * torch.randn(num_classes, 3, 8, 8, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=size + 8, mode="bilinear", align_corners=False)

    def make(n: int) -> TensorDataset:
        labels = torch.randint(num_classes, (n,), generator=gen)
        dx, dy = torch.randint(0, 9, (2, n), generator=gen)
        crops = torch.stack([patterns[c, :, y:y + size, x:x + size] for c, x, y in zip(labels.tolist(), dx.tolist(), dy.tolist())])
        scale = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
        images = crops * scale + noise * torch.randn(n, 3, size, size, generator=gen)
        return TensorDataset(images, labels)

    return DataSets(make(n_train), make(n_val), num_classes, size, "cifar")


class JpegNpz(Dataset):
    """The CIFAR-10 JPEG-bytes npz (see ../shared/data/README.md), decoded on access."""

    def __init__(self, path: str, split: str, transform) -> None:
        data = np.load(path)
        try:
            self.jpeg = data[f"{split}_jpeg"]
            self.offsets = data[f"{split}_offsets"]
            self.labels = data[f"{split}_labels"].astype(np.int64)
        except KeyError as e:
            raise UserError(f"{path} is not a CIFAR JPEG npz (missing {e}); pass the cifar10-jpeg.npz file") from None
        self.classes = [str(c) for c in data["classes"]] if "classes" in data else list(range(10))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        raw = self.jpeg[self.offsets[i]:self.offsets[i + 1]].tobytes()
        image = Image.open(io.BytesIO(raw)).convert("RGB")
        return self.transform(image), int(self.labels[i])


def _need(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"data path '{path}' does not exist; pass {what}")


def load_data(spec: str, download: bool = False, image_size: int | None = None) -> DataSets:
    """Parse `--data` and build the data sets."""
    kind, _, path = spec.partition(":")
    if kind == "tokens":
        return load_tokens(spec, path)
    if kind == "synthetic":
        if path not in ("", "easy"):
            raise UserError(f"unknown --data '{spec}'; use synthetic or synthetic:easy")
        return synthetic(size=image_size or 32, easy=path == "easy")
    if kind in ("cifar10", "cifar100"):
        from torchvision import datasets

        cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
        if not path:
            raise UserError(f"--data {kind} needs a folder: --data {kind}:PATH (add --download to fetch it)")
        if not download:
            _need(path, f"the folder that holds {kind} (or add --download)")
        try:
            train = cls(path, train=True, download=download, transform=_transforms("cifar", 32, True))
            val = cls(path, train=False, download=download, transform=_transforms("cifar", 32, False))
        except RuntimeError as e:
            raise UserError(f"cannot read {kind} from '{path}' ({e}); add --download or fix the path") from None
        return DataSets(train, val, 10 if kind == "cifar10" else 100, 32, "cifar")
    if kind == "cifar10-npz":
        _need(path, "the path of cifar10-jpeg.npz")
        train = JpegNpz(path, "train", _transforms("cifar", 32, True))
        val = JpegNpz(path, "test", _transforms("cifar", 32, False))
        return DataSets(train, val, len(train.classes), 32, "cifar")
    if kind == "imagenet":
        from torchvision import datasets

        _need(path, "an ImageFolder tree with train/ and val/")
        for sub in ("train", "val"):
            _need(os.path.join(path, sub), f"an ImageFolder tree with train/ and val/ under {path}")
        size = image_size or 224
        train = datasets.ImageFolder(os.path.join(path, "train"), _transforms("imagenet", size, True))
        val = datasets.ImageFolder(os.path.join(path, "val"), _transforms("imagenet", size, False))
        if len(train.classes) != len(val.classes):
            raise UserError(f"{path}/train has {len(train.classes)} classes but val/ has {len(val.classes)}; use matching folders")
        return DataSets(train, val, len(train.classes), size, "imagenet")
    raise UserError(f"unknown --data '{spec}'; use synthetic[:easy], cifar10:PATH, cifar100:PATH, cifar10-npz:PATH, "
                    f"imagenet:PATH, tokens:PATH or tokens:synthetic")


def load_tokens(spec: str, path: str) -> DataSets:
    """tokens:PATH (nanoGPT's PATH/train.bin and PATH/val.bin) or tokens:synthetic; blocks are cut once the
    model's block size is known (NextToken.fit)."""
    from ptgraph.trainers.tokens import max_token, read_tokens, synthetic_tokens

    if not path:
        raise UserError(f"--data {spec} needs a folder: --data tokens:PATH with PATH/train.bin and PATH/val.bin, "
                        f"or --data tokens:synthetic")
    if path == "synthetic":
        train, val = synthetic_tokens()
    else:
        _need(path, "a folder with train.bin and val.bin (flat uint16 token ids)")
        train, val = read_tokens(Path(path) / "train.bin"), read_tokens(Path(path) / "val.bin")
    vocab = max(max_token(train), max_token(val)) + 1
    task = NextToken(vocab, spec, train, val)
    return DataSets(train, val, vocab, 0, "tokens", task)
