"""The text student trainer: KD on synthetic texts, selected on held-out synthetic agreement.

Teacher and student read the teacher's tokenizer (a ``bert-N`` student is the teacher's first N
layers; a student folder must share its vocabulary). The loss is PromptDFD's Eq. 1,
``alpha * CE(student, teacher argmax) + (1 - alpha) * T^2 KL(teacher_T || student_T)``, with the
teacher's logits taken from the synthesizer's pool (computed once, when a text is made).
"""

from __future__ import annotations

from typing import Any

import torch

from dfkd_cli.config import TrainConfig
from dfkd_cli.precision import Precision
from dfkd_cli.text.models import TextTeacher
from dfkd_cli.trainer import kd_loss, scheduled_lr


@torch.inference_mode()
def text_logits(model: Any, tokenizer: Any, texts: list[str], max_length: int, device: torch.device,
                batch_size: int = 128) -> torch.Tensor:
    """``model``'s float32 logits on ``texts`` (CPU tensor), in batches, truncated to ``max_length`` tokens."""
    parts = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        parts.append(model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, 0)


class TextTrainer:
    """Updates the student; keeps the best student on the selection half of the hold-out."""

    def __init__(self, student: Any, teacher: TextTeacher, cfg: TrainConfig, device: torch.device,
                 max_length: int = 128, precision: Precision | None = None) -> None:
        self.student, self.teacher, self.cfg, self.device = student.to(device), teacher, cfg, device
        self.tokenizer, self.class_names = teacher.tokenizer, teacher.class_names
        self.max_length = min(max_length, teacher.max_positions)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.steps_done = 0
        self.best_step = 0
        self.best_agreement = -1.0
        self._best_state: dict[str, torch.Tensor] | None = None
        self.time_progress = lambda: 0.0  # set by the pipeline when a time budget drives the schedule
        self.scaler = (precision or Precision()).scaler()  # loss scaling for fp16

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.teacher.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.inference_mode()
    def teacher_logits(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        return self._logits(self.teacher.model, texts, batch_size)

    @torch.inference_mode()
    def student_logits(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        was_training = self.student.training
        self.student.eval()
        try:
            return self._logits(self.student, texts, batch_size)
        finally:
            self.student.train(was_training)

    def _logits(self, model: Any, texts: list[str], batch_size: int) -> torch.Tensor:
        return text_logits(model, self.tokenizer, texts, self.max_length, self.device, batch_size)

    def step(self, texts: list[str], teacher_logits: torch.Tensor) -> float:
        """One KD step on a batch of texts labelled by the teacher; returns the loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = scheduled_lr(self.cfg, self.steps_done, self.time_progress())
        self.student.train()
        student_logits = self.student(**self.encode(texts)).logits.float()
        loss = kd_loss(student_logits, teacher_logits.to(self.device), self.cfg.loss, self.cfg.temperature, self.cfg.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.backward(loss)
        self.scaler.step(self.optimizer)
        self.steps_done += 1
        return float(loss.detach())

    def agreement(self, texts: list[str], teacher_logits: torch.Tensor) -> float:
        student = self.student_logits(texts)
        return float((student.argmax(1) == teacher_logits.argmax(1)).float().mean())

    def select(self, texts: list[str], teacher_logits: torch.Tensor) -> float:
        """Agreement on the selection texts; the student is kept when it is the best so far."""
        value = self.agreement(texts, teacher_logits)
        if value > self.best_agreement:
            self.best_agreement, self.best_step = value, self.steps_done
            self._best_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        return value

    def restore_best(self) -> Any:
        if self._best_state is not None:
            self.student.load_state_dict(self._best_state)
        return self.student.eval()
