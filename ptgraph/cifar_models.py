"""The CIFAR ResNets of the PruneTrain paper, as built-in specs (`ptgraph:resnet32`): torchvision has none.

mobilenet_v2: torchvision's, adapted to 32x32 (see its docstring).
resnet20/32/56/110: three stages of basic blocks, 16/32/64 channels, 32x32 input (He et al., 2016),
with 1x1 projection shortcuts where the shape changes. resnet50: the bottleneck [3, 4, 6, 3]
layout of ImageNet's ResNet-50 with a 3x3 stem and no max-pool, for 32x32 images.
"""
from __future__ import annotations

import torch
from torch import nn

from ptgraph.errors import UserError


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, width, 3, stride), nn.ReLU(inplace=True), *_conv_bn(width, width, 3))
        self.shortcut = nn.Sequential(*_conv_bn(cin, width, 1, stride)) if stride != 1 or cin != width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(
            *_conv_bn(cin, width, 1), nn.ReLU(inplace=True), *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(width, out, 1),
        )
        self.shortcut = nn.Sequential(*_conv_bn(cin, out, 1, stride)) if stride != 1 or cin != out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, block: type, depths: list[int], widths: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, widths[0] if block is BasicBlock else 64, 3), nn.ReLU(inplace=True))
        cin = widths[0] if block is BasicBlock else 64
        stages = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def _basic(n: int, num_classes: int, width_mult: float) -> CifarResNet:
    """The paper's CIFAR ResNet-(6n+2); `width_mult` scales every stage's width (16, 32, 64), so that a narrower
    network of the same design can be trained from scratch against a pruned one (FLOPs go with its square)."""
    if isinstance(width_mult, bool) or not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise UserError(f"width_mult={width_mult!r} must be a positive number, e.g. width_mult=0.55")
    return CifarResNet(BasicBlock, [n, n, n], [max(1, round(w * width_mult)) for w in (16, 32, 64)], num_classes)


def resnet20(num_classes: int = 10, width_mult: float = 1.0) -> CifarResNet:
    return _basic(3, num_classes, width_mult)


def resnet32(num_classes: int = 10, width_mult: float = 1.0) -> CifarResNet:
    return _basic(5, num_classes, width_mult)


def resnet56(num_classes: int = 10, width_mult: float = 1.0) -> CifarResNet:
    return _basic(9, num_classes, width_mult)


def resnet110(num_classes: int = 10, width_mult: float = 1.0) -> CifarResNet:
    return _basic(18, num_classes, width_mult)


def resnet50(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes)


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, stride: int = 8) -> nn.Module:
    """torchvision's MobileNetV2 for 32x32 inputs. stride 8: the stem and the first stride-2 block run at
    stride 1 (the usual CIFAR adaptation, last feature map 4x4); stride 16: only the stem does (2x2,
    about a quarter of the FLOPs, for CPU runs). An architecture the original PruneTrain code could not
    prune: depthwise convs, inverted residuals, no ReLU after the adds."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    if stride not in (8, 16):
        raise UserError(f"ptgraph:mobilenet_v2 takes stride=8 or stride=16, not {stride}")
    model = tv_mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    model.features[0][0].stride = (1, 1)
    if stride == 8:
        model.features[2].conv[1][0].stride = (1, 1)
    return model


MODELS = {"resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56, "resnet110": resnet110,
          "resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
