"""Architectures of the fixture CNNs (torch modules) and how each is trained (:data:`MODELS`).

Imported by ``scripts/make_models.py``, which trains and exports them; needs torch
(``pip install '.[models]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

#: Side of the (upsampled) square input images.
SIZE = 32

def conv_bn(
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + optional activation, 'same' padding.

    Args:
        cin: Input channels.
        cout: Output channels.
        k: Square kernel size (odd).
        stride: Convolution stride.
        groups: Convolution groups (``cin`` for depthwise).
        act: Activation class, or ``None`` for none.

    Returns:
        The layer stack.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block; a stride or width change gets a 1x1 conv+BN projection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, act=None)
        self.shortcut = (
            conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetDigits(nn.Module):
    """Stem + three single-block stages (32x32, 16x16, 8x8) + GAP + Gemm."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, widths[0], 3)
        self.stage1 = BasicBlock(widths[0], widths[0], 1)
        self.stage2 = BasicBlock(widths[0], widths[1], 2)
        self.stage3 = BasicBlock(widths[1], widths[2], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6))
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2Digits(nn.Module):
    """MobileNetV2 scaled to 32x32 inputs (stride 8 overall)."""

    #: (expansion, out channels, repeats, first stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self, classes: int = 10, last: int = 320) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn(1, 16, 3, act=nn.ReLU6)]
        cin = 16
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        blocks.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VGGDigits(nn.Module):
    """Plain conv3x3-BN-ReLU stacks with max pooling, then a 2-layer classifier."""

    CONFIG = (32, 32, "M", 64, 64, "M", 128, 128, "M")

    def __init__(self, classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, int(item), 3))
                cin = int(item)
        self.features = nn.Sequential(*layers)
        spatial = SIZE // 2 ** self.CONFIG.count("M")
        self.classifier = nn.Sequential(
            nn.Linear(cin * spatial * spatial, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1, 3x3, 1x1->3x3, maxpool->1x1) concatenated."""

    def __init__(self, cin: int, c1: int, c3: int, reduce: int, cpool: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = conv_bn(cin, c3, 3)
        self.b13 = nn.Sequential(conv_bn(cin, reduce, 1), conv_bn(reduce, c3, 3))
        self.bpool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn(cin, cpool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b13(x), self.bpool(x)], dim=1)


class SplitBlock(nn.Module):
    """1x1 conv, channel split into a 3x3 and a 1x1 branch, re-concatenated."""

    def __init__(self, cin: int, cout: int, first: int) -> None:
        super().__init__()
        self.sizes = (first, cout - first)
        self.mix = conv_bn(cin, cout, 1)
        self.left = conv_bn(first, first, 3)
        self.right = conv_bn(cout - first, cout - first, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.mix(x), self.sizes, dim=1)
        return torch.cat([self.left(a), self.right(b)], dim=1)


class ConcatDigits(nn.Module):
    """Inception-like net: concat-heavy blocks with even and uneven channel splits."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32, 3)
        self.pool1 = nn.MaxPool2d(2)
        self.inc1 = InceptionBlock(32, 16, 24, 16, 16)  # -> 80 @ 16x16
        self.split1 = SplitBlock(80, 64, 32)  # even split
        self.pool2 = nn.MaxPool2d(2)
        self.inc2 = InceptionBlock(64, 32, 48, 32, 32)  # -> 160 @ 8x8
        self.split2 = SplitBlock(160, 128, 48)  # uneven split
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.split1(self.inc1(self.pool1(self.stem(x))))
        x = self.split2(self.inc2(self.pool2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one fixture model."""

    file: str
    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    seed: int
    summary: str


MODELS: dict[str, ModelSpec] = {
    "resnet": ModelSpec(
        file="resnet_digits.onnx",
        build=ResNetDigits,
        epochs=8,
        lr=2e-3,
        seed=1,
        summary="ResNet: stem conv3x3(32)-BN-ReLU; one basic block per stage at widths 32/64/128 "
        "(32x32, 16x16, 8x8), stride-2 stages with 1x1 conv+BN projection shortcuts; "
        "GlobalAveragePool, Flatten, Gemm.",
    ),
    "mobilenetv2": ModelSpec(
        file="mobilenetv2_digits.onnx",
        build=MobileNetV2Digits,
        epochs=10,
        lr=3e-3,
        seed=2,
        summary="MobileNetV2: stem conv3x3(16)-BN-ReLU6; inverted residual blocks "
        "(t,c,n,s) = (1,16,1,1) (6,24,2,2) (6,32,2,2) (6,64,2,2) (6,96,1,1) with "
        "ReLU6 exported as Clip and residual Add where shapes match; 1x1 conv(320); "
        "GlobalAveragePool, Flatten, Gemm.",
    ),
    "vgg": ModelSpec(
        file="vgg_digits.onnx",
        build=VGGDigits,
        epochs=8,
        lr=1e-3,
        seed=3,
        summary="VGG: conv3x3-BN-ReLU x [32,32,M,64,64,M,128,128,M]; Flatten (128x4x4) into "
        "Gemm(2048->128), ReLU, Gemm(128->10).",
    ),
    "concat": ModelSpec(
        file="concat_digits.onnx",
        build=ConcatDigits,
        epochs=8,
        lr=2e-3,
        seed=4,
        summary="Inception-like: stem conv3x3(32), MaxPool; 4-branch block (1x1, 3x3, 1x1->3x3, "
        "maxpool->1x1) concatenated to 80ch; 1x1 conv(64) split 32/32 into 3x3 and 1x1 "
        "branches and re-concatenated; MaxPool; 4-branch block to 160ch; 1x1 conv(128) "
        "split 48/80 likewise; GlobalAveragePool, Flatten, Gemm.",
    ),
}
