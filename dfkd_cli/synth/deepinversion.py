"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020).

Pixels are optimised with Adam so the teacher classifies them as chosen target classes (``ce``)
while the feature statistics at every BatchNorm layer match the layer's running statistics
(``bn``, the first layer weighted by ``first_bn_multiplier``), under total-variation and l2 image
priors (``tv_l1``, ``tv_l2``, ``l2``). Random jitter and horizontal flips are applied to the batch
at each iteration, and pixels are kept inside the range real images can take.

Adaptive DeepInversion (same paper) adds ``adv``: a competition term 1 - JS(teacher, student) with
the student being trained, so that new batches go where the student still disagrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dfkd_cli.synth.base import Synthesizer
from dfkd_cli.synth.losses import BatchNormStatistics, LossInputs, weighted_loss


def balanced_targets(n: int, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` target classes covering all classes as evenly as possible, in random order."""
    repeats = math.ceil(n / num_classes)
    cycle = torch.cat([torch.randperm(num_classes, generator=generator) for _ in range(repeats)])
    return cycle[:n][torch.randperm(n, generator=generator)]


def random_jitter_flip(x: torch.Tensor, jitter: int, flip: bool) -> torch.Tensor:
    """Roll the batch by a random offset of up to ``jitter`` pixels and maybe mirror it."""
    if jitter > 0:
        dx, dy = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,)))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand(()) < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


class DeepInversionSynthesizer(Synthesizer):
    """Optimises input batches against the frozen teacher; each batch joins the pool when done."""

    @dataclass
    class Config:
        batch_size: int = 256
        iterations: int = 2000  # Adam steps on the pixels of each batch
        lr: float = 0.05
        jitter: int = 2  # pixels
        flip: bool = True
        first_bn_multiplier: float = 10.0

    loss_terms = ("ce", "bn", "tv_l1", "tv_l2", "l2", "adv")
    requires_bn = True

    def _pixel_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.teacher.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.teacher.std, device=self.device).view(1, -1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def make_batch(self, n: int) -> torch.Tensor:
        cfg = self.config
        model = self.teacher.model
        targets = balanced_targets(n, self.teacher.num_classes).to(self.device)
        x = torch.randn(n, *self.teacher.input_shape, device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([x], lr=cfg.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.iterations, 1))
        low, high = self._pixel_range()
        with BatchNormStatistics(model, cfg.first_bn_multiplier) as bn:
            for it in range(cfg.iterations):
                bn.reset()
                optimizer.zero_grad(set_to_none=True)
                view = random_jitter_flip(x, cfg.jitter, cfg.flip)
                logits = model(view)
                student_logits = self._student_logits(view)
                inputs = LossInputs(x=view, logits=logits, targets=targets, bn=bn, student_logits=student_logits)
                loss, parts = weighted_loss(self.loss, inputs)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    x.data = torch.max(torch.min(x, high), low)
                parts["acc"] = float((logits.argmax(1) == targets).float().mean())
                if self.on_step(it + 1, cfg.iterations, parts):
                    break
        return x.detach()

    def _student_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """The live student's logits when the ``adv`` competition term is on: in eval mode, so its
        BatchNorm statistics stay untouched, and with its weights frozen for this forward pass, so
        the pixel update's backward computes no weight gradients the trainer would throw away."""
        if not self.loss.get("adv"):
            return None
        if self.student is None:
            raise RuntimeError("the 'adv' term needs the student: set synthesizer.student first")
        was_training = self.student.training
        self.student.eval().requires_grad_(False)
        logits = self.student(x)
        self.student.train(was_training).requires_grad_(True)
        return logits
