"""Build the :class:`dfkd_cli.plan.Plan` of an image run: resolve, probe, fit, choose, estimate.

Order: where input shape and normalisation came from; the settings that follow the device
(``"auto"`` generator sizes); a probe of each recipe that may run (:mod:`dfkd_cli.probe`); batches
halved until the estimated peak memory fits; with ``--recipe auto`` the policy's recipe, and a
race only when every entrant would get ``race_min_steps`` student steps; then every stage's
share of the budget and its estimated time.

Example:
    >>> plan, recipes = make_plan(opts, recipes, teacher, device, precision, builder)
    >>> print("\\n".join(plan.lines()))
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from dfkd_cli.archs import NORMALIZE_PRESETS
from dfkd_cli.autopilot import Adjustment, copy_recipe, fit_memory, get_setting, set_setting
from dfkd_cli.config import RecipeConfig
from dfkd_cli.errors import DfkdError
from dfkd_cli.plan import Plan, Stage
from dfkd_cli.policy import FILL_BUDGET, Rule, choose_rule, load_policy
from dfkd_cli.precision import Precision
from dfkd_cli.probe import Costs, available_memory, probe_run
from dfkd_cli.sample_grid import grid_sample_size
from dfkd_cli.synth import synthesizer_class
from dfkd_cli.synth.generator import resolve_generator_size
from dfkd_cli.teacher import Teacher

if TYPE_CHECKING:
    from dfkd_cli.build import RunBuilder
    from dfkd_cli.pipeline import CompressOptions

EXPORT_SECONDS = 10.0  # export and evaluation of small models (measured: 3-8 s here), before the teacher's share
# The teacher's ONNX export (for its latency) grows with its size: 25 s for an 86M-parameter
# ViT-B/16, about 1 s for a CIFAR resnet20, on the 2-core benchmark CPU.
ONNX_SECONDS_PER_MPARAM = 0.3
BUDGET_FILL_MARGIN = 1.5  # steps beyond the estimate of a budget-filling rule (see fill_budget)


def export_estimate(costs: Costs | None, teacher: Teacher, eval_images: int) -> float:
    """Seconds for export and evaluation: a fixed part, the teacher labelling what samples.png
    shows and (with the student) the ``--eval-data`` images at the speed the probe measured, and
    the teacher's ONNX export by its size."""
    teacher_s = costs.teacher_s if costs is not None else 0.0
    labelled = grid_sample_size(teacher.num_classes) + 2 * eval_images
    return EXPORT_SECONDS + teacher_s * labelled + ONNX_SECONDS_PER_MPARAM * teacher.num_params / 1e6


def export_reserve(budget: float | None, estimate: float = EXPORT_SECONDS) -> float:
    """Seconds of the budget kept for export and evaluation: the estimate, at most a quarter of
    the budget (the plan says when the estimate does not fit that quarter)."""
    return estimate if budget is None else min(estimate, budget / 4)


def input_shape_source(opts: "CompressOptions", teacher: Teacher) -> str:
    if opts.input_shape is not None:
        return opts.origins.get("input_shape") or "given"
    return teacher.shape_note


def normalisation_source(opts: "CompressOptions", teacher: Teacher) -> str:
    if opts.mean is not None or opts.std is not None:
        return opts.origins.get("mean") or opts.origins.get("std") or "given"
    if opts.normalize is None:
        return teacher.stats_note
    averaged = (" averaged over its 3 channels for this 1-channel input"
                if teacher.input_shape[0] == 1 and len(NORMALIZE_PRESETS[opts.normalize.lower()][0]) == 3 else "")
    return f"{opts.origins.get('normalize') or 'given'}: {opts.normalize}{averaged}"


def _device_notes(recipe: RecipeConfig, teacher: Teacher, device: torch.device) -> list[str]:
    note = resolve_generator_size(recipe.synth, teacher.input_shape, device) if hasattr(recipe.synth, "ngf") else None
    return [f"{recipe.recipe.name}: {note}"] if note else []


def _synth_batch(recipe: RecipeConfig) -> int:
    value = getattr(recipe.synth, "batch_size", None)
    return value if isinstance(value, int) else recipe.train.batch_size


def _probe(recipe: RecipeConfig, builder: "RunBuilder") -> Costs:
    return probe_run(lambda n: builder.probe_parts(recipe, n), _synth_batch(recipe), recipe.train.batch_size)


def _fit(recipe: RecipeConfig, costs: Costs, device: torch.device, explicit: set[str]) -> tuple[list[Adjustment], float, float]:
    available = available_memory(device)
    made, peak = fit_memory(recipe, costs.bytes_per_sample, 0.0, available, explicit)
    if peak > 0.8 * available:
        raise DfkdError(f"recipe {recipe.recipe.name} needs about {peak / 2**30:.1f} GiB even at batch "
                        f"{recipe.train.batch_size}, more than the {available / 2**30:.1f} GiB available; use a smaller "
                        "--input-shape or student, or another --device")
    return made, peak, available


def _step_seconds(recipe: RecipeConfig, costs: Costs) -> float:
    """Seconds per student step including its share of synthesis."""
    return costs.steps_seconds(100, recipe.train.batch_size, recipe.train.steps_per_round, _synth_batch(recipe)) / 100


def _holdout_seconds(recipe: RecipeConfig, costs: Costs) -> float:
    if synthesizer_class(recipe.recipe.synthesizer).capabilities.online:
        return 0.0  # drawn along the run, counted in its steps
    batch = _synth_batch(recipe)
    return math.ceil(recipe.train.holdout / batch) * costs.batch_seconds(min(batch, recipe.train.holdout))


def make_plan(opts: "CompressOptions", recipes: list[RecipeConfig], teacher: Teacher, device: torch.device,
              precision: Precision, builder: "RunBuilder", eval_images: int = 0) -> tuple[Plan, list[RecipeConfig]]:
    """The plan, and the recipes that will run (adjusted copies; several when they race);
    ``eval_images``: how many ``--eval-data`` images the end of the run evaluates."""
    explicit = set(opts.explicit_keys)
    by_name = {recipe.recipe.name: copy_recipe(recipe) for recipe in recipes}
    budget = opts.time_budget_s
    reason, race_names, policy = "--recipe", [], None
    if opts.recipe == "auto":
        policy = load_policy()
        rule = choose_rule(teacher.has_bn, teacher.input_shape, device.type, budget, policy)
        if rule.recipe not in by_name:
            raise DfkdError(f"--recipe auto's rule '{rule.name}' names {rule.recipe}, which does not apply here; "
                            "name a recipe with --recipe")
        lead, race_names = rule.recipe, [name for name in rule.race if name in by_name]
        reason = f"auto, policy rule '{rule.name}': {rule.evidence}"
    else:
        lead = recipes[0].recipe.name
        reason = opts.origins.get("recipe") or "given"
    notes, adjustments, costs, peaks = [], list(opts.step_adjustments.get(lead, [])), {}, {}
    if opts.recipe == "auto":
        adjustments += policy_settings(by_name[lead], rule.settings, rule.name, explicit | _steps_given(opts))
    available = None
    for name in [lead] + [n for n in race_names if n != lead]:
        recipe = by_name[name]
        notes += _device_notes(recipe, teacher, device)
        costs[name] = _probe(recipe, builder)
        if name == lead:
            export_s = export_estimate(costs[name], teacher, eval_images)
        made, peaks[name], available = _fit(recipe, costs[name], device, explicit)
        adjustments += made
        if name == lead and policy is not None:
            adjustments += fill_budget(recipe, costs[name], rule, budget, export_s, explicit | _steps_given(opts))
        distributed = builder.world.active
        if name == lead and not _race_decision(opts, race_names, by_name, costs, policy, distributed, export_s, only=lead):
            break  # the lead alone cannot get enough race steps: no race, no need to probe the others
    probed = set(race_names) <= set(costs)
    racing = _race_decision(opts, race_names, by_name, costs, policy, builder.world.active, export_s) if probed else []
    chosen = [by_name[name] for name in racing] if racing else [by_name[lead]]
    if racing and "race_share" in opts.origins:
        reason += f"; a race of {', '.join(racing)} (asked for with --race-share)"
    elif racing:
        reason += f"; a race of {', '.join(racing)} (each gets at least {policy.race_min_steps} student steps)"
    elif race_names and policy is not None:
        reason += (f"; no race: at this budget {', '.join(race_names)} would not each get "
                   f"{policy.race_min_steps} student steps to be ranked")
    plan = Plan(
        teacher={"arch": teacher.arch, "num_classes": teacher.num_classes, "params": teacher.num_params,
                 "bn_layers": len(teacher.bn_layers), "sha256": teacher.sha256},
        input_shape=list(teacher.input_shape), input_shape_from=input_shape_source(opts, teacher),
        mean=list(teacher.mean), std=list(teacher.std), normalisation_from=normalisation_source(opts, teacher),
        student=opts.student,
        student_from=opts.origins.get("student") or f"default for {teacher.arch}; choose another with --student",
        recipe=chosen[0].recipe.name if len(chosen) == 1 else "auto (race)", recipe_reason=reason,
        race=list(racing), device=str(device), precision=precision.name, time_budget_s=budget,
        steps=chosen[0].train.steps, device_settings=notes, adjustments=adjustments,
        peak_memory_mb=max(peaks[r.recipe.name] for r in chosen) / 2**20,
        available_memory_mb=available / 2**20 if available and math.isfinite(available) else None,
        probe={name: cost.to_dict() for name, cost in costs.items()})
    plan.export_s = export_reserve(budget, export_s)
    plan.stages = _stages(opts, chosen, costs, budget, export_s)
    train = next(stage for stage in plan.stages if stage.name == "train")
    lead = chosen[0]
    plan.budget_binds = train.budget_s is not None and lead.train.steps * _step_seconds(lead, costs[lead.recipe.name]) > 0.8 * train.budget_s
    return plan, chosen


def policy_settings(recipe: RecipeConfig, settings: dict[str, Any], rule: str, explicit: set[str]) -> list[Adjustment]:
    """The policy rule's settings for its lead recipe (e.g. more student steps for a long budget),
    except the keys the user set; each change is an adjustment the plan shows."""
    made = []
    for key, value in settings.items():
        before = get_setting(recipe, key)
        if key in explicit or before == value or value == FILL_BUDGET:  # FILL_BUDGET: fill_budget, after the probe
            continue
        set_setting(recipe, key, value)
        made.append(Adjustment(key, before, value, f"policy rule '{rule}'"))
    return made


def fill_budget(recipe: RecipeConfig, costs: Costs, rule: Rule, budget: float | None, export_s: float,
                explicit: set[str]) -> list[Adjustment]:
    """A rule's ``train.steps = "budget"``: when the budget holds more student steps than the
    recipe's own (which would end the run early), the budget ends training instead: the steps it
    holds at the probed speed, after the probe, the held-out samples and export, with half as many
    again, since the probe's first steps run slower than later ones (94 against about 70 ms on the
    MNIST BatchNorm teacher here) and the schedules follow the clock when the budget binds. Never
    when the user set the steps."""
    if rule.settings.get("train.steps") != FILL_BUDGET or budget is None or "train.steps" in explicit:
        return []
    step_s = _step_seconds(recipe, costs)
    train_s = budget - export_reserve(budget, export_s) - costs.probe_s - _holdout_seconds(recipe, costs)
    before, fits = recipe.train.steps, int(train_s / step_s)
    if fits <= before:
        return []
    after = int(fits * BUDGET_FILL_MARGIN)
    set_setting(recipe, "train.steps", after)
    return [Adjustment("train.steps", before, after, f"policy rule '{rule.name}': the budget ends training "
                                                     f"(it holds about {fits} steps at ~{step_s * 1000:.0f} ms a step)")]


def _steps_given(opts: "CompressOptions") -> set[str]:
    return {"train.steps"} if opts.steps is not None else set()


def _race_decision(opts: "CompressOptions", names: list[str], recipes: dict[str, RecipeConfig],
                   costs: dict[str, Costs], policy, distributed: bool, export_s: float,
                   only: str | None = None) -> list[str]:
    """The recipes that race: all of ``names`` when each would get ``race_min_steps`` student
    steps in its slice (judged on ``only`` alone when given), else none."""
    if policy is None or len(names) < 2:
        return []
    if "race_share" in opts.origins:  # the user asked for a race
        return names
    if opts.time_budget_s is None or distributed:
        return []  # a timed decision could differ between the processes of a distributed run
    slice_s = (opts.time_budget_s - export_reserve(opts.time_budget_s, export_s)) * opts.race_share / len(names)
    steps = [min(recipes[n].train.steps * opts.race_share / len(names),
                 (slice_s - _holdout_seconds(recipes[n], costs[n])) / _step_seconds(recipes[n], costs[n]))
             for n in ([only] if only else names)]
    return names if min(steps) >= policy.race_min_steps else []


def _stages(opts: "CompressOptions", chosen: list[RecipeConfig], costs: dict[str, Costs], budget: float | None,
            export_s: float) -> list[Stage]:
    probe_s = sum(cost.probe_s for cost in costs.values())
    reserve = export_reserve(budget, export_s)
    distill_budget = budget - reserve if budget is not None else None
    stages = [Stage("probe", probe_s, note="timing real steps")]
    lead = chosen[0] if len(chosen) == 1 else None
    if len(chosen) > 1 and distill_budget is not None:
        stages.append(Stage("race", distill_budget * opts.race_share, distill_budget * opts.race_share,
                            f"{len(chosen)} entrants, {distill_budget * opts.race_share / len(chosen):.0f}s each"))
        lead = chosen[0]
    assert lead is not None
    cost = costs[lead.recipe.name]
    holdout = _holdout_seconds(lead, cost)
    if holdout:
        quarter = distill_budget / 4 if distill_budget is not None else None
        stages.append(Stage("holdout", min(holdout, quarter) if quarter else holdout, quarter,
                            f"{lead.train.holdout} samples"))
    train_s = lead.train.steps * _step_seconds(lead, cost)
    left = distill_budget - sum(s.estimate_s for s in stages) if distill_budget is not None else None
    stages.append(Stage("train", min(train_s, left) if left is not None else train_s, left,
                        f"{lead.train.steps} steps at ~{_step_seconds(lead, cost) * 1000:.0f} ms"))
    note = "ONNX export, parity check, evaluation"
    if reserve < export_s:
        note += (f"; estimated {export_s:.0f}s, more than the quarter of the budget kept for it, so the run may end "
                 f"~{export_s - reserve:.0f}s late (fewer --eval-data images or a larger --time-budget fit it)")
    stages.append(Stage("export", export_s, note=note))
    return stages
