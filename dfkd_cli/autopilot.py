"""Rules that fit a recipe to the run it is asked for: the budget, a short ``--steps`` and the memory.

Each rule returns the :class:`Adjustment` s it made, so the plan can say what changed and why; a
setting given explicitly (``-s``, a config file's tables) is never adjusted.

Example:
    >>> recipe = load_recipe("deepinversion")
    >>> [str(a) for a in scale_to_steps(recipe, steps=3, recipe_steps=2000, explicit=set())]
    ['train.holdout 512 -> 32 (--steps 3 is 0.15% of the recipe's 2000 steps)', ...]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dfkd_cli.config import RecipeConfig
from dfkd_cli.errors import DfkdError

DEFAULT_TIME_BUDGET_S = 600.0  # documented in docs/cli.md: a useful student on a CPU for the common teachers
MIN_HOLDOUT = 32  # held-out samples: 16 select the student, 16 are reported
MIN_ITERATIONS = 10  # per-batch optimisation steps a short run keeps (FastDFKD's 5 stay as they are)
MIN_SYNTH_BATCH = 16
MIN_BATCH = 8  # the smallest batch the memory rule goes down to (BatchNorm needs a batch)
# A run of this few steps is a smoke test: its student batch shrinks too, so a large teacher
# (a ViT-B/16 on a CPU labels ~4 images a second) does not spend minutes on three steps.
SMOKE_STEPS = 20
SMOKE_BATCH = 32


@dataclass(frozen=True)
class Adjustment:
    """One setting changed by a rule: ``key`` went from ``before`` to ``after`` because ``reason``."""

    key: str
    before: Any
    after: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.key} {self.before} -> {self.after} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_time_budget(value: Any) -> float | None:
    """Seconds from a flag or a config file; ``"none"`` (run to the recipe's steps) is None.

    Example:
        >>> resolve_time_budget("10m"), resolve_time_budget("none"), resolve_time_budget(90)
        (600.0, None, 90.0)
    """
    from dfkd_cli.runtime import parse_duration

    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise DfkdError(f"time budget {value!r} must be a positive number of seconds or \"none\"; e.g. --time-budget 10m")
    return float(value)


def explicit_keys(overrides: list[str], tables: dict[str, Any]) -> set[str]:
    """Dotted keys the user set: ``-s key=value`` and the recipe tables of a config file."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    for table, values in tables.items():
        if isinstance(values, dict):
            keys |= {f"{table}.{key}" for key in values if not isinstance(values[key], dict)}
    return keys


def get_setting(recipe: RecipeConfig, key: str) -> Any:
    table, name = key.split(".", 1)
    return getattr(recipe.train if table == "train" else recipe.synth, name, None)


def set_setting(recipe: RecipeConfig, key: str, value: Any) -> None:
    table, name = key.split(".", 1)
    setattr(recipe.train if table == "train" else recipe.synth, name, value)


def _apply(recipe: RecipeConfig, changes: dict[str, Any], reason: str, explicit: set[str]) -> list[Adjustment]:
    made = []
    for key, value in changes.items():
        before = get_setting(recipe, key)
        if key in explicit or before is None or not isinstance(before, int) or value >= before:
            continue
        set_setting(recipe, key, value)
        made.append(Adjustment(key, before, value, reason))
    return made


def scale_to_steps(recipe: RecipeConfig, steps: int, recipe_steps: int, explicit: set[str]) -> list[Adjustment]:
    """A ``--steps`` far below the recipe's own step count bounds the whole run, not only the
    student: held-out samples, per-batch optimisation steps and the synthesis batch shrink in
    proportion (to floors that keep each stage meaningful), and a run of at most ``SMOKE_STEPS``
    steps trains on batches of ``SMOKE_BATCH``, so a 3-step run of any recipe is a smoke test of a
    minute, not an hour of held-out synthesis."""
    if steps >= recipe_steps:
        return []
    share = steps / max(recipe_steps, 1)
    reason = f"--steps {steps} is {share:.2%} of the recipe's {recipe_steps} steps"
    train = recipe.train
    changes: dict[str, Any] = {"train.holdout": max(MIN_HOLDOUT, round(train.holdout * share))}
    train_batch = train.batch_size
    if steps <= SMOKE_STEPS and train_batch > SMOKE_BATCH and "train.batch_size" not in explicit:
        changes["train.batch_size"] = train_batch = SMOKE_BATCH
    iterations = get_setting(recipe, "synth.iterations")
    if isinstance(iterations, int) and iterations > MIN_ITERATIONS:
        changes["synth.iterations"] = max(MIN_ITERATIONS, round(iterations * share))
    synth_batch = get_setting(recipe, "synth.batch_size")
    rounds = -(-steps // max(train.steps_per_round, 1))  # synthesis rounds the run will make
    if isinstance(synth_batch, int) and rounds * synth_batch > steps * train_batch:
        changes["synth.batch_size"] = max(MIN_SYNTH_BATCH, -(-steps * train_batch // rounds))
    return _apply(recipe, changes, reason, explicit)


def fit_memory(recipe: RecipeConfig, bytes_per_sample: dict[str, float], fixed_bytes: float, available: float,
               explicit: set[str]) -> tuple[list[Adjustment], float]:
    """Halve the synthesis and student batches until the estimated peak fits ``available`` bytes
    (with a fifth kept free). Returns the adjustments and the estimated peak afterwards; the caller
    refuses the run when even the smallest batches do not fit."""
    made: list[Adjustment] = []
    while True:
        peak = estimate_peak(recipe, bytes_per_sample, fixed_bytes)
        if peak <= 0.8 * available:
            return made, peak
        shrunk = {key: max(MIN_BATCH, value // 2) for key in ("synth.batch_size", "train.batch_size")
                  if isinstance(value := get_setting(recipe, key), int) and value > MIN_BATCH}
        step = _apply(recipe, shrunk, f"estimated peak memory {peak / 2**30:.1f} GiB does not fit the "
                      f"{available / 2**30:.1f} GiB available", explicit)
        if not step:
            return made, peak
        made += step


def estimate_peak(recipe: RecipeConfig, bytes_per_sample: dict[str, float], fixed_bytes: float) -> float:
    """Peak memory: what is already held plus the larger of a synthesis batch and a student step."""
    synth_batch = get_setting(recipe, "synth.batch_size")
    synth_batch = synth_batch if isinstance(synth_batch, int) else recipe.train.batch_size
    return fixed_bytes + max(synth_batch * bytes_per_sample["synthesis"],
                             recipe.train.batch_size * bytes_per_sample["student"])


def copy_recipe(recipe: RecipeConfig) -> RecipeConfig:
    """A copy of ``recipe`` the rules may change without touching the original."""
    return dataclasses.replace(recipe, synth=dataclasses.replace(recipe.synth) if recipe.synth is not None else None,
                               train=dataclasses.replace(recipe.train), loss=dict(recipe.loss))
