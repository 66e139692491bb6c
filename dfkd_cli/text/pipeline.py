"""``dfkd compress`` for a text teacher: teacher -> text synthesizer -> student trainer -> exporter -> report.

What is particular to text lives here and in the modules beside it: loading the teacher, the
language models and the corpus, building a :class:`~dfkd_cli.distill.Run` of a text synthesizer
and :class:`~dfkd_cli.text.trainer.TextTrainer`, and the artefacts (:mod:`dfkd_cli.text.publish`).
The run itself is the image pipeline's: the same distillation loop and held-out selection
(:mod:`dfkd_cli.distill`), supervisor (checkpoints, ``--resume``, divergence rollback, clean
stops: :mod:`dfkd_cli.supervise`), race (:mod:`dfkd_cli.race`) and staging folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dfkd_cli.config import RecipeConfig
from dfkd_cli.distill import Run
from dfkd_cli.distributed import World
from dfkd_cli.errors import DfkdError
from dfkd_cli.precision import Precision, loss_scales, resolve_text_precision
from dfkd_cli.race import RACE_SHARE
from dfkd_cli.report import write_report
from dfkd_cli.resume import resume_state
from dfkd_cli.rundir import move_into_place, staging_dir
from dfkd_cli.runtime import Display, Stopwatch, library_versions, seed_everything
from dfkd_cli.session import Budgeting, Session, distill_session, run_processes
from dfkd_cli.synth import SynthContext, synthesizer_class
from dfkd_cli.text.models import TextTeacher, build_text_student, default_text_student, load_causal_lm, load_text_teacher
from dfkd_cli.text.options import TextOptions, text_recipes
from dfkd_cli.batches import TextBatch
from dfkd_cli.text.synth import SavedTextSynthesizer, TextConfig, TextCorpus
from dfkd_cli.text.synthetic_set import load_text_set
from dfkd_cli.text.trainer import TextTrainer
from dfkd_cli.toml_out import dump_toml

EvalTable = tuple[list[str], list[int] | None]


@dataclass
class TextInputs:
    """Everything a text run reads, loaded and checked before any long work."""

    teacher: TextTeacher
    student_name: str  # --student, or the teacher's default student
    student: Any  # the first run's student (transformers model)
    language_models: dict[str, tuple[Any, Any]]  # "generator", "prompter": (model, tokenizer) on the device
    corpus: list[str] | None  # the sentences of --prior
    eval_table: EvalTable | None
    saved: tuple[TextBatch, TextBatch] | None = None  # --from-synthetic: training and held-out texts


def compress_text(opts: TextOptions, recipes: list[RecipeConfig], display: Display) -> dict[str, Any] | None:
    """Distil a Hugging Face sequence classifier with a text recipe (several race); returns the
    report. In a distributed run (``--nproc``) every rank trains and rank 0 alone writes and
    returns the report (the others return None)."""
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    out = opts.out or Path("runs") / f"{opts.teacher.name}-{opts.recipe}-{stamp}"
    inputs = [opts.teacher, opts.labels, opts.eval_data, opts.prior, opts.generator, opts.prompter, opts.from_synthetic]
    with run_processes(out, opts.overwrite, opts.resume, inputs, opts.device) as (world, device):
        return _compress_text(opts, recipes, display, out, device, world)


def _compress_text(opts: TextOptions, recipes: list[RecipeConfig], display: Display, out: Path, device: torch.device,
                   world: World) -> dict[str, Any] | None:
    from dfkd_cli.text.publish import publish

    watch, started = Stopwatch(device), datetime.now(timezone.utc)
    precision = Precision(resolve_text_precision(opts.precision, device), device)
    if note := precision.slow_note():
        display.log(note)
    seed_everything(opts.seed)
    loaded = prepare(opts, recipes, device, display)
    resume = resume_state(out, loaded.teacher.sha256, recipes[0].recipe.name, device) if opts.resume else None
    watch.lap("load")
    builder = TextRunBuilder(opts, loaded, device, precision, world)

    def settings(run: Run) -> str:  # checkpoints/run.toml: what --resume repeats (a race's winner)
        return dump_toml({"run": ran_options(opts, run.name), **run.recipe.to_dict()})

    session = Session(out, device, world, precision, display, loaded.teacher.sha256, resume, started)
    budgeting = Budgeting(opts.time_budget_s, paces=opts.budget_paces or len(recipes) > 1, elapsed=watch.total)
    done = distill_session(session, recipes, builder.run, budgeting, settings, opts.race_share or RACE_SHARE)
    watch.lap("distill")
    if done is None:  # another rank of a distributed run: rank 0 publishes
        return None
    run = done.run
    run_info = {**done.run_info, "synthetic_saved": opts.save_synthetic,
                "from_synthetic": str(opts.from_synthetic.resolve()) if opts.from_synthetic else None,
                "loss_scale": loss_scales(student=run.trainer.scaler, prompter=run.synth.scaler)}
    with staging_dir(out) as staging:
        report = publish(staging, opts, run, loaded.student_name, loaded.eval_table, done.holdout, run_info, display)
        watch.lap("export_and_evaluate")
        watch.seconds["total"] = round(sum(watch.seconds.values()), 3)
        report["run"].update(wall_clock_s=dict(watch.seconds), peak_memory_mb=dict(watch.memory_mb))
        report["warnings"] += run_info["health"]["warnings"]
        config = {"run": ran_options(opts, run.name if done.race else opts.recipe), **run.recipe.to_dict()}
        (staging / "config.toml").write_text(dump_toml(config), encoding="utf-8")
        report["run"]["config"], report["run"]["versions"] = config, library_versions()
        write_report(staging, report)
        move_into_place(staging, out)
    return report


def ran_options(opts: TextOptions, recipe: str) -> dict[str, Any]:
    """The ``[run]`` table of config.toml and checkpoints/run.toml: the options with the recipe that
    ran, so ``--config`` and ``--resume`` repeat a race's winner alone, with only the inputs it reads."""
    data = {**opts.to_dict(), "recipe": recipe}
    if recipe != opts.recipe:  # a race's winner
        reads = synthesizer_needs(recipe)
        data.update({flag: None for flag in ("generator", "prompter", "prior") if flag not in reads}, race_share=None)
    return data


@dataclass
class TextRunBuilder:
    """Builds the :class:`Run` of each text recipe: the first gets the prepared student, later ones
    (race entrants) a fresh one from the same seed."""

    opts: TextOptions
    inputs: TextInputs
    device: torch.device
    precision: Precision
    world: World

    def _student(self) -> Any:
        if self.inputs.student is not None:
            model, self.inputs.student = self.inputs.student, None
            return model
        seed_everything(self.opts.seed)  # every entrant starts from the same initialisation
        return build_text_student(self.inputs.student_name, self.inputs.teacher, self.opts.trust_pickle)

    def run(self, recipe: RecipeConfig) -> Run:
        teacher = self.inputs.teacher
        trainer = TextTrainer(self._student(), teacher, recipe.train, self.device, recipe.synth.max_length,
                              self.precision, self.world)
        if self.world.active:
            seed_everything(self.opts.seed + self.world.rank)  # same student on every rank, each its own texts
        if self.inputs.saved is not None:
            return Run(recipe.recipe.name, recipe, self._saved(trainer), trainer, autocast=self.precision.autocast)
        cls = synthesizer_class(recipe.recipe.synthesizer)
        corpus = self.inputs.corpus
        context = SynthContext(teacher=teacher, device=self.device, precision=self.precision, student=trainer.view(),
                               prior=TextCorpus(corpus, recipe.train.holdout) if corpus and cls.capabilities.uses_prior else None,
                               language_models={k: v for k, v in self.inputs.language_models.items() if k in cls.needs})
        synth = cls(context, recipe.synth, recipe.loss)
        return Run(recipe.recipe.name, recipe, synth, trainer, autocast=self.precision.autocast)


    def _saved(self, trainer: TextTrainer) -> SavedTextSynthesizer:
        assert self.inputs.saved is not None
        train, holdout = self.inputs.saved
        context = SynthContext(teacher=self.inputs.teacher, device=self.device, precision=self.precision,
                               student=trainer.view())
        synth = SavedTextSynthesizer(context, TextConfig(pool_size=len(train)), {})
        synth.load(train, holdout)
        return synth


def prepare(opts: TextOptions, recipes: list[RecipeConfig], device: torch.device, display: Display) -> TextInputs:
    """Load and check every input before any long work starts."""
    from dfkd_cli.text.data import read_corpus, read_text_table

    teacher = load_text_teacher(opts.teacher, opts.labels, opts.trust_pickle)
    saved = None
    if opts.from_synthetic is not None:
        given = [f"--{flag}" for flag in ("generator", "prompter", "prior") if getattr(opts, flag) is not None]
        if given:
            raise DfkdError(f"--from-synthetic trains on a saved set without synthesizing, so {given[0]} has no use; leave it out")
        train, holdout, _ = load_text_set(opts.from_synthetic, teacher)
        saved = (train, holdout)
    else:
        for recipe in recipes:
            _check_recipe(opts, recipe)
        refuse_unused_inputs(opts, recipes)
    models = {flag: load_causal_lm(path, f"--{flag}", opts.trust_pickle)
              for flag, path in (("generator", opts.generator), ("prompter", opts.prompter)) if path is not None}
    models = {flag: (model.to(device), tokenizer) for flag, (model, tokenizer) in models.items()}
    corpus = read_corpus(opts.prior) if opts.prior else None
    eval_table = None
    if opts.eval_data is not None:
        eval_table = read_text_table(opts.eval_data, opts.text_column, opts.label_column, teacher.class_names)
    student_name = opts.student or default_text_student(teacher)
    if opts.student is None:
        display.log(f"student: {student_name} (the teacher's first half; choose another with --student)")
    student = build_text_student(student_name, teacher, opts.trust_pickle)
    teacher.model.to(device)
    names = ", ".join(f"{r.recipe.name} ({r.recipe.description})" for r in recipes)
    display.log(f"recipe{'s racing' if len(recipes) > 1 else ''}: {names}")
    return TextInputs(teacher, student_name, student, models, corpus, eval_table, saved)


def _check_recipe(opts: TextOptions, recipe: RecipeConfig) -> None:
    """The recipe is a text recipe, and every language model and corpus it needs is given (and
    nothing it would ignore, unless several recipes race and another one reads it)."""
    if recipe.recipe.family != "text":
        raise DfkdError(f"recipe '{recipe.recipe.name}' is for image teachers; a Hugging Face teacher folder takes a "
                        f"text recipe: {', '.join(text_recipes())}")
    if recipe.train.holdout < 2:
        raise DfkdError(f"train.holdout is {recipe.train.holdout}; text runs need at least 2 held-out texts "
                        "(half select the student, half are reported), e.g. -s train.holdout=256")
    cls, name = synthesizer_class(recipe.recipe.synthesizer), recipe.recipe.name
    for flag in ("generator", "prompter"):
        if flag in cls.needs and getattr(opts, flag) is None:
            what = "a local causal LM folder such as GPT-2" if flag == "generator" else "a small causal LM folder such as DistilGPT2"
            raise DfkdError(f"recipe '{name}' needs --{flag} ({what})")
    if cls.capabilities.uses_prior and opts.prior is None:
        raise DfkdError(f"recipe '{name}' needs --prior: an unlabelled text file (one sentence or paragraph per line)")


def refuse_unused_inputs(opts: TextOptions, recipes: list[RecipeConfig]) -> None:
    """An input no recipe of the run reads is a mistake: one line saying which recipes read it."""
    needs = {flag for r in recipes for flag in synthesizer_class(r.recipe.synthesizer).needs}
    if any(synthesizer_class(r.recipe.synthesizer).capabilities.uses_prior for r in recipes):
        needs.add("prior")
    for flag in ("generator", "prompter", "prior"):
        if getattr(opts, flag) is not None and flag not in needs:
            users = [r for r in text_recipes() if flag in synthesizer_needs(r)]
            hint = f"pick a recipe that does: {', '.join(users)}" if users else "use --recipe unlabeled-text"
            raise DfkdError(f"recipe '{recipes[0].recipe.name}' does not use --{flag}; leave it out, or {hint}")


def synthesizer_needs(name: str) -> tuple[str, ...]:
    """The inputs a text recipe reads: the language models it ``needs``, and ``prior`` for a corpus."""
    from dfkd_cli.config import recipe_info

    cls = synthesizer_class(recipe_info(name).synthesizer)
    return (*cls.needs, "prior") if cls.capabilities.uses_prior else tuple(cls.needs)
