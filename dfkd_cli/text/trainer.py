"""The text student trainer: KD on synthetic texts, selected on held-out synthetic agreement.

Teacher and student read the teacher's tokenizer (a ``bert-N`` student is the teacher's first N
layers; a student folder must share its vocabulary). The loss is PromptDFD's Eq. 1,
``alpha * CE(student, teacher argmax) + (1 - alpha) * T^2 KL(teacher_T || student_T)``, with the
teacher's logits taken from the batch (computed once, when the synthesizer made the text).

:class:`TextTrainer` has the operations of :class:`dfkd_cli.trainer.StudentTrainer` that a run
uses (``step``, ``select``, ``teacher_classes``, ``student_classes``, state round trip), so text
runs go through the same loop, supervisor and race as image runs.

Example:
    >>> trainer = TextTrainer(student, teacher, recipe.train, torch.device("cpu"))
    >>> loss = trainer.step(synth.sample(32))
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dfkd_cli.batches import TextBatch
from dfkd_cli.config import TrainConfig
from dfkd_cli.distributed import World
from dfkd_cli.kept import KeptStudent
from dfkd_cli.precision import Precision
from dfkd_cli.synth.context import StudentView
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


def eval_logits(model: Any, tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """:func:`text_logits` with ``model`` in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        return text_logits(model, tokenizer, texts, max_length, device)
    finally:
        model.train(was_training)


class TextStudentView(StudentView):
    """The live text student as a synthesizer sees it: its logits on texts (no gradients; the
    prompter's reward needs the student's answers, not its gradient)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int, device: torch.device) -> None:
        super().__init__(model)
        self._tokenizer, self._max_length, self._device = tokenizer, max_length, device

    def logits(self, texts: list[str]) -> torch.Tensor:  # type: ignore[override]
        return eval_logits(self._model, self._tokenizer, texts, self._max_length, self._device)


class TextTrainer:
    """Updates the student; keeps the latest student within noise of the best agreement on the
    selection half of the hold-out."""

    def __init__(self, student: Any, teacher: TextTeacher, cfg: TrainConfig, device: torch.device,
                 max_length: int = 128, precision: Precision | None = None, world: World | None = None) -> None:
        self.student, self.teacher, self.cfg, self.device = student.to(device), teacher, cfg, device
        self.tokenizer, self.class_names = teacher.tokenizer, teacher.class_names
        self.max_length = min(max_length, teacher.max_positions)
        self.optimizer = self._make_optimizer()
        self.steps_done = 0
        self.kept = KeptStudent()
        self.time_progress: Callable[[], float] = lambda: 0.0  # the run's share of its time budget (follow_clock)
        self.scaler = (precision or Precision()).scaler()  # loss scaling for fp16
        self.world = world or World()
        self.lr_scale = 1.0  # lowered by the divergence guard after a non-finite loss
        self.last_parts: dict[str, float] = {}
        self.last_majority = 0.0  # share of the last batch in the teacher's most frequent class

    def follow_clock(self, fraction: Callable[[], float]) -> None:
        """From now on the learning rate also follows ``fraction`` (the share of the time budget used)."""
        self.time_progress = fraction

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.cfg, [p for p in self.student.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def view(self) -> TextStudentView:
        """The student as a synthesizer may see it."""
        return TextStudentView(self.student, self.tokenizer, self.max_length, self.device)

    def teacher_logits(self, texts: list[str]) -> torch.Tensor:
        return text_logits(self.teacher.model, self.tokenizer, texts, self.max_length, self.device)

    def student_logits(self, texts: list[str]) -> torch.Tensor:
        return eval_logits(self.student, self.tokenizer, texts, self.max_length, self.device)

    def teacher_classes(self, batch: TextBatch) -> torch.Tensor:
        return batch.teacher_classes()

    def student_classes(self, batch: TextBatch) -> torch.Tensor:
        return self.student_logits(batch.texts).argmax(1)

    def step(self, batch: TextBatch) -> float:
        """One KD step on a batch of texts labelled by the teacher; returns the loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = scheduled_lr(self.cfg, self.steps_done, self.time_progress(), self.lr_scale)
        self.student.train()
        student_logits = self.student(**self.encode(batch.texts)).logits.float()
        teacher_logits = batch.logits.to(self.device)
        loss = kd_loss(student_logits, teacher_logits, self.cfg.loss, self.cfg.temperature, self.cfg.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.backward(loss)
        self.world.average_gradients(self.student.parameters())
        self.scaler.step(self.optimizer)
        self.last_majority = float(teacher_logits.argmax(1).bincount().max()) / len(batch)
        self.steps_done += 1
        return self.world.mean(float(loss.detach()))

    def select(self, batch: TextBatch, teacher_classes: torch.Tensor) -> float:
        """Agreement on the selection texts; the student is kept when it is within noise of the best
        agreement seen so far (:func:`dfkd_cli.kept.within_noise`)."""
        value = self.world.mean(float((self.student_classes(batch) == teacher_classes).float().mean()))
        self.kept.offer(value, len(batch), self.steps_done, self.student.state_dict())
        return value

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimizer, counters and the kept student."""
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps_done": self.steps_done, **self.kept.state_dict(), "lr_scale": self.lr_scale,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done, self.lr_scale = int(state["steps_done"]), float(state["lr_scale"])
        self.kept.load_state_dict(state)
        self.scaler.load_state_dict(state.get("scaler"))

    def restore_best(self) -> Any:
        return self.kept.restore(self.student)
