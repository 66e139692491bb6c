"""Online synthesizers: a generator trained alongside the student (DAFL, ZSKT, DFAD, DFQ).

Each ``synthesize()`` call makes ``g_steps`` Adam updates of the generator on fresh latent codes
(the recipe's loss, computed by the subclass in :meth:`generator_loss`); the student then trains
on ``sample(n)``, fresh generator output made without gradient. Nothing is pooled: every batch
is new, so ``holdout(n)`` and ``preview(n)`` are fresh samples too and never trained on.

Generator BatchNorm: the generator always runs in training mode, on batch statistics, in the
generator update and when sampling, as DAFL, ZSKT and DFAD do. Its last BatchNorm (no affine
parameters) standardises each batch onto the teacher's normalised input scale, so samples are
made in chunks of ``batch_size`` to keep that per-batch scale the one the generator was trained
at; the running statistics are kept but never used.

The student, when a loss term needs it, runs in eval mode with its weights frozen during the
generator's backward (see :meth:`Synthesizer.student_logits`): its BatchNorm
statistics are not moved by generator batches and no weight gradients are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.base import Capabilities, Synthesizer, SynthContext
from dfkd_cli.synth.generator import Generator, check_auto_int, resolve_generator_size

SCHEDULES = ("constant", "cosine", "step")
# "step" is DFAD's schedule: x0.1 at epochs 100 and 200 of 500, i.e. at 20% and 40% of the run.
STEP_MILESTONES = (0.2, 0.4)
# Largest preview made at once, in input elements (about 256 MB of float32 at 224x224).
PREVIEW_ELEMENTS = 2**26


@dataclass
class OnlineConfig:
    """Generator settings shared by the online recipes (each subclass sets its paper's defaults)."""

    batch_size: int | str = 256  # generator batch (samples are made in chunks of it); "auto": by input and device
    latent_dim: int = 100
    ngf: int | str = 64  # generator width; "auto": by input and device
    lr: float = 1e-3  # generator Adam learning rate
    g_steps: int = 1  # generator updates per synthesize() call (ZSKT's n_G)
    schedule: str = "constant"  # generator lr schedule: constant | cosine | step (x0.1 at 20% and 40%)
    schedule_steps: int = 0  # generator updates the cosine/step schedule spans; 0 = the whole run (steps or time budget)
    grad_clip: float = 0.0  # clip the generator's gradient to this l2 norm before each update; 0 = off

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise DfkdError(f"'synth.schedule' must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule_steps < 0:
            raise DfkdError(f"'synth.schedule_steps' must be 0 (follow the run) or positive, got {self.schedule_steps}")
        check_auto_int(self.batch_size, "synth.batch_size")
        check_auto_int(self.ngf, "synth.ngf")
        for name in ("latent_dim", "g_steps"):
            if getattr(self, name) < 1:
                raise DfkdError(f"'synth.{name}' must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise DfkdError(f"'synth.lr' must be positive, got {self.lr}")
        if not self.grad_clip >= 0:
            raise DfkdError(f"'synth.grad_clip' must be 0 (off) or a positive norm, got {self.grad_clip}")


def lr_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at ``progress`` (0 to 1) through the schedule."""
    if schedule == "constant":
        return 1.0
    progress = min(progress, 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.1 ** sum(progress >= m for m in STEP_MILESTONES)


class OnlineGeneratorSynthesizer(Synthesizer):
    """Base class: a generator updated by ``synthesize()`` and sampled fresh for every batch.

    Subclasses set ``Config`` (an :class:`OnlineConfig` with their paper's defaults), ``loss_terms``
    and :meth:`generator_loss`.
    """

    Config: ClassVar[type] = OnlineConfig
    capabilities = Capabilities(online=True, keeps_pool=False)
    # DAFL trains the student on the very batch of the generator update; ZSKT, DFAD and DFQ draw
    # a fresh batch for every student step.
    student_on_generator_batch: ClassVar[bool] = False

    def __init__(self, context: SynthContext, config: OnlineConfig, loss: dict[str, float]) -> None:
        super().__init__(context, config, loss)
        shape = self.teacher.input_shape
        self.size_note = resolve_generator_size(config, shape, self.device)
        self.generator = Generator(self.generator_input_dim(), config.ngf, shape).to(self.device).train()
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(config.schedule, self._schedule_progress(step)))
        self.updates = 0
        self.last_parts: dict[str, float] = {}
        self._generator_batch: torch.Tensor | None = None

    def _schedule_progress(self, step: int) -> float:
        if self.config.schedule_steps:
            return step / self.config.schedule_steps
        return self.hooks.progress()

    def generator_module(self) -> torch.nn.Module:
        return self.generator

    def generator_input_dim(self) -> int:
        """Width of the generator's input code (conditional generators add the label)."""
        return self.config.latent_dim

    def generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss the generator minimises on its batch ``x``, and each term's value."""
        raise NotImplementedError

    def latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.config.latent_dim, device=self.device)

    def synthesize(self) -> None:
        """``g_steps`` generator updates, each on a fresh batch; stops early when the run's hooks say so."""
        steps = self.config.g_steps
        for step in range(steps):
            self.generator.train()
            x = self.generator(self.latent(self.config.batch_size))
            loss, parts = self.generator_loss(x)
            self.update_generator(loss)
            self.scheduler.step()
            self.updates += 1
            self.last_parts = {**parts, "g_loss": float(loss.detach())}
            self._generator_batch = x.detach() if self.student_on_generator_batch else None
            if self.hooks.should_stop(step + 1, steps, self.last_parts):
                break

    def update_generator(self, loss: torch.Tensor) -> None:
        """One optimizer step of the generator on ``loss`` (gradient clipped with ``grad_clip``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.backward(loss)
        self.world.average_gradients(self.generator.parameters())  # one generator on every rank
        if self.config.grad_clip > 0:
            self.scaler.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)

    @torch.no_grad()
    def generate(self, n: int) -> torch.Tensor:
        """``n`` fresh samples, made in chunks of ``batch_size`` in training mode (see module doc)."""
        self.generator.train()
        chunks, made = [], 0
        while made < n:
            chunk = self.generator(self.latent(self.config.batch_size))[: n - made]
            chunks.append(chunk)
            made += len(chunk)
        return torch.cat(chunks)

    def sample(self, n: int) -> torch.Tensor:
        """A training batch: the last generator-update batch once where the paper trains the
        student on it (DAFL), else fresh samples."""
        batch, self._generator_batch = self._generator_batch, None
        if batch is not None and len(batch) >= n:
            return batch[:n]
        return self.generate(n)

    def holdout(self, n: int) -> torch.Tensor:
        return self.generate(n)

    def preview(self, n: int) -> torch.Tensor:
        per_sample = math.prod(self.teacher.input_shape)
        return self.generate(max(1, min(n, PREVIEW_ELEMENTS // per_sample)))

    def status(self) -> dict[str, float]:
        return {**self.last_parts, "lr_g": self.optimizer.param_groups[0]["lr"]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "updates": self.updates,
                "generator_batch": self._generator_batch, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.updates = int(state["updates"])
        self._generator_batch = state["generator_batch"]
        self.scaler.load_state_dict(state.get("scaler"))
