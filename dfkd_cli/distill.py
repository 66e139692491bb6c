"""The distillation loop: rounds of ``synthesize()`` and student steps, with held-out selection.

A :class:`Run` is one recipe's synthesizer and student trainer. :func:`start` draws (or starts
drawing) its held-out samples, :func:`train` runs rounds until a step count or a budget ends, and
:func:`finish` selects the student; a race (:mod:`dfkd_cli.race`) trains several runs for a slice
each and then continues the leader with the rest of the budget.

Example:
    >>> run = Run("dfad", recipe, synth, trainer)
    >>> start(run, budget, display); train(run, budget, display, until_step=recipe.train.steps)
    >>> holdout = finish(run, display)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Protocol


from dfkd_cli.batches import Batch
from dfkd_cli.config import RecipeConfig
from dfkd_cli.errors import DfkdError
from dfkd_cli.runtime import Budget, Display
from dfkd_cli.selection import FixedHoldout, Reservoir, Trainer, TrajectoryHoldout
from dfkd_cli.synth import Synthesizer


@dataclass
class Throughput:
    """Where a run's distillation time goes: synthesis (``synthesize()`` and ``sample()``) and
    student steps, with the new synthetic inputs made and the inputs the student trained on."""

    synthesis_s: float = 0.0
    student_s: float = 0.0
    made: int = 0
    trained: int = 0

    def to_dict(self) -> dict[str, float]:
        return {"synthesis_s": round(self.synthesis_s, 3), "student_s": round(self.student_s, 3),
                "synthetic_samples": self.made, "student_samples": self.trained,
                "synthetic_samples_per_s": round(self.made / self.synthesis_s, 1) if self.synthesis_s else 0.0,
                "student_samples_per_s": round(self.trained / self.student_s, 1) if self.student_s else 0.0}


@dataclass
class Run:
    """One recipe distilling: its synthesizer, trainer, held-out selector and agreement curve."""

    name: str
    recipe: RecipeConfig
    synth: Synthesizer
    trainer: Trainer  # a StudentTrainer, or a TextTrainer for text teachers
    selector: FixedHoldout | TrajectoryHoldout | None = None
    curve: list[float] = field(default_factory=list)  # held-out agreement at each evaluation
    recorder: Reservoir | None = None  # a uniform sample of the training batches (--save-synthetic)
    agreement: float = 0.0
    stage_prefix: str = ""  # before the display's stage names ("race dfad: " in a race)
    round_left: int = 0  # student steps left in the current round before the next synthesize()
    meter: Throughput = field(default_factory=Throughput)
    autocast: Callable[[], ContextManager[Any]] = nullcontext  # --precision for synthesis and student steps

    def state_dict(self) -> dict[str, Any]:
        """The run's whole training state (see :mod:`dfkd_cli.resume`)."""
        assert self.selector is not None, "start() the run first"
        return {"name": self.name, "trainer": self.trainer.state_dict(), "synth": self.synth.state_dict(),
                "selector": self.selector.state_dict(), "curve": list(self.curve), "agreement": self.agreement,
                "round_left": self.round_left,
                "recorder": self.recorder.state_dict() if self.recorder is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (the run is built from the same settings, not started)."""
        self.trainer.load_state_dict(state["trainer"])
        self.synth.load_state_dict(state["synth"])
        if self.selector is None and not self.synth.capabilities.online:  # built from the saved held-out samples
            self.selector = FixedHoldout.from_state(self.trainer, state["selector"])
        else:
            self.selector = self.selector or TrajectoryHoldout(self.synth, self.trainer, self.recipe.train.holdout)
            self.selector.load_state_dict(state["selector"])
        self.curve, self.agreement = list(state["curve"]), float(state["agreement"])
        self.round_left = int(state["round_left"])
        if self.recorder is not None and state["recorder"] is not None:
            self.recorder.load_state_dict(state["recorder"])


def wire(run: Run, budget: Budget) -> None:
    """Let the run's schedules and synthesis follow ``budget`` (and the recipe's step count)."""
    steps = max(run.recipe.train.steps, 1)
    run.trainer.follow_clock(budget.fraction)
    run.synth.hooks.follow(progress=lambda: max(run.trainer.steps_done / steps, budget.fraction()),
                           stop=lambda it, total, parts: budget.expired())


def start(run: Run, budget: Budget, display: Display) -> None:
    """Wire the run to ``budget`` and set up its held-out samples: made now (at most a quarter of
    the budget) for pool recipes, drawn along the run for online ones."""
    cfg = run.recipe.train
    wire(run, budget)
    if run.synth.capabilities.online:
        run.selector = TrajectoryHoldout(run.synth, run.trainer, cfg.holdout)
    else:
        batch = getattr(run.synth.config, "batch_size", cfg.holdout)
        batches = -(-max(cfg.holdout, 2) // batch) if isinstance(batch, int) else 1
        quarter = budget.left() / 4 if budget.left() is not None else None
        display.stage(f"{run.stage_prefix}holdout", total=batches * getattr(run.synth.config, "iterations", 1),
                      seconds_left=quarter)
        run.selector = FixedHoldout.make(run.synth, run.trainer, cfg.holdout, budget,
                                         lambda it, total, parts: display.advance(1, **parts))
        run.selector.evaluate()  # the starting student is a candidate too (a text bert-N starts as the teacher's layers)


class StepWatch(Protocol):
    """Watches a run (see :class:`dfkd_cli.supervise.Supervisor`): ``begin`` loads a resumed state
    or checkpoints the start, ``after_step`` follows every student step, ``end`` handles a stop."""

    resuming: bool

    def begin(self, run: Run) -> None: ...

    def after_step(self, run: Run, loss: float) -> None: ...

    def end(self, run: Run) -> None: ...


def train(run: Run, budget: Budget, display: Display, until_step: int, watch: StepWatch | None = None) -> None:
    """Rounds of ``synthesize()`` and ``train.steps_per_round`` student steps until the trainer has
    made ``until_step`` steps or ``budget`` ends (or a stop is requested)."""
    cfg, trainer, synth = run.recipe.train, run.trainer, run.synth
    assert run.selector is not None, "start() the run first"
    meter = run.meter
    while trainer.steps_done < until_step and not budget.expired():
        began = time.perf_counter()
        with run.autocast():
            if run.round_left <= 0:
                pooled = len(synth.pool)
                synth.synthesize()
                meter.made += len(synth.pool) - pooled
                run.round_left = cfg.steps_per_round
            batch = synth.sample(cfg.batch_size)
        meter.made += 0 if synth.capabilities.keeps_pool else len(batch)  # fresh batches are made by sample()
        if run.recorder is not None:
            run.recorder.add(batch)
        sampled = time.perf_counter()
        with run.autocast():
            loss = trainer.step(batch)
        meter.synthesis_s += sampled - began
        meter.student_s += time.perf_counter() - sampled
        meter.trained += len(batch)
        run.round_left -= 1
        if trainer.steps_done % cfg.eval_every == 0:
            run.agreement = run.selector.evaluate()
            run.curve.append(run.agreement)
        display.advance(1, kd=loss, agreement=run.agreement, **trainer.last_parts, **synth.status())
        if watch is not None:
            watch.after_step(run, loss)
        budget.settle()


def finish(run: Run, display: Display) -> Batch:
    """Select the student; returns the held-out samples (first half: selection, second: report)."""
    assert run.selector is not None, "start() the run first"
    if run.trainer.steps_done == 0:
        raise DfkdError("the time budget ended before the first student step; give a longer --time-budget", exit_code=3)
    holdout, run.agreement = run.selector.finish()
    display.advance(0, agreement=run.agreement)
    return holdout


def distill(run: Run, budget: Budget, display: Display, watch: StepWatch | None = None) -> Batch:
    """A whole single-recipe run: start (or resume), train to ``train.steps`` or the budget, finish."""
    if watch is not None and watch.resuming:
        wire(run, budget)
    else:
        start(run, budget, display)
    if watch is not None:
        watch.begin(run)
    display.stage(f"{run.stage_prefix}distill", total=run.recipe.train.steps, seconds_left=budget.left())
    display.advance(run.trainer.steps_done)
    train(run, budget, display, run.recipe.train.steps, watch)
    if watch is not None:
        watch.end(run)
    if budget.expired():
        display.log(f"time budget reached after {run.trainer.steps_done} student steps")
    return finish(run, display)
