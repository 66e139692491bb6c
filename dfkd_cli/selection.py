"""Choosing the student to ship on held-out synthetic samples, never on real data.

Two ways, by kind of synthesizer:

- ``FixedHoldout``: synthesizers whose batches do not depend on the training run (DeepInversion,
  ZSKD, noise...) make the held-out samples once, before training; at each evaluation the trainer
  keeps the student when it is within noise of the best agreement seen (``kept.within_noise``).
- ``TrajectoryHoldout``: online synthesizers (a generator trained alongside the student) change
  what they make as the run goes on, so samples drawn at the start would come from an untrained
  generator. At each evaluation a few fresh samples (never trained on) join a uniform reservoir
  over the whole run and the student is snapshotted; at the end every snapshot is scored on the
  same reservoir and the latest within noise of the best wins.

In both, the first half of the held-out samples selects the student and the second half is what
the report measures, so the reported agreement is not the one that was maximised.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from dfkd_cli.batches import Batch, batch_from_state, batch_state
from dfkd_cli.distributed import World
from dfkd_cli.kept import KeptStudent
from dfkd_cli.runtime import Budget
from dfkd_cli.trainer import StudentTrainer


@runtime_checkable
class Trainer(Protocol):
    """What a run asks of a student trainer, whatever its batch type (images:
    :class:`dfkd_cli.trainer.StudentTrainer`; text: :class:`dfkd_cli.text.trainer.TextTrainer`)."""

    student: Any
    steps_done: int
    kept: KeptStudent  # the student selection keeps (dfkd_cli.kept)
    lr_scale: float  # lowered by the divergence guard
    last_parts: dict[str, float]  # the last step's loss terms, for the display
    last_majority: float  # share of the last batch in the teacher's most frequent class (collapse watch)
    world: World
    scaler: Any

    def follow_clock(self, fraction: Callable[[], float]) -> None: ...

    def step(self, batch: Any) -> float: ...

    def teacher_classes(self, batch: Any) -> torch.Tensor: ...

    def student_classes(self, batch: Any) -> torch.Tensor: ...

    def select(self, batch: Any, teacher_classes: torch.Tensor) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def restore_best(self) -> Any: ...


def stability(curve: list[float]) -> dict[str, float | int] | None:
    """Stability of learning over the run (Patel et al., CVPR 2023): the mean, variance and
    maximum of the held-out synthetic agreement at each evaluation, in percent (variance in
    percent squared); ``None`` before the first evaluation.

    Example:
        >>> stability([0.5, 0.7])
        {'evaluations': 2, 'mean': 60.0, 'variance': 100.0, 'max': 70.0}
    """
    if not curve:
        return None
    values = torch.tensor(curve, dtype=torch.float64) * 100
    variance = float(values.var(correction=0)) if len(values) > 1 else 0.0
    return {"evaluations": len(curve), "mean": round(float(values.mean()), 4), "variance": round(variance, 4),
            "max": round(float(values.max()), 4)}


class Reservoir:
    """A uniform sample of fixed size over everything ever added (Vitter's algorithm R)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.data: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, batch: torch.Tensor) -> None:
        """Algorithm R for each sample of ``batch``, vectorised: sample t (0-based over everything
        seen) takes slot t while the reservoir fills, else a slot drawn from 0..t if it is < capacity."""
        if len(batch) == 0:
            return
        if self.data is None:
            self.data = batch.new_empty(self.capacity, *batch.shape[1:])
        t = self.seen + torch.arange(len(batch))
        slots = torch.where(t < self.capacity, t, (torch.rand(len(batch)) * (t + 1)).long())
        keep = slots < self.capacity
        self.data[slots[keep].to(self.data.device)] = batch.detach()[keep.to(batch.device)]
        self.seen += len(batch)

    def tensor(self) -> torch.Tensor:
        if self.data is None:
            raise RuntimeError("the reservoir is empty")
        return self.data[: min(self.seen, self.capacity)]

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "data": self.data}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.data = int(state["seen"]), state["data"]


def split(holdout: Batch) -> tuple[Batch, Batch]:
    """(selection half, report half) of the held-out samples."""
    half = len(holdout) // 2
    return holdout[:half], holdout[half:]


class FixedHoldout:
    """Held-out samples made once up front, using at most a quarter of the time budget."""

    def __init__(self, trainer: Trainer, holdout: Batch) -> None:
        self.trainer = trainer
        self._hold(holdout)

    def _hold(self, holdout: Batch) -> None:
        self.holdout = holdout
        self.x_select = split(holdout)[0]
        self.t_select = self.trainer.teacher_classes(self.x_select)

    @classmethod
    def from_state(cls, trainer: Trainer, state: dict[str, Any]) -> "FixedHoldout":
        """The selector a checkpoint saved (see :meth:`state_dict`)."""
        return cls(trainer, batch_from_state(state["holdout"]))

    @classmethod
    def make(cls, synth, trainer: Trainer, size: int, budget: Budget, on_step) -> "FixedHoldout":
        """Synthesize ``size`` held-out samples now, stopping at a quarter of ``budget`` (``on_step``
        sees every synthesis iteration); the run's own stop rule is back afterwards."""
        quarter = budget.part(budget.seconds / 4 if budget.seconds else None, shared=False)
        with synth.hooks.stopping_when(lambda it, total, parts: on_step(it, total, parts) or quarter.expired()):
            holdout = synth.holdout(max(size, 2))
        return cls(trainer, holdout)

    def state_dict(self) -> dict[str, Any]:
        return {"holdout": batch_state(self.holdout)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._hold(batch_from_state(state["holdout"]))

    def evaluate(self) -> float:
        return self.trainer.select(self.x_select, self.t_select)

    def selection_samples(self) -> Batch:
        """The held-out samples that select the student (the other half is reported)."""
        return self.x_select

    def finish(self) -> tuple[Batch, float]:
        return self.holdout, self.evaluate()


class TrajectoryHoldout:
    """Held-out samples drawn from an online synthesizer along the run; selection at the end."""

    def __init__(self, synth, trainer: StudentTrainer, size: int) -> None:
        self.synth = synth
        self.trainer = trainer
        self.reservoir = Reservoir(max(size, 2))
        self.per_evaluation = max(2, size // 8)

    def _draw(self) -> None:
        self.reservoir.add(self.synth.holdout(self.per_evaluation))
        self.trainer.snapshot()

    def evaluate(self) -> float:
        """Add fresh samples and a snapshot; the agreement of the current student so far."""
        self._draw()
        x = split(self.reservoir.tensor())[0] if self.reservoir.seen >= 2 else self.reservoir.tensor()
        teacher = self.trainer.teacher_classes(x)
        return self.trainer.world.mean(float((self.trainer.student_classes(x) == teacher).float().mean()))

    def state_dict(self) -> dict[str, Any]:
        return {"reservoir": self.reservoir.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reservoir.load_state_dict(state["reservoir"])

    def selection_samples(self) -> torch.Tensor:
        """The selection half of the samples drawn so far (at least one draw: the current student's)."""
        if self.reservoir.seen < 2:
            self._draw()
        return split(self.reservoir.tensor())[0]

    def finish(self) -> tuple[torch.Tensor, float]:
        self._draw()
        holdout = self.reservoir.tensor()
        x_select = split(holdout)[0]
        agreement = self.trainer.select_snapshot(x_select, self.trainer.teacher_classes(x_select))
        return holdout, agreement
