"""CIFAR-style networks with the parameter names of the checkpoints published for them.

* :class:`CifarResNet` - kuangliu / Fast-Datafree ResNet-18/34 (``linear``, ``shortcut``).
* :class:`TinyResNet` - He et al. CIFAR ResNet-8/20/32/56/110 (``fc``, ``downsample``).
* :class:`WideResNet` - Zagoruyko & Komodakis pre-activation WRN (``block1.layer.0.convShortcut``).
* :class:`CifarVGG` - RepDistiller / Fast-Datafree VGG with BatchNorm (``block0..4``, ``classifier``).

All pool adaptively before the classifier, so inputs other than 32x32 (e.g. 28x28) work.
Each exposes ``forward_features`` (pooled penultimate features) and ``forward_head``.

Example:
    >>> model = TinyResNet(depth=20, num_classes=10)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """He-normal convolutions, unit BatchNorm, zero biases (as the reference training code)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1_bn(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class _BasicBlock(nn.Module):
    """Post-activation residual block; subclasses name the projection as their checkpoints do."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    @staticmethod
    def _projection(in_planes: int, planes: int, stride: int) -> nn.Sequential | None:
        return _conv1x1_bn(in_planes, planes, stride) if stride != 1 or in_planes != planes else None

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.identity(x))


class _ShortcutBlock(_BasicBlock):
    """kuangliu block: ``shortcut`` is an empty ``nn.Sequential`` when it does not project."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__(in_planes, planes, stride)
        projection = self._projection(in_planes, planes, stride)
        self.shortcut = projection if projection is not None else nn.Sequential()

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)


class _DownsampleBlock(_BasicBlock):
    """He et al. / torchvision block: ``downsample`` exists only when it projects."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__(in_planes, planes, stride)
        self.downsample = self._projection(in_planes, planes, stride)

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)


class _ResNetBase(nn.Module):
    """Stem conv + BN + ReLU, stages of residual blocks, adaptive average pool, classifier."""

    classifier_name = "fc"

    def __init__(self, widths: list[int], blocks: list[int], num_classes: int, in_chans: int,
                 block: type[_BasicBlock]) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layer = []
            for position in range(count):
                layer.append(block(in_planes, width, stride if position == 0 else 1))
                in_planes = width
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.num_features = in_planes
        setattr(self, self.classifier_name, nn.Linear(in_planes, num_classes))
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            out = getattr(self, f"layer{index + 1}")(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.classifier_name)(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(_ResNetBase):
    """kuangliu-style CIFAR ResNet-18/34: 3x3 stem, no max-pool, widths 64..512, ``linear`` head.

    Example:
        >>> CifarResNet([3, 4, 6, 3], num_classes=10).linear.in_features
        512
    """

    classifier_name = "linear"

    def __init__(self, blocks: list[int], num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__([64, 128, 256, 512], blocks, num_classes, in_chans, _ShortcutBlock)


class TinyResNet(_ResNetBase):
    """He et al. CIFAR ResNet of depth 6n+2 with widths 16/32/64 and an ``fc`` head.

    Example:
        >>> sum(p.numel() for p in TinyResNet(depth=20).parameters())
        272474
    """

    classifier_name = "fc"

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        super().__init__([16, 32, 64], [n, n, n], num_classes, in_chans, _DownsampleBlock)


class _WideBlock(nn.Module):
    """Pre-activation block; ``convShortcut`` exists only when the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.convShortcut = (
            None if in_planes == out_planes
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        out = self.conv2(out)
        # The reference adds the raw input when widths match, else the projected activation.
        identity = x if self.convShortcut is None else self.convShortcut(activated)
        return identity + out


class _WideStage(nn.Module):
    def __init__(self, count: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            _WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(count)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: widths 16, 16k, 32k, 64k and (depth-4)/6 blocks per stage.

    Example:
        >>> WideResNet(depth=40, widen_factor=2).fc.in_features
        128
    """

    classifier_name = "fc"

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.num_features = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
}


def _vgg_block(widths: list[int], in_planes: int) -> nn.Sequential:
    """(Conv 3x3, BN, ReLU) per width, without the final ReLU (applied in forward)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_planes, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_planes = width
    return nn.Sequential(*layers[:-1])


class CifarVGG(nn.Module):
    """RepDistiller-style CIFAR VGG with BatchNorm: ``block0..4``, ``pool0..4``, ``classifier``.

    Example:
        >>> CifarVGG(VGG_CONFIGS["vgg8"], num_classes=100).classifier.out_features
        100
    """

    classifier_name = "classifier"

    def __init__(self, config: list[list[int]], num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        in_planes = in_chans
        for index, widths in enumerate(config):
            setattr(self, f"block{index}", _vgg_block(widths, in_planes))
            in_planes = widths[-1]
        for index in range(4):
            setattr(self, f"pool{index}", nn.MaxPool2d(kernel_size=2, stride=2))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)
        _init_weights(self, linear_std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        out = self.pool0(F.relu(self.block0(x)))
        out = self.pool1(F.relu(self.block1(out)))
        out = self.pool2(F.relu(self.block2(out)))
        out = F.relu(self.block3(out))
        if height >= 64:  # the reference skips pool3 on 32x32 CIFAR inputs
            out = self.pool3(out)
        out = self.pool4(F.relu(self.block4(out)))
        return torch.flatten(out, 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
