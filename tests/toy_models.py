"""Small models named by specs in the CLI tests (`toy_models:NAME`)."""
import os
import signal

import torch
from torch import nn


class ResidualNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


class DataDependent(nn.Module):
    """Python control flow on a tensor value at the top level: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class Gate(nn.Module):
    """Untraceable on its own (a branch on a tensor value), fine as a leaf."""

    def forward(self, x):
        return x if x.mean() > -1e9 else -x


class WithUntraceableBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.gate(torch.relu(self.a(x)))
        return self.c(torch.relu(self.b(x)))


def not_a_model():
    return 42


def small_resnet(num_classes: int = 10):
    """A three-stage CIFAR ResNet with one block per stage, narrow enough for second-long training tests."""
    from ptgraph.cifar_models import BasicBlock, CifarResNet

    return CifarResNet(BasicBlock, [1, 1, 1], [8, 16, 16], num_classes)


class PlainNet(nn.Module):
    """No BatchNorm: a run split over processes computes what one process computes on the global batch."""

    def __init__(self, width: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = nn.Conv2d(width, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.block(x))
        return self.head(torch.relu(self.down(x)).mean((2, 3)))


def plain_net(num_classes: int = 10):
    return PlainNet(num_classes=num_classes)


class KillSwitch(nn.Module):
    """A leaf (fx cannot trace its branch on a value), so its Python runs at every call: in training it
    SIGKILLs its own process at the call and rank named by PTGRAPH_TEST_KILL=RANK:CALL."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        if self.training and x.mean() > -1e30:
            self.calls += 1
            rank, _, call = os.environ.get("PTGRAPH_TEST_KILL", "-1:0").partition(":")
            if os.environ.get("RANK") == rank and self.calls == int(call):
                os.kill(os.getpid(), signal.SIGKILL)
        return x


class KillableNet(PlainNet):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes=num_classes)
        self.switch = KillSwitch()

    def forward(self, x):
        return super().forward(self.switch(x))


class CatNet(nn.Module):
    """Two branches concatenated, then mixed: the cat rule decides which consumer columns go with which branch."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)  # unequal: a wrong order shows
        self.mix = nn.Conv2d(14, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.mix(torch.cat([self.a(x).relu(), self.b(x).relu()], 1)).relu()
        return self.fc(x.mean((2, 3)))


def cat_net(num_classes: int = 10):
    return CatNet(num_classes=num_classes)


class TinyVideoNet(nn.Module):
    """A 3-D convolution first: it reads clips (N, C, T, H, W), so its default input is 5-D."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv3d(3, 4, 3, stride=(2, 8, 8), padding=1)
        self.block = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.block(x))
        return self.fc(x.mean((2, 3, 4)))


class TwoInputNet(nn.Module):
    """A forward of two images (as RAFT's): one --input-shape per input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, image1, image2):
        return self.head(torch.relu(self.a(image1) + self.b(image2)))
