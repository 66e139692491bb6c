"""The student trainer: knowledge distillation on synthesizer batches.

The KD loss is KL(teacher || student) at temperature T scaled by T^2 (Hinton et al.), or the
mean absolute logit difference where a paper says so (``train.loss = "l1"``), plus, with
``train.attention`` > 0, attention transfer between matching block stages (Zagoruyko & Komodakis,
ICLR 2017; ZSKT's beta). ``train.update`` adds a retention term on a memory of earlier batches
(``replay``, ``lra``: see :mod:`dfkd_cli.retention`). The student is selected on agreement with
the teacher over held-out synthetic samples, never on real data: the latest one within one
standard error of the best agreement seen (:mod:`dfkd_cli.kept`).

Example:
    >>> trainer = StudentTrainer(student, teacher.model, TrainConfig(steps=100), torch.device("cpu"))
    >>> loss = trainer.step(synth.sample(128))
"""

from __future__ import annotations

import copy
import math
import re
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.checkpoint import with_module_versions
from dfkd_cli.config import TrainConfig
from dfkd_cli.distributed import World
from dfkd_cli.kept import KeptStudent
from dfkd_cli.precision import Precision, channels_last
from dfkd_cli.retention import MemoryBank, lra_stepped_params, retention_loss

# Stages whose outputs attention transfer compares: ``layer1..N`` (CIFAR and torchvision ResNets),
# ``block1..N`` (WRN) or ``block0..N`` (CIFAR VGG), direct children of the model.
_BLOCK_NAME = re.compile(r"(?:layer|block)(\d+)")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str, temperature: float,
            alpha: float = 0.0) -> torch.Tensor:
    """Distillation loss between student and teacher logits; with ``alpha`` > 0,
    ``alpha * CE(student, teacher argmax) + (1 - alpha) * KD`` (PromptDFD's Eq. 1).
    Computed in fp32 also under autocast: at T = 20 a half-precision softmax's rounding, times T^2,
    made the KL divergence negative."""
    with torch.autocast(student_logits.device.type, enabled=False):
        return _kd_loss_fp32(student_logits.float(), teacher_logits.float(), loss, temperature, alpha)


def _kd_loss_fp32(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str, temperature: float,
                  alpha: float) -> torch.Tensor:
    if loss == "l1":
        soft = F.l1_loss(student_logits, teacher_logits)
    else:
        t = temperature
        log_p_student = F.log_softmax(student_logits / t, dim=1)
        p_teacher = F.softmax(teacher_logits / t, dim=1)
        soft = F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t
    if alpha <= 0:
        return soft
    return alpha * F.cross_entropy(student_logits, teacher_logits.argmax(1)) + (1 - alpha) * soft


def scheduled_lr(cfg: TrainConfig, step: int, time_progress: float = 0.0, scale: float = 1.0) -> float:
    """The student's learning rate at ``step``: constant, or cosine over the run's steps or its
    time budget, whichever is further along."""
    lr = cfg.lr * scale
    if cfg.schedule == "constant":
        return lr
    progress = max(step / max(cfg.steps, 1), time_progress)
    return 0.5 * lr * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def mixup(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Each sample blended with another of the batch, its share drawn from Beta(alpha, alpha): the
    teacher labels the blend, so a small pool gives many more distinct inputs (function matching,
    Beyer et al., CVPR 2022)."""
    share = torch.distributions.Beta(alpha, alpha).sample((len(x),)).to(x.device, x.dtype)
    share = share.view(-1, *([1] * (x.dim() - 1)))
    return share * x + (1 - share) * x[torch.randperm(len(x), device=x.device)]


def block_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's block stages (direct children named ``layerN`` or ``blockN``), in order."""
    stages = [(int(match.group(1)), name, module) for name, module in model.named_children()
              if (match := _BLOCK_NAME.fullmatch(name))]
    return [(name, module) for _, name, module in sorted(stages, key=lambda s: s[0])]


def attention_map(activation: torch.Tensor) -> torch.Tensor:
    """Spatial attention (Zagoruyko & Komodakis): the mean over channels of the squared
    activation, flattened per sample and scaled to unit l2 norm."""
    return F.normalize(activation.pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor]) -> torch.Tensor:
    """Sum over blocks of ||a_s/||a_s|| - a_t/||a_t|| ||^2, divided by the map size and the batch
    size as Zagoruyko & Komodakis normalise it (the scale ZSKT's beta = 250 is set for)."""
    terms = [(attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student_outputs, teacher_outputs)]
    return torch.stack(terms).sum()


class BlockOutputs:
    """Forward hooks that keep the outputs of ``modules``; they exist only inside the context."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.outputs: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "BlockOutputs":
        self.outputs = [torch.empty(0)] * len(self.modules)
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(
                lambda mod, inputs, output, index=index: self.outputs.__setitem__(index, output)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class AttentionTransfer:
    """Pairs the block stages of teacher and student for the attention term. ``note`` says, in one
    line, whether the term is on and why not when it was asked for and cannot apply."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float) -> None:
        self.weight = weight
        teacher_stages, student_stages = block_stages(teacher), block_stages(student)
        self.teacher_blocks = [module for _, module in teacher_stages]
        self.student_blocks = [module for _, module in student_stages]
        self.active = weight > 0 and len(teacher_stages) == len(student_stages) > 0
        self._sizes_checked = False
        pair = f"teacher ({type(teacher).__name__}) and student ({type(student).__name__})"
        if weight <= 0:
            self.note = ""
        elif not self.active:
            self.note = (f"attention transfer off: {pair} have no matching blocks ({len(teacher_stages)} and "
                         f"{len(student_stages)} block stages named layerN/blockN)")
        else:
            names = ", ".join(name for name, _ in student_stages)
            self.note = f"attention transfer on (beta {weight:g}) over {len(student_stages)} block stages: {names}"

    def teacher_outputs(self) -> BlockOutputs | nullcontext:
        return BlockOutputs(self.teacher_blocks) if self.active else nullcontext()

    def student_outputs(self) -> BlockOutputs | nullcontext:
        return BlockOutputs(self.student_blocks) if self.active else nullcontext()

    def loss(self, student: BlockOutputs, teacher: BlockOutputs) -> torch.Tensor | None:
        """beta * attention loss, or None when off (turned off here if the map sizes differ)."""
        if not self.active:
            return None
        if not self._sizes_checked:
            self._sizes_checked = True
            s_sizes = [tuple(o.shape[-2:]) for o in student.outputs]
            t_sizes = [tuple(o.shape[-2:]) for o in teacher.outputs]
            if s_sizes != t_sizes or any(o.dim() != 4 for o in student.outputs + teacher.outputs):
                self.active = False
                self.note = f"attention transfer off: block output sizes differ (teacher {t_sizes}, student {s_sizes})"
                return None
        return self.weight * attention_loss(student.outputs, teacher.outputs)


@torch.inference_mode()
def predict_classes(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Top-1 predictions of ``model`` (in eval mode) on ``x``, batched."""
    was_training = model.training
    model.eval()
    preds = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return preds


class StudentTrainer:
    """Updates the student on synthetic batches and keeps the latest one within noise of the best
    held-out agreement seen."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: TrainConfig, device: torch.device,
                 input_shape: tuple[int, int, int] | None = None, precision: Precision | None = None,
                 world: World | None = None) -> None:
        self.student = student.to(device).train()
        if cfg.channels_last:
            channels_last(self.student)
        self.scaler = (precision or Precision()).scaler()  # loss scaling for fp16
        self.teacher = teacher
        self.cfg = cfg
        self.attention = AttentionTransfer(self.student, teacher, cfg.attention)
        if input_shape is not None and self.attention.active:
            self._probe_attention(torch.zeros(2, *input_shape, device=device))
        self.optimizer = self._make_optimizer()
        self.steps_done = 0
        self.kept = KeptStudent()
        self._snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        # Fraction of the run's time budget used (see follow_clock): with a time budget the
        # schedule follows whichever of steps and time runs out first.
        self.time_progress: Callable[[], float] = lambda: 0.0
        # Earlier batches for the retention term (replay, lra); None for plain updates.
        self.memory = MemoryBank(cfg.memory_size) if cfg.update != "plain" else None
        # The last step's loss terms for the live display: {"acq", "ret"} with replay/lra ("ret" is
        # 0.0 while the memory is empty), {} for plain updates.
        self.last_parts: dict[str, float] = {}
        # Multiplies the learning rate; lowered by the divergence guard after a non-finite loss.
        self.lr_scale = 1.0
        # Share of the last batch the teacher put in its most frequent class (collapse watch).
        self.last_majority = 0.0
        self.world = world or World()  # the processes of a distributed run

    def follow_clock(self, fraction: Callable[[], float]) -> None:
        """From now on the learning-rate schedule also follows ``fraction`` (the share of the run's
        time budget used; a race slice or the whole budget)."""
        self.time_progress = fraction

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.cfg, self.student.parameters()
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)

    def _lr_at(self, step: int) -> float:
        return scheduled_lr(self.cfg, step, self.time_progress(), self.lr_scale)

    def step(self, x: torch.Tensor) -> float:
        """One KD step on batch ``x`` (augmented here); returns the total loss. With replay/lra the
        augmented batch then joins the memory."""
        x = augment(x.float(), self.cfg.crop_pad, self.cfg.flip)  # generators under autocast make bf16
        if self.cfg.mixup > 0:
            x = mixup(x, self.cfg.mixup)
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(self.steps_done)
        loss = self.loss_for(x)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.backward(loss)
        self.world.average_gradients(self.student.parameters())
        self.scaler.step(self.optimizer)
        self.world.share_buffers(self.student)
        if self.memory is not None:
            self.memory.add(x)
        self.steps_done += 1
        return self.world.mean(float(loss.detach()))

    def loss_for(self, x: torch.Tensor) -> torch.Tensor:
        """The student's loss on the (already augmented) batch ``x``, before backward: L_acq, plus
        the retention term of ``train.update`` once the memory holds samples. Updates nothing but
        ``last_parts`` (and BatchNorm running stats in train mode)."""
        acquisition = self._acquisition_loss(x)
        if self.memory is None:
            return acquisition
        retention = self._retention_loss(acquisition) if len(self.memory) else acquisition.new_zeros(())
        self.last_parts = {"acq": float(acquisition.detach()), "ret": float(retention.detach())}
        return acquisition + retention

    def _acquisition_loss(self, x: torch.Tensor) -> torch.Tensor:
        """KD (plus attention transfer) against the teacher on the fresh batch ``x``."""
        with torch.inference_mode(), self.attention.teacher_outputs() as teacher_blocks:
            teacher_logits = self.teacher(x)
            self.last_majority = float(teacher_logits.argmax(1).bincount().max()) / len(x)
        teacher_logits = teacher_logits.clone()  # an inference tensor cannot be saved for backward (l1 saves it)
        with self.attention.student_outputs() as student_blocks:
            student_logits = self.student(x)
        loss = kd_loss(student_logits, teacher_logits, self.cfg.loss, self.cfg.temperature, self.cfg.alpha)
        attention = self.attention.loss(student_blocks, teacher_blocks)
        return loss if attention is None else loss + attention

    def _retention_loss(self, acquisition: torch.Tensor) -> torch.Tensor:
        """L_ret on a memory batch: at theta (replay) or after lra's inner step on ``acquisition``."""
        assert self.memory is not None
        cfg = self.cfg
        x_memory = self.memory.sample(cfg.memory_batch or cfg.batch_size)
        stepped = None
        if cfg.update == "lra":
            alpha = cfg.lra_inner_lr or self.optimizer.param_groups[0]["lr"]
            stepped = lra_stepped_params(acquisition, dict(self.student.named_parameters()), alpha, cfg.lra_order)
        return retention_loss(self.student, self.teacher, x_memory,
                              lambda s, t: kd_loss(s, t, cfg.loss, cfg.temperature, cfg.alpha), stepped)

    @property
    def attention_note(self) -> str:
        """One line on attention transfer when ``train.attention`` > 0 (on, or off and why); else ""."""
        return self.attention.note

    @torch.no_grad()
    def _probe_attention(self, x: torch.Tensor) -> None:
        """Settle whether the block output sizes match before training (eval mode: no BN updates)."""
        was_training = self.student.training
        self.student.eval()
        with self.attention.teacher_outputs() as teacher_blocks:
            self.teacher(x)
        with self.attention.student_outputs() as student_blocks:
            self.student(x)
        self.attention.loss(student_blocks, teacher_blocks)
        self.student.train(was_training)

    def teacher_classes(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's top-1 classes on ``x``."""
        return predict_classes(self.teacher, x)

    def student_classes(self, x: torch.Tensor) -> torch.Tensor:
        """The current student's top-1 classes on ``x``."""
        return predict_classes(self.student, x)

    def select(self, x: torch.Tensor, teacher_classes: torch.Tensor) -> float:
        """Agreement with the teacher on held-out ``x``; the student is kept when it is within noise
        of the best agreement seen so far (:func:`dfkd_cli.kept.within_noise`)."""
        agreement = self.world.mean(float((predict_classes(self.student, x) == teacher_classes).float().mean()))
        self.kept.offer(agreement, len(x), self.steps_done, self.student.state_dict())
        return agreement

    def snapshot(self, keep: int = 16) -> None:
        """Keep the current weights on the CPU as a candidate for :meth:`select_snapshot`. Past
        ``keep`` snapshots every other older one is dropped, so they stay spread over the run."""
        state = with_module_versions(  # the module versions too: MNASNet cannot load weights without them
            self.student, {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()})
        self._snapshots.append((self.steps_done, state))
        if len(self._snapshots) > keep:
            self._snapshots = self._snapshots[::-2][::-1]  # every other one, ending with the latest

    def select_snapshot(self, x: torch.Tensor, teacher_classes: torch.Tensor) -> float:
        """Choose the latest snapshot within noise of the best agreement with the teacher on
        held-out ``x`` (:func:`dfkd_cli.kept.within_noise`) and make it the kept student; returns its agreement."""
        if not self._snapshots:
            raise RuntimeError("no snapshots to select from: call snapshot() first")
        current = copy.deepcopy(self.student.state_dict())
        scored = []
        for step, state in self._snapshots:
            self.student.load_state_dict(state)
            agreement = self.world.mean(float((predict_classes(self.student, x) == teacher_classes).float().mean()))
            scored.append((agreement, step, state))
        self.student.load_state_dict(current)
        return self.kept.choose(scored, len(x))

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: weights, optimizer, counters, selection candidates, memory."""
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps_done": self.steps_done, **self.kept.state_dict(),
                "snapshots": [list(s) for s in self._snapshots],
                "memory": self.memory.state_dict() if self.memory is not None else None, "lr_scale": self.lr_scale,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_done, self.lr_scale = int(state["steps_done"]), float(state["lr_scale"])
        self.kept.load_state_dict(state)
        self._snapshots = [(int(step), weights) for step, weights in state["snapshots"]]
        if self.memory is not None and state["memory"] is not None:
            self.memory.load_state_dict(state["memory"])
        self.scaler.load_state_dict(state.get("scaler"))

    def restore_best(self) -> nn.Module:
        """Load the best selected weights into the student, in eval mode, and return it."""
        return self.kept.restore(self.student)
