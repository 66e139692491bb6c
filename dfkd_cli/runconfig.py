"""Resolve ``dfkd compress`` options from flags, a run config file and a recipe.

Precedence, lowest first: the recipe file, the config file's recipe tables, ``-s`` overrides,
``--steps``. ``--recipe auto`` (the default) picks the strongest recipe that applies to the
teacher's architecture. When ``--recipe`` names another recipe than the config file's, only the config's
``[train]`` table is kept (``[synth]`` settings belong to the config's own recipe). For run
options: the config file's ``[run]`` table, then flags given on the command line. Relative paths in a config file are read relative to the file's folder; runs write
absolute paths, so ``dfkd compress --config runs/x/config.toml`` repeats a run from anywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from dfkd_cli import validate
from dfkd_cli.archs import default_student
from dfkd_cli.autopilot import DEFAULT_TIME_BUDGET_S, explicit_keys, resolve_time_budget, scale_to_steps
from dfkd_cli.config import RecipeConfig, build_recipe, merge_tables, read_toml, recipe_path
from dfkd_cli.errors import DfkdError, shown
from dfkd_cli.pipeline import CompressOptions
from dfkd_cli.race import RACE_SHARE, race_entrants
from dfkd_cli.resume import CheckpointDir
from dfkd_cli.sources import needs_arch, teacher_has_bn
from dfkd_cli.precision import PRECISIONS
from dfkd_cli.runtime import parse_duration, resolve_device

_PATH_KEYS = ("teacher", "labels", "eval_data", "prior", "from_synthetic")
_RUN_KEYS = [f.name for f in dataclasses.fields(CompressOptions) if f.name not in CompressOptions.NOT_RECORDED]


def resolve_compress(flags: dict[str, Any], overrides: list[str], config_path: Path | None, overwrite: bool = False,
                     trust_pickle: bool = False) -> tuple[CompressOptions, list[RecipeConfig]]:
    """Merge flags (None = not given) over the config file and build the options and the recipe,
    or with ``--recipe auto`` the recipes that race."""
    run, recipe_tables = _read_config(config_path) if config_path else ({}, {})
    if flags.get("recipe") is not None and flags["recipe"] != run.get("recipe"):
        # [synth] and [recipe] belong to the config's own recipe; [train] fits every recipe.
        recipe_tables = {k: v for k, v in recipe_tables.items() if k == "train"}
    origins = {key: f"from {config_path}" for key in run}
    given = checked_run_values({k: v for k, v in flags.items() if v is not None}, _flag_name)
    origins.update({key: f"--{key.replace('_', '-')}" for key in given})
    run.update(given)
    if run.get("teacher") is None:
        raise DfkdError("no teacher given; pass a checkpoint (dfkd compress teacher.pt --arch resnet18) or try --demo")
    if run.get("arch") is None and needs_arch(Path(run["teacher"])):
        raise DfkdError("no teacher architecture given; pass --arch NAME (list them with `dfkd archs`)")
    opts = CompressOptions(
        teacher=Path(run["teacher"]),
        arch=run.get("arch"),
        student=run.get("student") or _default_student(run.get("arch")),
        recipe=str(run.get("recipe") or _synthetic_set_recipe(run.get("from_synthetic")) or "auto"),
        out=run.get("out"),
        overwrite=overwrite,
        steps=run.get("steps"),
        time_budget_s=resolve_time_budget(run.get("time_budget_s", DEFAULT_TIME_BUDGET_S)),
        input_shape=run.get("input_shape"),
        normalize=run.get("normalize"),
        mean=run.get("mean"),
        std=run.get("std"),
        labels=_path(run.get("labels")),
        eval_data=_path(run.get("eval_data")),
        prior=_path(run.get("prior")),
        quantize=str(run.get("quantize", "none")),
        race_share=float(run.get("race_share", RACE_SHARE)),
        save_synthetic=bool(run.get("save_synthetic", False)),
        from_synthetic=_path(run.get("from_synthetic")),
        min_agreement=run.get("min_agreement"),
        device=run.get("device", "auto"),
        precision=str(run.get("precision", "auto")),
        compile=bool(run.get("compile", False)),
        seed=int(run.get("seed", 0)),
        trust_pickle=trust_pickle,
        overrides=list(overrides),
        origins=origins,
        explicit_keys=sorted(explicit_keys(overrides, recipe_tables)),
    )
    if opts.recipe == "auto":
        recipes = _race_recipes(opts, recipe_tables, overrides)
    else:
        recipes = [_build_recipe(opts, opts.recipe, recipe_tables, overrides)]
    return _with_step_adjustments(opts, recipes), recipes


def resolve_resume(run_dir: Path, flags: dict[str, Any], trust_pickle: bool = False
                   ) -> tuple[CompressOptions, list[RecipeConfig]]:
    """``--resume RUN``: the options and recipe of the run in ``RUN`` (its checkpoints/run.toml);
    only ``--device`` may change."""
    refuse_resume_flags(flags)
    if not Path(run_dir).is_dir():
        raise DfkdError(f"nothing to resume: '{run_dir}' is not a folder; give the --out folder of an unfinished run")
    run_flags = {"device": flags.get("device")}
    opts, recipes = resolve_compress(run_flags, [], CheckpointDir(run_dir).settings(), trust_pickle=trust_pickle)
    return dataclasses.replace(opts, out=Path(run_dir), resume=True), recipes


def refuse_recipe_settings(overrides: list[str]) -> None:
    """A race runs several recipes: ``-s synth.*`` or ``recipe.*`` would name a setting of one of them."""
    synth_keys = [item for item in overrides if item.strip().startswith(("synth.", "recipe."))]
    if synth_keys:
        raise DfkdError(f"-s {synth_keys[0]} names a setting of one recipe, but --recipe auto races several; "
                        "pick the recipe with --recipe NAME")


def refuse_resume_flags(flags: dict[str, Any]) -> None:
    """``--resume`` repeats the run's own settings: any flag but ``--device`` is a mistake."""
    given = [name for name, value in flags.items() if value is not None and name != "device"]
    if given:
        flag = {"time_budget_s": "time-budget", "set_": "set"}.get(given[0], given[0].replace("_", "-"))
        raise DfkdError(f"--resume continues a run with the settings it started with; leave out --{flag}")


def _race_recipes(opts: CompressOptions, tables: dict[str, Any], overrides: list[str]) -> list[RecipeConfig]:
    """The recipes ``--recipe auto`` races: every one that applies to the architecture."""
    refuse_recipe_settings(overrides)
    names = race_entrants(teacher_has_bn(opts.teacher, opts.arch))
    train_only = {k: v for k, v in tables.items() if k == "train"}
    return [_build_recipe(opts, name, train_only, overrides) for name in names]


def _default_student(arch: str | None) -> str | None:
    """The architecture's default student; None when it has none, ``arch`` is unknown (the teacher
    loader then says that first) or the teacher carries its own architecture (the pipeline then takes
    the teacher's default student, or says to pass --student)."""
    if arch is None:
        return None
    try:
        return default_student(arch)
    except DfkdError:
        return None


def _synthetic_set_recipe(folder: Any) -> str | None:
    """``--from-synthetic`` without ``--recipe`` trains with the [train] table of the set's own recipe."""
    from dfkd_cli.synthetic_set import read_manifest

    return str(read_manifest(Path(folder))["recipe"]) if folder is not None else None


def _build_recipe(opts: CompressOptions, recipe_name: str, tables: dict[str, Any], overrides: list[str]) -> RecipeConfig:
    """Recipe ``recipe_name`` (a shipped name or a .toml path) with the config's tables and ``-s``
    overrides; a short ``--steps`` scales its other stages (see :func:`_with_step_adjustments`)."""
    if recipe_name.endswith(".toml"):
        path = Path(recipe_name)
        data, name = read_toml(path), path.stem
    else:
        data, name = read_toml(recipe_path(recipe_name)), recipe_name
    data = merge_tables(data, tables)
    return build_recipe(data, overrides, default_name=name, device_type=resolve_device(opts.device).type)


def _with_step_adjustments(opts: CompressOptions, recipes: list[RecipeConfig]) -> CompressOptions:
    """``--steps N`` sets each recipe's student steps and scales the stages around them; the options
    record what was scaled, per recipe, for the plan."""
    if opts.steps is None:
        return opts
    adjustments = {}
    for recipe in recipes:
        recipe_steps, recipe.train.steps = recipe.train.steps, opts.steps
        adjustments[recipe.recipe.name] = scale_to_steps(recipe, opts.steps, recipe_steps, set(opts.explicit_keys))
    return dataclasses.replace(opts, step_adjustments=adjustments)


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    data = read_toml(path)
    run = data.pop("run", {})
    if not isinstance(run, dict):
        raise DfkdError(f"[run] in '{path}' must be a table of key = value settings, got {shown(run)}; fix the file")
    unknown = sorted(set(run) - set(_RUN_KEYS))
    if unknown:
        raise DfkdError(f"unknown key(s) {unknown} in [run] of '{path}'; valid keys: {', '.join(_RUN_KEYS)}")
    run = checked_run_values(run, lambda key: f"'{path}' [run] {key}")
    for key in _PATH_KEYS:
        if run.get(key) is not None:
            run[key] = str((path.parent / run[key]) if not Path(run[key]).is_absolute() else Path(run[key]))
    return run, data


def _path(value: Any) -> Path | None:
    return Path(value) if value is not None else None


def _flag_name(key: str) -> str:
    return "--time-budget" if key == "time_budget_s" else f"--{key.replace('_', '-')}"


def _time_budget(value: Any, where: str) -> float | str:
    """Seconds, a duration (``"10m"``) or ``"none"``."""
    if not isinstance(value, str):
        return validate.positive_number(value, where, fix='give seconds, a duration like "10m", or "none"')
    if value.strip().lower() == "none":
        return "none"
    try:
        return parse_duration(value)
    except DfkdError:
        raise validate.fail(where, 'a duration like 90s, 10m or 2h, or "none"', value) from None


# The check of each [run] key, the same for a flag and for a config file; ``where`` names the source.
_RUN_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    **{key: validate.path for key in _PATH_KEYS},
    **{key: validate.text for key in ("arch", "student", "recipe", "normalize", "device")},
    "steps": validate.positive_int,
    "time_budget_s": _time_budget,
    "input_shape": validate.input_shape,
    "mean": validate.finite_floats,
    "std": validate.finite_floats,
    "quantize": lambda value, where: validate.text(value, where, choices=("none", "int8")),
    "precision": lambda value, where: validate.text(value, where, choices=PRECISIONS),
    "save_synthetic": validate.boolean,
    "compile": validate.boolean,
    "race_share": lambda value, where: validate.fraction(value, where, open_interval=True,
                                                         fix="the budget's share for the race, e.g. 0.15"),
    "min_agreement": validate.fraction,
    "seed": validate.seed,
}


def checked_run_values(values: dict[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
    """``values`` (flags or a config's [run] table) checked and in their canonical types; ``where(key)``
    names the source in errors, so a config file gets the same checks and messages as the flags."""
    checks = {key: _RUN_CHECKS.get(key, lambda value, _where: value) for key in values}
    return {key: checks[key](value, where(key)) if value is not None else None for key, value in values.items()}
