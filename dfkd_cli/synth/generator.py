"""The DCGAN-style image generator the generator-based recipes share (DAFL, ZSKT, DFAD, DFQ, CMI, Fast).

The layout follows DAFL (Chen et al., ICCV 2019): a linear layer maps the latent code to a small
feature map, upsampling + 3x3 convolutions with BatchNorm and LeakyReLU grow it to the image
size, and a final tanh followed by a BatchNorm without affine parameters puts the output on the
scale of the teacher's normalised inputs. The number of upsampling stages grows with the input
size (two for 32x32, five for 224x224), so one generator serves MNIST and ImageNet teachers; the
width ``ngf`` and the generator batch are recipe settings; ``"auto"`` (the shipped recipes) sizes
them by the teacher's input and the device (:func:`resolve_generator_size`).

Example:
    >>> g = Generator(latent_dim=100, ngf=64, input_shape=(3, 32, 32))
    >>> g(torch.randn(8, 100)).shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.errors import DfkdError

AUTO = "auto"
# CPU sizes by the teacher's input side: (largest side in pixels, ngf, generator batch). Measured on
# a 2-core CPU with MNIST and CIFAR-10 teachers (the recipe files give the numbers): at 32 px the
# generator, not the teacher, is the cost, and ngf 16 / batch 128 reached the papers' accuracy in
# minutes where ngf 64 ran 7x slower per step.
CPU_SIZES = ((32, 16, 128), (64, 32, 64), (10**9, 64, 32))


def check_auto_int(value: Any, key: str) -> None:
    """A generator size setting: a positive integer or ``"auto"``."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DfkdError(f"'{key}' must be a positive integer or \"auto\" (sized by the input and device), got {value!r}")


def resolve_generator_size(config: Any, input_shape: tuple[int, int, int], device: torch.device) -> str | None:
    """Replace ``"auto"`` in ``config.ngf`` and ``config.batch_size`` in place: the paper's values
    (the config class's defaults) on a GPU; on a CPU the ``CPU_SIZES`` row for the input's largest
    side, never above the paper's. Returns a line saying what was chosen, or None when nothing was auto."""
    auto = [key for key in ("ngf", "batch_size") if getattr(config, key) == AUTO]
    if not auto:
        return None
    paper = {key: getattr(type(config), key) for key in auto}  # dataclass defaults: the paper's settings
    if device.type == "cuda":
        chosen = paper
    else:
        side = max(input_shape[1:])
        _, ngf, batch = next(row for row in CPU_SIZES if side <= row[0])
        chosen = {key: min(paper[key], {"ngf": ngf, "batch_size": batch}[key]) for key in auto}
    for key, value in chosen.items():
        setattr(config, key, value)
    where = "a GPU: the paper's" if device.type == "cuda" else f"{'x'.join(map(str, input_shape))} inputs on a CPU"
    return f"generator size (auto, {where}): " + ", ".join(f"synth.{k} {v}" for k, v in chosen.items())


def largest_batch_size(config: Any) -> int:
    """``config.batch_size``, or before ``"auto"`` is resolved its upper bound, the paper's (0 without one)."""
    value = getattr(config, "batch_size", 0)
    return getattr(type(config), "batch_size") if value == AUTO else value


def upsampling_stages(size: int, max_start: int = 8) -> int:
    """How many 2x upsamplings take a start map of at most ``max_start`` pixels to ``size``."""
    return max(2, math.ceil(math.log2(max(size, 1) / max_start)))


class Generator(nn.Module):
    """Latent code -> image in the teacher's normalised input space."""

    def __init__(self, latent_dim: int, ngf: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.latent_dim = latent_dim
        self.output_size = (height, width)
        stages = upsampling_stages(max(height, width))
        self.start = (math.ceil(height / 2**stages), math.ceil(width / 2**stages))
        wide = 2 * ngf
        self.project = nn.Linear(latent_dim, wide * self.start[0] * self.start[1])
        layers: list[nn.Module] = [nn.BatchNorm2d(wide)]
        for stage in range(stages):
            out = ngf if stage == stages - 1 else wide
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(wide, out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(ngf, channels, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False)]
        self.body = nn.Sequential(*layers)
        # channels_last: generator steps measured 1.3x-2.3x faster on CPU (the teacher and student
        # then run on channels_last inputs too); the weights' layout does not change their values.
        self.to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), -1, *self.start)
        x = self.body[:-2](x)
        if tuple(x.shape[-2:]) != self.output_size:  # sizes that are not start * 2^stages
            x = F.interpolate(x, size=self.output_size, mode="bilinear", align_corners=False)
        return self.body[-1](self.body[-2](x))


def reset_parameters(module: nn.Module) -> None:
    """Re-initialise every layer of ``module`` that can be (CMI's per-batch generator reset)."""
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
