"""``--recipe auto``: a recipe race. Every recipe that applies to the teacher distils for an equal
slice of ``--race-share`` (default 15%) of the budget; the leader then gets the rest.

The leader is chosen on held-out synthetic agreement, but not each entrant's own: agreement on a
recipe's own samples is not comparable across recipes (noise inputs are easy to agree on). Every
student is scored on the same pool, an equal number of selection samples from every entrant, so a
student wins by agreeing with the teacher on all of the kinds of inputs the recipes make. The
report samples of each entrant stay unseen, and real data is never used.

Example:
    >>> winner, table = run_race(recipes, make_run, Budget(600), display)
    >>> table["winner"], [row["recipe"] for row in table["entrants"]]
    ('dfad', ['dafl', 'dfad', 'zskd', 'zskt'])
"""

from __future__ import annotations

import time
from typing import Callable

from dfkd_cli.batches import Batch, concat
from dfkd_cli.config import RecipeConfig, list_recipes, recipe_info
from dfkd_cli.distill import Run, StepWatch, distill, finish, start, train, wire
from dfkd_cli.errors import EXIT_INTERRUPTED, DfkdError
from dfkd_cli.runtime import Budget, Display

RACE_SHARE = 0.15
# Not entered: the noise baseline (the floor, not a method) and recipes that need --prior.
NOT_RACED = ("noise",)


def race_entrants(has_bn: bool) -> list[str]:
    """The shipped recipes a teacher with (or without) BatchNorm races."""
    from dfkd_cli.synth import synthesizer_class

    names = []
    for name in list_recipes():
        info = recipe_info(name)
        if name in NOT_RACED or info.family != "image" or synthesizer_class(info.synthesizer).capabilities.uses_prior or (info.requires_bn and not has_bn):
            continue
        names.append(name)
    return names


def pooled_samples(runs: list[Run]) -> Batch:
    """An equal number of selection samples from every run's held-out set."""
    parts = [run.selector.selection_samples() for run in runs]  # type: ignore[union-attr]
    per_run = min(len(part) for part in parts)
    return concat([part[:per_run] for part in parts])


def run_race(recipes: list[RecipeConfig], make_run: Callable[[RecipeConfig], Run], budget: Budget, display: Display,
             share: float = RACE_SHARE, watch: StepWatch | None = None) -> tuple[Run, dict]:
    """Race ``recipes`` for ``share`` of ``budget`` (and of each recipe's ``train.steps``), then
    train the leader to the end of the budget (``watch`` follows the leader only). Returns the
    leader's run (started, not finished) and the race table for the report."""
    runs, seconds = [], []
    for recipe in recipes:
        if budget.stop_requested:
            raise DfkdError(f"stopped by {budget.stop_requested} during the recipe race, before the first checkpoint; "
                            "nothing of this run was kept: run the command again", EXIT_INTERRUPTED)
        slice_budget = budget.part(budget.seconds * share / len(recipes) if budget.seconds else None)
        run = make_run(recipe)
        run.stage_prefix = f"race {run.name}: "
        began = time.monotonic()
        start(run, slice_budget, display)
        slice_steps = max(1, round(recipe.train.steps * share / len(recipes)))
        display.stage(f"{run.stage_prefix}distill", total=slice_steps, seconds_left=slice_budget.left())
        train(run, slice_budget, display, slice_steps)
        runs.append(run)
        seconds.append(time.monotonic() - began)
    pooled = pooled_samples(runs)
    teacher_classes = runs[0].trainer.teacher_classes(pooled)
    scores = [run.trainer.world.mean(float((run.trainer.student_classes(pooled) == teacher_classes).float().mean()))
              for run in runs]
    winner = runs[max(range(len(runs)), key=lambda i: scores[i])]
    table = {"share": share, "pooled_samples": len(pooled), "winner": winner.name,
             "entrants": [{"recipe": run.name, "steps": run.trainer.steps_done, "seconds": round(sec, 2),
                           "pooled_agreement": score, "own_agreement": run.agreement}
                          for run, sec, score in zip(runs, seconds, scores)]}
    display.log(f"race: {winner.name} leads ({', '.join(f'{r.name} {s:.1%}' for r, s in zip(runs, scores))}) "
                "on the pooled held-out synthetic samples; it gets the rest of the budget")
    winner.stage_prefix = ""
    wire(winner, budget)
    display.stage("distill", total=winner.recipe.train.steps, seconds_left=budget.left())
    display.advance(winner.trainer.steps_done)  # the leader's race steps count towards its run
    if watch is not None:
        watch.begin(winner)
    train(winner, budget, display, winner.recipe.train.steps, watch)
    if watch is not None:
        watch.end(winner)
    return winner, table


def distill_recipes(recipes: list[RecipeConfig], make_run: Callable[[RecipeConfig], Run], budget: Budget,
                    display: Display, watch: StepWatch, share: float = RACE_SHARE) -> tuple[Run, Batch, dict | None]:
    """The distillation stage of every run, image or text: one recipe distils alone, several race
    first. Returns the finished run, its held-out samples and the race table (None without a race)."""
    if len(recipes) > 1:
        run, race = run_race(recipes, make_run, budget, display, share, watch)
        return run, finish(run, display), race
    run = make_run(recipes[0])
    return run, distill(run, budget, display, watch), None
