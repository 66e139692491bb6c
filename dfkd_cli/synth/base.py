"""The synthesizer interface and the in-memory synthetic pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from dfkd_cli.distributed import World

if TYPE_CHECKING:
    from dfkd_cli.prior import PriorData
    from dfkd_cli.teacher import Teacher

# Called after each synthesis iteration with (iteration, total, loss parts); returns True to stop early.
StepCallback = Callable[[int, int, dict[str, float]], bool]


def _never_stop(step: int, total: int, parts: dict[str, float]) -> bool:
    return False


def frozen_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode with its weights frozen for this pass: gradients reach ``x`` only
    (no weight gradients the model's own optimizer would have to discard), and the model's
    BatchNorm statistics, training mode and ``requires_grad`` flags are left as they were."""
    was_training = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        return model(x)
    finally:
        for module, mode in zip(model.modules(), was_training):
            module.training = mode
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)


class SyntheticPool:
    """Synthesized inputs kept as one tensor on the training device, sampled uniformly."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] = []
        self._data: torch.Tensor | None = None

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)

    def add(self, x: torch.Tensor) -> None:
        self._chunks.append(x.detach())
        self._data = None

    def tensor(self) -> torch.Tensor:
        if self._data is None:
            if not self._chunks:
                raise RuntimeError("the synthetic pool is empty: call synthesize() first")
            self._data = torch.cat(self._chunks)
            self._chunks = [self._data]
        return self._data

    def sample(self, n: int) -> torch.Tensor:
        data = self.tensor()
        index = torch.randint(len(data), (n,), device=data.device)
        return data[index]

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.tensor().cpu() if self._chunks else None}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self._chunks = [state["data"].to(device)] if state.get("data") is not None else []
        self._data = None


class Synthesizer:
    """Base class: subclasses set ``Config`` (a dataclass of settings) and ``loss_terms``.

    Example:
        >>> synth = NoiseSynthesizer(teacher, NoiseSynthesizer.Config(), {}, torch.device("cpu"))
        >>> synth.synthesize(); batch = synth.sample(64)
    """

    @dataclass
    class Config:
        batch_size: int = 256

    loss_terms: ClassVar[tuple[str, ...]] = ()
    requires_bn: ClassVar[bool] = False
    # Online synthesizers (a generator trained alongside the student) make each batch fresh from
    # their current state, so held-out samples are drawn along the run, not once at the start.
    online: ClassVar[bool] = False
    # Recipes that read unlabelled images from a related domain (``--prior``): the pipeline sets
    # ``self.prior`` (a :class:`dfkd_cli.prior.PriorData`) before the first ``synthesize()``;
    # ``prior_holdout``: the student is selected on prior images held out of the stream.
    # Whether the training data is ``self.pool`` (what ``--save-synthetic`` then saves); recipes that
    # make every batch fresh set it False and the pipeline records a sample of their batches instead.
    keeps_pool: ClassVar[bool] = True
    uses_prior: ClassVar[bool] = False
    prior_holdout: ClassVar[bool] = False

    def __init__(self, teacher: "Teacher", config: Any, loss: dict[str, float], device: torch.device) -> None:
        self.teacher = teacher
        self.config = config
        self.loss = dict(loss)
        self.device = device
        self.pool = SyntheticPool()
        self.on_step: StepCallback = _never_stop
        # Share of the run done (student steps or time budget, whichever is further), for schedules
        # that span the whole run; set by the pipeline.
        self.run_progress: Callable[[], float] = lambda: 0.0
        # The student being trained, set by the pipeline for terms that need its feedback (``adv``).
        self.student: torch.nn.Module | None = None
        self.prior: "PriorData | None" = None
        self.world = World()  # the processes of a distributed run (set by the pipeline)

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The live student's logits on ``x`` for adversarial terms, differentiable in ``x`` only
        (see :func:`frozen_logits`)."""
        if self.student is None:
            raise RuntimeError("this recipe's adversarial term needs the student: set synthesizer.student first")
        return frozen_logits(self.student, x)

    def prior_batch(self, n: int) -> torch.Tensor:
        """``n`` prior images on the synthesizer's device (recipes with ``uses_prior``)."""
        if self.prior is None:
            raise RuntimeError("this recipe needs prior images: set synthesizer.prior first")
        return self.prior.sample(n).to(self.device)

    def make_batch(self, n: int) -> torch.Tensor:
        """Synthesize ``n`` new inputs in the teacher's normalised input space."""
        raise NotImplementedError

    def synthesize(self) -> None:
        """Make more data: one batch of ``config.batch_size`` added to the pool."""
        self.pool.add(self.make_batch(self.config.batch_size))

    def sample(self, n: int) -> torch.Tensor:
        """A training batch of ``n`` inputs drawn from the pool."""
        return self.pool.sample(n)

    def preview(self, n: int) -> torch.Tensor:
        """Up to ``n`` distinct training inputs, for looking at (samples.png)."""
        data = self.pool.tensor()
        return data[torch.randperm(len(data), device=data.device)[:n]]

    def holdout(self, n: int) -> torch.Tensor:
        """``n`` inputs made the same way as training data but never added to the pool."""
        batches, made = [], 0
        while made < n:
            batch = self.make_batch(min(self.config.batch_size, n - made))
            batches.append(batch)
            made += len(batch)
        return torch.cat(batches)

    def status(self) -> dict[str, float]:
        """Numbers for the live display (e.g. the pool size or the generator's last losses)."""
        return {"pool": len(self.pool)}

    def scale_lr(self, factor: float) -> None:
        """Multiply every learning rate the synthesizer uses by ``factor`` (the divergence guard
        lowers it after a non-finite loss): its optimizers, their schedules' base rates, and
        ``config.lr`` for optimizers made per batch."""
        for value in vars(self).values():
            if isinstance(value, torch.optim.Optimizer):
                for group in value.param_groups:
                    group["lr"] *= factor
            elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
                value.base_lrs = [lr * factor for lr in value.base_lrs]
        if hasattr(self.config, "lr"):
            self.config.lr *= factor

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"], self.device)
