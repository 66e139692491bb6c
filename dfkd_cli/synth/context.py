"""What a synthesizer is given and what it declares: :class:`SynthContext` carries everything it
needs, once, at construction; :class:`Capabilities` is what it can do, declared on its class.

Nothing is set on a synthesizer after it is built. What changes during a run (how far along it is,
when synthesis should stop) lives in the context's :class:`RunHooks`, which the run controls:
``distill`` points them at the budget, held-out samples are made under a quarter-budget stop inside
``hooks.stopping_when(...)``, and the probe times iterations the same way.

Example:
    >>> context = SynthContext(teacher, torch.device("cpu"), student=StudentView(student))
    >>> synth = DeepInversionSynthesizer(context, DeepInversionSynthesizer.Config(), {"ce": 1.0})
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from dfkd_cli.distributed import World
from dfkd_cli.precision import Precision

if TYPE_CHECKING:
    from dfkd_cli.prior import PriorData

# Called after each synthesis iteration with (iteration, total, loss parts); returns True to stop early.
StepCallback = Callable[[int, int, dict[str, float]], bool]


def never_stop(step: int, total: int, parts: dict[str, float]) -> bool:
    """The stop check of a synthesizer outside a run: synthesis always runs to its end."""
    return False


def no_progress() -> float:
    """The progress of a synthesizer outside a run: always at the start."""
    return 0.0


def ignore_note(note: str) -> None:
    """The spill callback when nobody shows notes."""


@dataclass(frozen=True)
class Capabilities:
    """What a synthesizer class can do and needs; the pipeline reads nothing else about it.

    ``requires_bn``: the teacher must have BatchNorm layers. ``online``: a generator trained
    alongside the student makes each batch fresh from its current state, so held-out samples are
    drawn along the run, not once at the start. ``keeps_pool``: the training data is ``pool``
    (what ``--save-synthetic`` saves); False for recipes that make every batch fresh, whose
    batches the pipeline samples instead. ``uses_prior``: reads unlabelled images from a related
    domain (``--prior``, given as ``context.prior``). ``prior_holdout``: the student is selected
    on prior images held out of the stream.
    """

    requires_bn: bool = False
    online: bool = False
    keeps_pool: bool = True
    uses_prior: bool = False
    prior_holdout: bool = False


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


class StudentView:
    """The live student as a synthesizer may use it: logits differentiable in the input only."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The student's current logits on ``x`` (see :func:`frozen_logits`)."""
        return frozen_logits(self._model, x)


class RunHooks:
    """How far the run is and when synthesis should stop, as the run currently says.

    A synthesizer only asks (:meth:`progress`, :meth:`should_stop`); the run sets what they answer
    (:meth:`follow` when it starts or resumes, :meth:`stopping_when` for a stretch of synthesis
    under another stop rule).
    """

    def __init__(self, progress: Callable[[], float] = no_progress, stop: StepCallback = never_stop) -> None:
        self._progress = progress
        self._stop = stop

    def progress(self) -> float:
        """Share of the run done (student steps or time budget), for schedules spanning the run."""
        return self._progress()

    def should_stop(self, iteration: int, total: int, parts: dict[str, float]) -> bool:
        """Called after each synthesis iteration (1-based, of ``total``, with its loss ``parts``):
        True asks the synthesizer to stop early."""
        return self._stop(iteration, total, parts)

    def follow(self, progress: Callable[[], float], stop: StepCallback) -> None:
        """From now on answer with the run's ``progress`` and ``stop`` rule."""
        self._progress, self._stop = progress, stop

    @contextlib.contextmanager
    def stopping_when(self, stop: StepCallback) -> Iterator[None]:
        """Inside the block, ``stop`` replaces the stop rule (e.g. held-out samples made under a
        quarter of the budget, the probe's timed iterations); the previous rule is back after it."""
        previous, self._stop = self._stop, stop
        try:
            yield
        finally:
            self._stop = previous


@dataclass(frozen=True)
class SynthContext:
    """Everything a synthesizer is given, once, at construction.

    ``precision``: autocast and loss scaling of its own backward passes; ``world``: the processes of
    a distributed run (generators average their gradients over it); ``prior``: ``--prior`` images
    for recipes with ``uses_prior``; ``student``: the student being trained, for adversarial terms;
    ``pool_memory_limit`` and ``on_spill``: the synthetic pool's bytes in memory before older
    samples spill to disk, and who hears about it; ``hooks``: progress and stop rule of the run;
    ``language_models``: the ``(model, tokenizer)`` pairs text recipes read (``"generator"``,
    ``"prompter"``); for text, ``prior`` is the ``--prior`` corpus and ``teacher`` a text teacher.
    """

    teacher: Any  # dfkd_cli.teacher.Teacher (Any: tests hand in stand-ins)
    device: torch.device
    precision: Precision = field(default_factory=Precision)
    world: World = field(default_factory=World)
    prior: "PriorData | Any" = None
    student: StudentView | None = None
    pool_memory_limit: int | None = None
    on_spill: Callable[[str], None] = ignore_note
    hooks: RunHooks = field(default_factory=RunHooks)
    language_models: dict[str, tuple[Any, Any]] = field(default_factory=dict)
