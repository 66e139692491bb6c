"""Options of a text ``dfkd compress``: flags resolved into :class:`TextOptions` and a recipe.

Flags that only mean something for image teachers are refused with a one-line error rather than
ignored; ``--recipe auto`` picks the strongest text recipe the given inputs allow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfkd_cli.autopilot import DEFAULT_TIME_BUDGET_S, resolve_time_budget
from dfkd_cli.config import RecipeConfig, build_recipe, list_recipes, merge_tables, read_toml, recipe_info, recipe_path
from dfkd_cli.errors import DfkdError
from dfkd_cli.measure import check_fraction
from dfkd_cli.precision import PRECISIONS
from dfkd_cli.runtime import resolve_device

# Image-only flags (their names in the CLI's flag dict) and how the user wrote them.
IMAGE_ONLY = {"arch": "--arch", "input_shape": "--input-shape", "normalize": "--normalize", "mean": "--mean",
              "std": "--std", "compile": "--compile"}
TEXT_ONLY = {"generator": "--generator", "prompter": "--prompter", "text_column": "--text-column",
             "label_column": "--label-column"}


@dataclass(frozen=True)
class TextOptions:
    """Everything a text ``dfkd compress`` needs besides the recipe; saved as ``[run]`` in config.toml.
    Frozen: resolved once by :func:`resolve_text`."""

    teacher: Path
    student: str | None = None  # bert-N or a folder; default bert-(teacher layers / 2)
    recipe: str = "auto"
    out: Path | None = None
    overwrite: bool = False
    steps: int | None = None
    time_budget_s: float | None = None
    labels: Path | None = None
    eval_data: Path | None = None
    text_column: str = "sentence"
    label_column: str | None = "label"
    prior: Path | None = None
    generator: Path | None = None
    prompter: Path | None = None
    min_agreement: float | None = None
    quantize: str = "none"  # none | int8: also write student.int8.onnx (dynamic quantization)
    save_synthetic: bool = False  # write the training and held-out texts with their teacher logits to OUT/synthetic
    from_synthetic: Path | None = None  # train on a saved text set instead of synthesizing
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast for synthesis and student steps
    seed: int = 0
    trust_pickle: bool = False
    overrides: list[str] = field(default_factory=list)
    race_share: float | None = None  # with --recipe auto: race the recipes the inputs allow for this share of the budget
    resume: bool = False  # continue the run in ``out`` from its last checkpoint
    # Schedules follow the clock only for a budget the user gave: the default one would make a
    # seeded CPU run unrepeatable (image runs decide this from their measured plan instead).
    budget_paces: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in NOT_RECORDED:
            data.pop(key)
        if data["time_budget_s"] is None:
            data["time_budget_s"] = "none"
        elif not self.budget_paces:
            del data["time_budget_s"]  # the default budget: a repeat gets it again, unpaced
        return {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in data.items()}


NOT_RECORDED = ("overwrite", "overrides", "out", "trust_pickle", "budget_paces", "resume")


def text_recipes() -> list[str]:
    return [name for name in list_recipes() if recipe_info(name).family == "text"]


def applicable_text_recipes(opts: TextOptions) -> list[str]:
    """The text recipes whose every input (language models, corpus) was given."""
    from dfkd_cli.text.pipeline import synthesizer_needs

    given = {flag for flag in ("generator", "prompter", "prior") if getattr(opts, flag) is not None}
    return [name for name in text_recipes() if set(synthesizer_needs(name)) <= given]


def auto_recipe(opts: TextOptions) -> str:
    """``--recipe auto`` for text without a race: the strongest recipe the given inputs allow
    (PromptDFD's Table 3 order: reinforced prompts, manual prompts, a corpus, random text)."""
    if opts.generator and opts.prompter:
        return "promptdfd-rl"
    if opts.generator:
        return "promptdfd-manual"
    return "unlabeled-text" if opts.prior else "random-text"


PATH_KEYS = ("teacher", "labels", "eval_data", "prior", "generator", "prompter", "from_synthetic")


def resolve_text(flags: dict[str, Any], overrides: list[str], overwrite: bool, trust_pickle: bool,
                 config_path: Path | None = None) -> tuple[TextOptions, list[RecipeConfig]]:
    """Options and recipes for a Hugging Face teacher folder (``flags``: None = not given), over a
    run's config.toml when ``config_path`` is given (flags win, as for image runs). Several
    recipes race: ``--recipe auto`` with ``--race-share``, when more than one applies."""
    given = [IMAGE_ONLY[k] for k, v in flags.items() if k in IMAGE_ONLY and v is not None]
    if given:
        raise DfkdError(f"{given[0]} is for image teachers; '{flags['teacher']}' is a Hugging Face text classifier, leave it out")
    run, tables = read_text_config(config_path) if config_path else ({}, {})
    if flags.get("recipe") is not None and flags["recipe"] != run.get("recipe"):
        tables = {k: v for k, v in tables.items() if k == "train"}  # [synth] belongs to the config's recipe
    known = {f.name for f in dataclasses.fields(TextOptions)}
    run.update({k: v for k, v in flags.items() if k in known and v is not None})
    values = {k: Path(v) if k in PATH_KEYS and v is not None else v for k, v in run.items()}
    values["budget_paces"] = "time_budget_s" in values
    values["time_budget_s"] = resolve_time_budget(values.get("time_budget_s", DEFAULT_TIME_BUDGET_S))
    opts = TextOptions(**values, overwrite=overwrite, trust_pickle=trust_pickle, overrides=list(overrides))
    check_fraction(opts.min_agreement, "--min-agreement")
    if opts.quantize not in ("none", "int8"):
        raise DfkdError(f"--quantize must be none or int8, got {opts.quantize!r}")
    if opts.precision not in PRECISIONS:
        raise DfkdError(f"--precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}")
    if opts.race_share is not None:
        check_fraction(opts.race_share, "--race-share")
        if opts.recipe != "auto":
            raise DfkdError(f"--race-share races the recipes of --recipe auto; --recipe {opts.recipe} runs one, leave it out")
    if opts.from_synthetic is not None and opts.recipe == "auto":
        from dfkd_cli.text.synthetic_set import text_set_recipe

        opts = dataclasses.replace(opts, recipe=text_set_recipe(opts.from_synthetic))  # its [train] settings
    names = [opts.recipe]
    if opts.recipe == "auto":
        entrants = applicable_text_recipes(opts)
        names = entrants if opts.race_share is not None and len(entrants) > 1 else [auto_recipe(opts)]
        opts = dataclasses.replace(opts, recipe=names[0] if len(names) == 1 else "auto")
    if len(names) > 1:
        from dfkd_cli.runconfig import refuse_recipe_settings  # runconfig imports the image pipeline: slow

        refuse_recipe_settings(overrides)
    return opts, [_text_recipe(opts, name, tables, overrides) for name in names]


def _text_recipe(opts: TextOptions, recipe: str, tables: dict[str, Any], overrides: list[str]) -> RecipeConfig:
    if recipe.endswith(".toml"):
        data, name = read_toml(Path(recipe)), Path(recipe).stem
    else:
        data, name = read_toml(recipe_path(recipe)), recipe
    steps = [f"train.steps={opts.steps}"] if opts.steps is not None else []
    return build_recipe(merge_tables(data, tables), list(overrides) + steps, default_name=name,
                        device_type=resolve_device(opts.device).type)


def resolve_text_resume(run_dir: Path, settings: Path, device: str | None, trust_pickle: bool
                        ) -> tuple[TextOptions, list[RecipeConfig]]:
    """``--resume RUN`` of a text run: its checkpoints/run.toml (``settings``) again; only ``--device`` may change."""
    opts, recipes = resolve_text({"device": device}, [], overwrite=False, trust_pickle=trust_pickle, config_path=settings)
    return dataclasses.replace(opts, out=Path(run_dir), resume=True), recipes


def read_text_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``[run]`` table of a text run's config.toml (paths relative to its folder) and its recipe tables."""
    data = read_toml(path)
    run = dict(data.pop("run", {}))
    known = {f.name for f in dataclasses.fields(TextOptions)} - set(NOT_RECORDED)
    unknown = sorted(set(run) - known)
    if unknown:
        raise DfkdError(f"unknown key(s) {unknown} in [run] of '{path}' for a text teacher; valid keys: {', '.join(sorted(known))}")
    for key in PATH_KEYS:
        if run.get(key) is not None:
            run[key] = str(Path(path).parent / run[key]) if not Path(run[key]).is_absolute() else run[key]
    return run, data


def config_names_text_teacher(path: Path) -> bool:
    """Whether the run config at ``path`` names a Hugging Face teacher folder (a text run)."""
    run = read_toml(path).get("run", {})
    teacher = run.get("teacher") if isinstance(run, dict) else None
    if not isinstance(teacher, str):
        return False
    return (Path(teacher) if Path(teacher).is_absolute() else Path(path).parent / teacher).is_dir()


def refuse_text_flags(flags: dict[str, Any]) -> None:
    """Text-only flags given for an image teacher."""
    given = [TEXT_ONLY[k] for k, v in flags.items() if k in TEXT_ONLY and v is not None]
    if given:
        raise DfkdError(f"{given[0]} is for text teachers (a Hugging Face model folder); leave it out for '{flags.get('teacher')}'")


def is_text_student(path: Path) -> bool:
    """A text student: a folder (Hugging Face layout or a run folder) or safetensors marked ``dfkd.family = text``."""
    path = Path(path)
    if path.is_dir():
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return (handle.metadata() or {}).get("dfkd.family") in ('"text"', "text")
    except Exception:  # not a safetensors file: the image loader reports it in its own words
        return False


def inspect_text_teacher(path: Path, labels: Path | None, trust_pickle: bool) -> dict[str, Any]:
    """What ``dfkd inspect`` shows for a Hugging Face teacher folder."""
    from dfkd_cli.text.models import default_text_student, load_text_teacher

    teacher = load_text_teacher(path, labels, trust_pickle)
    config = teacher.model.config
    return {"family": "text", "path": str(path), "arch": teacher.kind, "sha256": teacher.sha256,
            "num_classes": teacher.num_classes, "class_names": teacher.class_names, "layers": teacher.num_layers,
            "hidden_size": int(getattr(config, "hidden_size", 0)), "max_positions": teacher.max_positions,
            "tokenizer": type(teacher.tokenizer).__name__, "vocab_size": len(teacher.tokenizer),
            "params": teacher.num_params, "default_student": default_text_student(teacher),
            "recipes": text_recipes()}
