"""The student trainer: knowledge distillation on synthesizer batches.

The KD loss is KL(teacher || student) at temperature T scaled by T^2 (Hinton et al.), or the
mean absolute logit difference where a paper says so (``train.loss = "l1"``). The best student
is selected on agreement with the teacher over held-out synthetic samples, never on real data.

Example:
    >>> trainer = StudentTrainer(student, teacher.model, TrainConfig(steps=100), torch.device("cpu"))
    >>> loss = trainer.step(synth.sample(128))
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.config import TrainConfig


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str, temperature: float) -> torch.Tensor:
    """Distillation loss between student and teacher logits."""
    if loss == "l1":
        return F.l1_loss(student_logits, teacher_logits)
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    p_teacher = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t


def augment(x: torch.Tensor, crop_pad: int, flip: bool) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flips, per sample."""
    if crop_pad > 0:
        n, _, h, w = x.shape
        padded = F.pad(x, (crop_pad,) * 4)
        dy = torch.randint(0, 2 * crop_pad + 1, (n,), device=x.device)
        dx = torch.randint(0, 2 * crop_pad + 1, (n,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if flip:
        mirror = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


@torch.no_grad()
def predict_classes(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Top-1 predictions of ``model`` (in eval mode) on ``x``, batched."""
    was_training = model.training
    model.eval()
    preds = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return preds


class StudentTrainer:
    """Updates the student on synthetic batches and keeps the best one seen on held-out agreement."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        self.student = student.to(device).train()
        self.teacher = teacher
        self.cfg = cfg
        self.optimizer = self._make_optimizer()
        self.steps_done = 0
        self.best_agreement = -1.0
        self.best_step = 0
        self._best_state: dict[str, torch.Tensor] | None = None
        self._snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.cfg, self.student.parameters()
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _lr_at(self, step: int) -> float:
        if self.cfg.schedule == "constant":
            return self.cfg.lr
        return 0.5 * self.cfg.lr * (1 + math.cos(math.pi * min(step / max(self.cfg.steps, 1), 1.0)))

    def step(self, x: torch.Tensor) -> float:
        """One KD step on batch ``x``; returns the loss."""
        x = augment(x, self.cfg.crop_pad, self.cfg.flip)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(self.steps_done)
        loss = kd_loss(self.student(x), teacher_logits, self.cfg.loss, self.cfg.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return float(loss.detach())

    def select(self, x: torch.Tensor, teacher_classes: torch.Tensor) -> float:
        """Agreement with the teacher on held-out ``x``; the best student so far is kept."""
        agreement = float((predict_classes(self.student, x) == teacher_classes).float().mean())
        if agreement > self.best_agreement:
            self.best_agreement, self.best_step = agreement, self.steps_done
            self._best_state = copy.deepcopy(self.student.state_dict())
        return agreement

    def snapshot(self, keep: int = 16) -> None:
        """Keep the current weights on the CPU as a candidate for :meth:`select_snapshot`. Past
        ``keep`` snapshots every other older one is dropped, so they stay spread over the run."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}
        self._snapshots.append((self.steps_done, state))
        if len(self._snapshots) > keep:
            self._snapshots = self._snapshots[::-2][::-1]  # every other one, ending with the latest

    def select_snapshot(self, x: torch.Tensor, teacher_classes: torch.Tensor) -> float:
        """Choose the snapshot that agrees best with the teacher on held-out ``x`` (ties go to the
        later one) and make it the best student; returns its agreement."""
        if not self._snapshots:
            raise RuntimeError("no snapshots to select from: call snapshot() first")
        current = copy.deepcopy(self.student.state_dict())
        self.best_agreement = -1.0
        for step, state in self._snapshots:
            self.student.load_state_dict(state)
            agreement = float((predict_classes(self.student, x) == teacher_classes).float().mean())
            if agreement >= self.best_agreement:
                self.best_agreement, self.best_step, self._best_state = agreement, step, state
        self.student.load_state_dict(current)
        return self.best_agreement

    def restore_best(self) -> nn.Module:
        """Load the best selected weights into the student, in eval mode, and return it."""
        if self._best_state is not None:
            self.student.load_state_dict(self._best_state)
        return self.student.eval()
