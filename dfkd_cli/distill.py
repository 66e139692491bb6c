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

from dataclasses import dataclass, field

import torch

from dfkd_cli.config import RecipeConfig
from dfkd_cli.errors import DfkdError
from dfkd_cli.runtime import Budget, Display
from dfkd_cli.selection import FixedHoldout, Reservoir, TrajectoryHoldout
from dfkd_cli.synth import Synthesizer
from dfkd_cli.trainer import StudentTrainer


@dataclass
class Run:
    """One recipe distilling: its synthesizer, trainer, held-out selector and agreement curve."""

    name: str
    recipe: RecipeConfig
    synth: Synthesizer
    trainer: StudentTrainer
    selector: FixedHoldout | TrajectoryHoldout | None = None
    curve: list[float] = field(default_factory=list)  # held-out agreement at each evaluation
    recorder: Reservoir | None = None  # a uniform sample of the training batches (--save-synthetic)
    agreement: float = 0.0
    stage_prefix: str = ""  # before the display's stage names ("race dfad: " in a race)


def wire(run: Run, budget: Budget) -> None:
    """Let the run's schedules and synthesis follow ``budget`` (and the recipe's step count)."""
    steps = max(run.recipe.train.steps, 1)
    run.trainer.time_progress = budget.fraction
    run.synth.run_progress = lambda: max(run.trainer.steps_done / steps, budget.fraction())
    run.synth.on_step = lambda it, total, parts: budget.expired()


def start(run: Run, budget: Budget, display: Display) -> None:
    """Wire the run to ``budget`` and set up its held-out samples: made now (at most a quarter of
    the budget) for pool recipes, drawn along the run for online ones."""
    cfg = run.recipe.train
    wire(run, budget)
    if run.synth.online:
        run.selector = TrajectoryHoldout(run.synth, run.trainer, cfg.holdout)
    else:
        display.stage(f"{run.stage_prefix}holdout", total=None)
        run.selector = FixedHoldout(run.synth, run.trainer, cfg.holdout, budget,
                                    lambda it, total, parts: display.advance(1, **parts))
    wire(run, budget)  # FixedHoldout stops synthesis at its own quarter; training follows the budget


def train(run: Run, budget: Budget, display: Display, until_step: int) -> None:
    """Rounds of ``synthesize()`` and ``train.steps_per_round`` student steps until the trainer has
    made ``until_step`` steps or ``budget`` ends."""
    cfg, trainer, synth = run.recipe.train, run.trainer, run.synth
    assert run.selector is not None, "start() the run first"
    while trainer.steps_done < until_step and not budget.expired():
        synth.synthesize()
        for _ in range(min(cfg.steps_per_round, until_step - trainer.steps_done)):
            batch = synth.sample(cfg.batch_size)
            if run.recorder is not None:
                run.recorder.add(batch)
            loss = trainer.step(batch)
            if trainer.steps_done % cfg.eval_every == 0:
                run.agreement = run.selector.evaluate()
                run.curve.append(run.agreement)
            display.advance(1, kd=loss, agreement=run.agreement, **trainer.last_parts, **synth.status())
            if budget.expired():
                break


def finish(run: Run, display: Display) -> torch.Tensor:
    """Select the student; returns the held-out samples (first half: selection, second: report)."""
    assert run.selector is not None, "start() the run first"
    if run.trainer.steps_done == 0:
        raise DfkdError("the time budget ended before the first student step; give a longer --time-budget", exit_code=3)
    holdout, run.agreement = run.selector.finish()
    display.advance(0, agreement=run.agreement)
    return holdout


def distill(run: Run, budget: Budget, display: Display) -> torch.Tensor:
    """A whole single-recipe run: start, train to ``train.steps`` or the budget, finish."""
    start(run, budget, display)
    display.stage(f"{run.stage_prefix}distill", total=run.recipe.train.steps)
    train(run, budget, display, run.recipe.train.steps)
    if budget.expired():
        display.log(f"time budget reached after {run.trainer.steps_done} student steps")
    return finish(run, display)
