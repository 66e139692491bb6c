"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020).

Pixels are optimised with Adam so the teacher classifies them as chosen target classes (``ce``)
while the feature statistics at every BatchNorm layer match the layer's running statistics
(``bn``, the first layer weighted by ``first_bn_multiplier``), under total-variation and l2 image
priors (``tv_l1``, ``tv_l2``, ``l2``). Random jitter and horizontal flips are applied to the batch
at each iteration, and pixels are kept inside the range real images can take.

With ``warm_start_iterations`` > 0 (the paper's multi-resolution scheme for ImageNet), a tensor at
``warm_start_scale`` of the input size is optimised first, the teacher seeing its bilinear upsampling
to the input size; optimisation then continues at full resolution from the upsampled result.

Adaptive DeepInversion (same paper) adds ``adv``: a competition term 1 - JS(teacher, student) with
the student being trained, so that new batches go where the student still disagrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.base import Capabilities, Synthesizer
from dfkd_cli.synth.losses import BatchNormStatistics, LossInputs, weighted_loss
from dfkd_cli.synth.registry import register_synthesizer

if TYPE_CHECKING:
    from dfkd_cli.teacher import Teacher


def balanced_targets(n: int, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` target classes covering all classes as evenly as possible, in random order."""
    repeats = math.ceil(n / num_classes)
    cycle = torch.cat([torch.randperm(num_classes, generator=generator) for _ in range(repeats)])
    return cycle[:n][torch.randperm(n, generator=generator)]


def pixel_range(teacher: "Teacher", device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per channel, shaped (1, C, 1, 1): where images in [0, 1] land after normalisation."""
    mean = torch.tensor(teacher.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(teacher.std, device=device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def random_jitter_flip(x: torch.Tensor, jitter: int, flip: bool) -> torch.Tensor:
    """Roll the batch by a random offset of up to ``jitter`` pixels and maybe mirror it."""
    if jitter > 0:
        dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,)))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand(()) < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


@register_synthesizer("deepinversion")
class DeepInversionSynthesizer(Synthesizer):
    """Optimises input batches against the frozen teacher; each batch joins the pool when done."""

    @dataclass
    class Config:
        batch_size: int = 256
        iterations: int = 2000  # Adam steps on the pixels of each batch (at full resolution)
        lr: float = 0.05
        jitter: int = 2  # pixels
        flip: bool = True
        first_bn_multiplier: float = 10.0
        warm_start_iterations: int = 0  # low-resolution steps before the full-resolution ones; 0 = off
        warm_start_scale: float = 0.5  # side of the low-resolution tensor relative to the input

        def __post_init__(self) -> None:
            if self.warm_start_iterations < 0:
                raise DfkdError(f"synth.warm_start_iterations must be 0 (off) or more, "
                                f"got {self.warm_start_iterations}")
            if not 0 < self.warm_start_scale <= 1:
                raise DfkdError(f"synth.warm_start_scale must be in (0, 1], got {self.warm_start_scale}; e.g. 0.5")

    loss_terms = ("ce", "bn", "tv_l1", "tv_l2", "l2", "adv")
    capabilities = Capabilities(requires_bn=True)

    def _pixel_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pixel_range(self.teacher, self.device)

    def _warm_size(self) -> tuple[int, int]:
        _, h, w = self.teacher.input_shape
        scale = self.config.warm_start_scale
        return max(1, round(h * scale)), max(1, round(w * scale))

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Bilinear resize of a low-resolution batch to the teacher's input size."""
        return F.interpolate(x, size=self.teacher.input_shape[1:], mode="bilinear", align_corners=False)

    def make_batch(self, n: int) -> torch.Tensor:
        cfg = self.config
        targets = balanced_targets(n, self.teacher.num_classes).to(self.device)
        channels = self.teacher.input_shape[0]
        total = cfg.warm_start_iterations + cfg.iterations
        with BatchNormStatistics(self.teacher.model, cfg.first_bn_multiplier) as bn:
            if cfg.warm_start_iterations > 0:
                small = torch.randn(n, channels, *self._warm_size(), device=self.device, requires_grad=True)
                stopped = self._optimise(small, targets, bn, range(cfg.warm_start_iterations), total, self.upsample)
                x = self.upsample(small.detach())
                if stopped:
                    return x
            else:
                x = torch.randn(n, *self.teacher.input_shape, device=self.device)
            x.requires_grad_(True)
            self._optimise(x, targets, bn, range(cfg.warm_start_iterations, total), total, lambda v: v)
        return x.detach()

    def _optimise(self, x: torch.Tensor, targets: torch.Tensor, bn: BatchNormStatistics, steps: range, total: int,
                  render: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Adam on the pixels of ``x`` (with a cosine learning rate over ``steps``); the teacher sees
        ``render(x)``. Pixels stay in range (bilinear upsampling of in-range pixels is in range too).
        Returns True when the run's hooks asked to stop."""
        cfg = self.config
        optimizer = torch.optim.Adam([x], lr=cfg.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(len(steps), 1))
        low, high = self._pixel_range()
        for it in steps:
            bn.reset()
            optimizer.zero_grad(set_to_none=True)
            view = random_jitter_flip(render(x), cfg.jitter, cfg.flip)
            logits = self.teacher.model(view)
            student_logits = self.student_logits(view) if self.loss.get("adv") else None
            inputs = LossInputs(x=view, logits=logits, targets=targets, bn=bn, student_logits=student_logits)
            loss, parts = weighted_loss(self.loss, inputs)
            self.scaler.backward(loss)
            self.scaler.step(optimizer)
            schedule.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, high), low)
            parts["acc"] = float((logits.argmax(1) == targets).float().mean())
            if self.hooks.should_stop(it + 1, total, parts):
                return True
        return False
