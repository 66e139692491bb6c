"""Registers the CIFAR-style zoo (:mod:`dfkd_cli.zoo_cifar`) and LeNet-5 (:mod:`dfkd_cli.zoo_lenet`).

Importing this module adds the names below to :mod:`dfkd_cli.archs`; ``archs`` imports it on
first use, so users never need to.

Example:
    >>> from dfkd_cli.archs import create_model
    >>> create_model("wrn16_1", num_classes=10, input_shape=(3, 32, 32)).fc.in_features
    64
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from dfkd_cli.archs import ArchSpec, register_arch
from dfkd_cli.zoo_cifar import VGG_CONFIGS, CifarResNet, CifarVGG, TinyResNet, WideResNet
from dfkd_cli.zoo_lenet import LENET_WIDTHS, LeNet5

Factory = Callable[[int, int], nn.Module]


def _cifar(name: str, factory: Factory, student: str | None, description: str) -> None:
    register_arch(ArchSpec(name, "cifar", (3, 32, 32), "cifar10", student, factory, description))


def _cifar_resnet(blocks: list[int], num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(blocks, num_classes=num_classes, in_chans=in_chans)


def _tiny_resnet(depth: int, num_classes: int, in_chans: int) -> nn.Module:
    return TinyResNet(depth, num_classes=num_classes, in_chans=in_chans)


def _wrn(depth: int, widen: int, num_classes: int, in_chans: int) -> nn.Module:
    return WideResNet(depth, widen, num_classes=num_classes, in_chans=in_chans)


def _vgg(config: str, num_classes: int, in_chans: int) -> nn.Module:
    return CifarVGG(VGG_CONFIGS[config], num_classes=num_classes, in_chans=in_chans)


def _lenet(widths: tuple[int, int, int, int], num_classes: int, in_chans: int) -> nn.Module:
    return LeNet5(num_classes=num_classes, in_chans=in_chans, widths=widths)


def _register() -> None:
    _cifar("cifar_resnet18", partial(_cifar_resnet, [2, 2, 2, 2]), "resnet20",
           "CIFAR ResNet-18 (kuangliu / Fast-Datafree layout: linear, shortcut), 11.2M params")
    _cifar("cifar_resnet34", partial(_cifar_resnet, [3, 4, 6, 3]), "cifar_resnet18",
           "CIFAR ResNet-34 (kuangliu / Fast-Datafree layout: linear, shortcut), 21.3M params")
    tiny_students = {8: None, 20: "resnet8", 32: "resnet8", 56: "resnet20", 110: "resnet20"}
    for depth, student in tiny_students.items():
        _cifar(f"resnet{depth}", partial(_tiny_resnet, depth), student,
               f"He et al. CIFAR ResNet-{depth}, widths 16/32/64 (fc, downsample)")
    for depth, widen in [(16, 1), (16, 2), (40, 1), (40, 2)]:
        _cifar(f"wrn{depth}_{widen}", partial(_wrn, depth, widen), None if (depth, widen) == (16, 1) else "wrn16_1",
               f"Wide ResNet WRN-{depth}-{widen}, pre-activation (block1.layer.0.convShortcut)")
    _cifar("cifar_vgg8_bn", partial(_vgg, "vgg8"), "resnet20",
           "CIFAR VGG-8 with BatchNorm (RepDistiller / Fast-Datafree layout: block0..4, classifier)")
    _cifar("cifar_vgg11_bn", partial(_vgg, "vgg11"), "cifar_vgg8_bn",
           "CIFAR VGG-11 with BatchNorm (RepDistiller / Fast-Datafree layout: block0..4, classifier)")
    for name, student in [("lenet5", "lenet5_half"), ("lenet5_half", None)]:
        register_arch(ArchSpec(
            name, "lenet", (1, 32, 32), "mnist", student, partial(_lenet, LENET_WIDTHS[name]),
            f"LeNet-5{' (half width)' if student is None else ''} as in DAFL, no BatchNorm, 32x32 inputs",
        ))


_register()
