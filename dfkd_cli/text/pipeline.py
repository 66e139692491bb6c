"""``dfkd compress`` for a text teacher: teacher -> text synthesizer -> student trainer -> exporter -> report.

Like the image pipeline, the run is written into a hidden staging folder and renamed into place
once every artefact exists. Text runs are single-process and do not write resumable checkpoints.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from dfkd_cli.config import RecipeConfig, dump_toml, recipe_info
from dfkd_cli.errors import EXIT_INTERRUPTED, DfkdError
from dfkd_cli.report import write_report
from dfkd_cli.rundir import claim_out_dir, move_into_place, staging_dir
from dfkd_cli.precision import Precision, loss_scales, resolve_text_precision
from dfkd_cli.runtime import (Budget, Display, StopRequest, Stopwatch, hardware_description, library_versions,
                              resolve_device, seed_everything)
from dfkd_cli.selection import stability
from dfkd_cli.text.options import TextOptions, text_recipes
from dfkd_cli.text.models import TextTeacher, build_text_student, default_text_student, load_causal_lm, load_text_teacher
from dfkd_cli.text.synth import TextSynthesizer
from dfkd_cli.text.trainer import TextTrainer


def compress_text(opts: TextOptions, recipe: RecipeConfig, display: Display) -> dict[str, Any]:
    """Distil a Hugging Face sequence classifier with a text recipe; returns the report."""
    out = opts.out or Path("runs") / f"{opts.teacher.name}-{recipe.recipe.name}-{datetime.now():%Y%m%d-%H%M%S}"
    inputs = [opts.teacher, opts.labels, opts.eval_data, opts.prior, opts.generator, opts.prompter]
    with claim_out_dir(out, opts.overwrite, inputs=inputs):  # checked and locked for the whole run
        return _compress_text(opts, recipe, display, out)


def _compress_text(opts: TextOptions, recipe: RecipeConfig, display: Display, out: Path) -> dict[str, Any]:
    from dfkd_cli.text.publish import publish

    device = resolve_device(opts.device)
    stages, started = Stopwatch(device), datetime.now(timezone.utc)
    precision = Precision(resolve_text_precision(opts.precision, device), device)
    if note := precision.slow_note():
        display.log(note)
    seed_everything(opts.seed)
    teacher, student, synth, eval_table = prepare(opts, recipe, device, display)
    stages.lap("load")
    trainer = TextTrainer(student, teacher, recipe.train, device, recipe.synth.max_length, precision)
    synth.use_precision(precision)
    synth.label, synth.student_logits = trainer.teacher_logits, trainer.student_logits
    teacher.model.to(device)
    with StopRequest() as stop:
        budget = Budget(opts.time_budget_s, stop=stop)
        budget.paces = opts.budget_paces
        holdout, curve = distill_text(synth, trainer, recipe, budget, display, precision.autocast)
    if budget.stop_requested:
        raise DfkdError(f"stopped by {budget.stop_requested} at student step {trainer.steps_done}; text runs do not "
                        "write checkpoints, so nothing was kept", EXIT_INTERRUPTED)
    trainer.restore_best()
    stages.lap("distill")
    run_info = {"started": started.isoformat(timespec="seconds"), "device": str(device),
                "hardware": hardware_description(device), "steps": trainer.steps_done, "best_step": trainer.best_step,
                "out": str(out), "stability": stability(curve), "precision": precision.name,
                "loss_scale": loss_scales(student=trainer.scaler, prompter=synth.scaler)}
    with staging_dir(out) as staging:
        report = publish(staging, opts, recipe, teacher, trainer, synth, holdout, eval_table, run_info, display)
        stages.lap("export_and_evaluate")
        stages.seconds["total"] = round(sum(stages.seconds.values()), 3)
        report["run"].update(wall_clock_s=dict(stages.seconds), peak_memory_mb=dict(stages.memory_mb))
        config = {"run": opts.to_dict(), **recipe.to_dict()}
        (staging / "config.toml").write_text(dump_toml(config), encoding="utf-8")
        report["run"]["config"], report["run"]["versions"] = config, library_versions()
        write_report(staging, report)
        move_into_place(staging, out)
    return report


def prepare(opts: TextOptions, recipe: RecipeConfig, device: torch.device, display: Display
            ) -> tuple[TextTeacher, Any, TextSynthesizer, tuple[list[str], list[int] | None] | None]:
    """Load and check every input before any long work starts."""
    from dfkd_cli.synth import synthesizer_class
    from dfkd_cli.text.data import read_corpus, read_text_table

    if recipe.recipe.family != "text":
        raise DfkdError(f"recipe '{recipe.recipe.name}' is for image teachers; a Hugging Face teacher folder takes a "
                        f"text recipe: {', '.join(text_recipes())}")
    if recipe.train.holdout < 2:
        raise DfkdError(f"train.holdout is {recipe.train.holdout}; text runs need at least 2 held-out texts "
                        "(half select the student, half are reported), e.g. -s train.holdout=256")
    teacher = load_text_teacher(opts.teacher, opts.labels, opts.trust_pickle)
    synth = synthesizer_class(recipe.recipe.synthesizer)(teacher, recipe.synth, recipe.loss, device)
    _check_inputs(opts, recipe, synth)
    if opts.generator:
        synth.generator = _to(load_causal_lm(opts.generator, "--generator", opts.trust_pickle), device)
    if opts.prompter:
        synth.attach_prompter(_to(load_causal_lm(opts.prompter, "--prompter", opts.trust_pickle), device))
    if opts.prior:
        synth.attach_corpus(read_corpus(opts.prior), recipe.train.holdout)
    eval_table = None
    if opts.eval_data is not None:
        eval_table = read_text_table(opts.eval_data, opts.text_column, opts.label_column, teacher.class_names)
    default_student = opts.student is None
    opts.student = opts.student or default_text_student(teacher)
    student = build_text_student(opts.student, teacher, opts.trust_pickle)
    if default_student:
        display.log(f"student: {opts.student} (the teacher's first half; choose another with --student)")
    display.log(f"recipe: {recipe.recipe.name} ({recipe.recipe.description})")
    return teacher, student, synth, eval_table


def _to(lm: tuple[Any, Any], device: torch.device) -> tuple[Any, Any]:
    return lm[0].to(device), lm[1]


def _check_inputs(opts: TextOptions, recipe: RecipeConfig, synth: TextSynthesizer) -> None:
    """Every language model and corpus the recipe needs is given, and nothing it would ignore."""
    name = recipe.recipe.name
    given = {"generator": opts.generator, "prompter": opts.prompter}
    for flag, path in given.items():
        if flag in synth.needs and path is None:
            what = "a local causal LM folder such as GPT-2" if flag == "generator" else "a small causal LM folder such as DistilGPT2"
            raise DfkdError(f"recipe '{name}' needs --{flag} ({what})")
        if flag not in synth.needs and path is not None:
            users = [r for r in text_recipes() if flag in synthesizer_needs(r)]
            raise DfkdError(f"recipe '{name}' does not use --{flag}; leave it out, or pick a recipe that does: {', '.join(users)}")
    if synth.capabilities.uses_prior and opts.prior is None:
        raise DfkdError(f"recipe '{name}' needs --prior: an unlabelled text file (one sentence or paragraph per line)")
    if not synth.capabilities.uses_prior and opts.prior is not None:
        raise DfkdError(f"recipe '{name}' does not use --prior; leave it out, or use --recipe unlabeled-text")


def synthesizer_needs(name: str) -> tuple[str, ...]:
    from dfkd_cli.synth import synthesizer_class

    return synthesizer_class(recipe_info(name).synthesizer).needs


def distill_text(synth: TextSynthesizer, trainer: TextTrainer, recipe: RecipeConfig, budget: Budget,
                 display: Display, mixed: Callable[[], Any] = contextlib.nullcontext,
                 ) -> tuple[tuple[list[str], torch.Tensor], list[float]]:
    """Alternate synthesis rounds and student steps (under ``mixed``, the precision's autocast)
    until ``train.steps`` or the budget ends. Returns the hold-out (texts and teacher logits in
    fp32; its first half selects the student) and the selection agreement along the run."""
    cfg = recipe.train
    display.stage("holdout", total=None)
    texts = synth.holdout(cfg.holdout)
    holdout = (texts, trainer.teacher_logits(texts))
    half = len(texts) // 2
    select = (holdout[0][:half], holdout[1][:half])
    if budget.seconds:
        trainer.time_progress = budget.fraction
    display.stage("distill", total=None if budget.seconds else cfg.steps)
    curve = [trainer.select(*select)]
    metrics: dict[str, float] = {}
    while trainer.steps_done < cfg.steps and not budget.expired():
        with mixed():
            metrics = synth.synthesize()
        for _ in range(cfg.steps_per_round):
            if trainer.steps_done >= cfg.steps or budget.expired():
                break
            with mixed():
                loss = trainer.step(*synth.sample(cfg.batch_size))
            if trainer.steps_done % cfg.eval_every == 0:
                curve.append(trainer.select(*select))
            display.advance(1, loss=loss, agree=curve[-1], **metrics)
    if trainer.steps_done % cfg.eval_every:
        curve.append(trainer.select(*select))
    return holdout, curve
