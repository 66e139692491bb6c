"""The ``dfkd`` command line: parses options, calls the pipeline, renders results, maps errors.

Results go to stdout, progress and logs to stderr. Errors and exit codes: :mod:`dfkd_cli.cli_common`;
``dfkd recipes``: :mod:`dfkd_cli.cli_recipes`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dfkd_cli import __version__, interrupts
from dfkd_cli.cli_common import FormatOption, OneLineErrors, OutputFormat, check_gate, user_errors
from dfkd_cli.cli_recipes import recipes_app
from dfkd_cli.errors import DfkdError
from dfkd_cli.outlock import refuse_if_locked

app = typer.Typer(
    cls=OneLineErrors,
    name="dfkd",
    help="Data-free knowledge distillation: compress a teacher network into a small student without its data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(recipes_app, name="recipes")

DEMO_DIR = Path(__file__).resolve().parent / "demo"


def _without_nproc(args: list[str]) -> list[str]:
    """The command line for each process of ``--nproc N``: the same, less ``--nproc``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _version(value: bool) -> None:
    if value:
        print(f"dfkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False) -> None:
    """dfkd: data-free knowledge distillation."""


@app.command()
@user_errors
def compress(
    teacher: Annotated[Optional[Path], typer.Argument(help="Teacher: a weights file (.safetensors, .pt) with --arch, a torch.export program (.pt2), or a Hugging Face image or text classifier folder.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Teacher architecture of a weights file (see `dfkd archs`; timm:NAME for timm).")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student: a name from `dfkd archs` (timm:NAME too), hf:small or a Hugging Face config folder for a Hugging Face teacher; default: the teacher's own default student.")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Recipe name (see `dfkd recipes`), a .toml file, or auto (default): the strongest recipe that applies to the teacher.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe key: -s train.lr=0.01 (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder to create (default runs/<teacher>-<recipe>-<time>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    steps: Annotated[Optional[int], typer.Option(help="Student optimisation steps (overrides train.steps).", min=1)] = None,
    time_budget: Annotated[Optional[str], typer.Option(help="Wall-clock budget for the whole run, e.g. 90s, 10m, 2h (default 10m); none runs to the recipe's steps.")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="Teacher input as CxHxW, e.g. 3x32x32.")] = None,
    normalize: Annotated[Optional[str], typer.Option(help="Normalisation preset: imagenet, cifar10 or mnist.")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Per-channel mean, comma separated (overrides --normalize).")] = None,
    std: Annotated[Optional[str], typer.Option(help="Per-channel std, comma separated.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Text file with one class name per line.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Labelled real data for the report: image folder or .npz.")] = None,
    prior: Annotated[Optional[Path], typer.Option(help="Unlabelled images from a related domain (folder or .npz with x) for the recipes that use them: avkd, prior-kd.")] = None,
    save_synthetic: Annotated[bool, typer.Option("--save-synthetic", help="Also write the synthetic training set (float16 .npz shards with the teacher's soft labels, a manifest) to OUT/synthetic/.")] = False,
    from_synthetic: Annotated[Optional[Path], typer.Option(help="Train on a saved synthetic set (a run's synthetic/ folder) instead of synthesizing; refused for another teacher.")] = None,
    race_share: Annotated[Optional[float], typer.Option(help="With --recipe auto: the budget's share the race takes (default 0.15); the leader gets the rest.")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="none (default) or int8: also write student.int8.onnx, calibrated on held-out synthetic samples; --min-agreement then gates it.")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Fail (exit 1) below this teacher-student agreement.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (CPU runs repeat exactly).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="DANGEROUS: allow checkpoints that run pickled code when loaded.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="Repeat a run from its config.toml (flags given here win).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the unfinished run in this folder from its last checkpoint (its own settings; only --device may change).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (default: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPUs), fp32, bf16 (also 1.5-2x faster on CPUs with AVX512-BF16 or AMX) or fp16 (with loss scaling): autocast for synthesis and student steps.")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the student and generator (pays off on long GPU runs; off by default).")] = False,
    nproc: Annotated[Optional[int], typer.Option(help="Train with N processes on this machine (gloo on CPU, NCCL on GPUs), as torchrun --standalone --nproc-per-node N would.", min=1)] = None,
    demo: Annotated[bool, typer.Option(help="Run on the bundled MNIST teacher and real held-out digits.")] = False,
    generator: Annotated[Optional[Path], typer.Option(help="Text teachers: a local causal LM folder (GPT-2 family) that completes prompts (promptdfd-manual, promptdfd-rl).")] = None,
    prompter: Annotated[Optional[Path], typer.Option(help="Text teachers: a small causal LM folder (DistilGPT2-like) that promptdfd-rl trains to write prompts.")] = None,
    text_column: Annotated[Optional[str], typer.Option(help="Text teachers: the --eval-data column holding the text (default sentence).")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Text teachers: the --eval-data column holding the label (default label).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (settings, stages, estimated time and memory, measured on a few real steps) and exit.")] = False,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Compress TEACHER into a student with a data-free recipe; writes student, ONNX and report."""
    if resume or out:
        refuse_if_locked(resume or out)  # a busy --out fails at once, before the slow imports
    from dfkd_cli.pipeline import compress as run_compress
    from dfkd_cli.render import render_compress, render_plan
    from dfkd_cli.runconfig import resolve_compress, resolve_resume
    from dfkd_cli.runtime import make_display

    if demo and config:
        raise DfkdError("--demo and --config both name a run config; pass only one")
    if nproc is not None and nproc > 1:
        from dfkd_cli.distributed import launch

        raise typer.Exit(launch(nproc, _without_nproc(sys.argv[1:])))
    flags = dict(teacher=teacher, arch=arch, student=student, recipe=recipe, out=out, steps=steps,
                 time_budget_s=_time_budget_flag(time_budget), input_shape=input_shape,
                 normalize=normalize, mean=mean, std=std, labels=labels, eval_data=eval_data,
                 prior=prior, quantize=quantize, save_synthetic=save_synthetic or None,
                 from_synthetic=from_synthetic, race_share=race_share, min_agreement=min_agreement, device=device, seed=seed,
                 precision=precision, compile=compile_ or None)
    text_flags = dict(generator=generator, prompter=prompter, text_column=text_column, label_column=label_column)
    from dfkd_cli.resume import CheckpointDir
    from dfkd_cli.text.options import config_names_text_teacher, refuse_text_flags

    if resume is not None:
        is_text = config_names_text_teacher(CheckpointDir(resume).settings()) if resume.is_dir() else False
    elif teacher is not None:
        is_text = _is_text_folder(teacher, arch)
    else:
        is_text = config is not None and config_names_text_teacher(config)
    if is_text and not demo:
        others = {**flags, **text_flags, "set_": set_ or None, "config": config, "overwrite": overwrite or None}
        _compress_text({**flags, **text_flags}, set_ or [], overwrite, trust_pickle, output_format, config,
                       resume, others)
        return

    refuse_text_flags({**text_flags, "teacher": teacher})
    if resume is not None:
        others = {**flags, "set_": set_ or None, "config": config, "demo": demo or None, "overwrite": overwrite or None}
        opts, recipes = resolve_resume(resume, others, trust_pickle=trust_pickle)
    else:
        opts, recipes = resolve_compress(flags, set_ or [], DEMO_DIR / "demo.toml" if demo else config,
                                         overwrite=overwrite, trust_pickle=trust_pickle)
    opts = dataclasses.replace(opts, dry_run=dry_run)
    display = make_display(output_format.value)
    try:
        report = run_compress(opts, recipes, display)
    finally:
        display.close()
    if report is None:  # a distributed run's other ranks: rank 0 reports
        return
    if report.get("dry_run"):
        render_plan(report, output_format.value)
        return
    render_compress(report, output_format.value)
    check_gate(report)


def _is_text_folder(teacher: Path, arch: str | None) -> bool:
    """A folder is a Hugging Face text teacher unless its config names an image classifier (an image
    checkpoint is a file; a folder given with --arch and no config.json gets the image loader's message)."""
    from dfkd_cli.sources import teacher_kind

    if not teacher.is_dir() or teacher_kind(teacher) != "checkpoint":  # an image folder, or a .pt2 name
        return False
    return (teacher / "config.json").is_file() or arch is None


def _time_budget_flag(text: str | None) -> float | str | None:
    """``--time-budget``: seconds, "none" (kept as such: no budget), or None when not given."""
    from dfkd_cli.runtime import parse_duration

    if text is None:
        return None
    return "none" if text.strip().lower() == "none" else parse_duration(text)


def _compress_text(flags: dict[str, Any], overrides: list[str], overwrite: bool, trust_pickle: bool,
                   output_format: OutputFormat, config: Path | None, resume: Path | None,
                   others: dict[str, Any]) -> None:
    """``dfkd compress`` for a Hugging Face text classifier folder (or ``--resume`` of a text run)."""
    from dfkd_cli.render import render_compress
    from dfkd_cli.runconfig import refuse_resume_flags
    from dfkd_cli.runtime import make_display
    from dfkd_cli.text.options import resolve_text, resolve_text_resume
    from dfkd_cli.resume import CheckpointDir
    from dfkd_cli.text.pipeline import compress_text

    if resume is not None:
        refuse_resume_flags(others)
        opts, recipes = resolve_text_resume(resume, CheckpointDir(resume).settings(), flags["device"], trust_pickle)
    else:
        opts, recipes = resolve_text(flags, overrides, overwrite, trust_pickle, config)
    display = make_display(output_format.value)
    try:
        report = compress_text(opts, recipes, display)
    finally:
        display.close()
    if report is None:  # a distributed run's other ranks: rank 0 reports
        return
    render_compress(report, output_format.value)
    check_gate(report)


@app.command("eval")
@user_errors
def eval_(
    student: Annotated[Path, typer.Argument(help="student.safetensors written by `dfkd compress`, or a text run's student/ folder.")],
    teacher: Annotated[Optional[Path], typer.Option(help="Teacher checkpoint to measure agreement with.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Teacher architecture (default: the one recorded in the student).")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Real data: image folder (a sub-folder per class) or .npz with x, y.")] = None,
    onnx: Annotated[Optional[Path], typer.Option(help="Also check this ONNX export of the student; the gate then applies to it.")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Fail (exit 1) below this agreement on --eval-data.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="DANGEROUS: allow a teacher checkpoint that runs pickled code.")] = False,
    text_column: Annotated[Optional[str], typer.Option(help="Text students: the --eval-data (.tsv/.csv) column holding the text (default sentence).")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Text students: the --eval-data column holding the label (default label).")] = None,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Agreement and accuracy report for a distilled student; usable as a CI deployment gate."""
    from dfkd_cli.measure import evaluate_student
    from dfkd_cli.render import render_eval
    from dfkd_cli.text.options import is_text_student

    if is_text_student(student):
        from dfkd_cli.text.publish import evaluate_text_student

        if arch is not None:
            raise DfkdError("--arch is for image students; a text student records its model in its own config")
        report = evaluate_text_student(student, teacher, eval_data, text_column or "sentence", label_column or "label",
                                       onnx, min_agreement, trust_pickle)
    else:
        if text_column is not None or label_column is not None:
            raise DfkdError("--text-column and --label-column are for text students (a Hugging Face student folder)")
        report = evaluate_student(student, teacher, arch, eval_data, onnx, min_agreement, trust_pickle)
    render_eval(report, output_format.value)
    check_gate(report)


@app.command()
@user_errors
def quantize(
    run: Annotated[Path, typer.Argument(help="A run folder made by `dfkd compress --save-synthetic`.")],
    eval_data: Annotated[Optional[Path], typer.Option(help="Real data to measure the int8 student on too (never used to calibrate).")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Fail (exit 1) when the int8 student agrees less with the teacher.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="DANGEROUS: allow a teacher checkpoint that runs pickled code.")] = False,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """Write RUN/student.int8.onnx, calibrated on the run's saved held-out synthetic samples."""
    refuse_if_locked(run)  # a run still writing RUN fails before the slow imports
    from dfkd_cli.quantize import quantize_run
    from dfkd_cli.render import render_quantize

    report = quantize_run(run, eval_data, min_agreement, trust_pickle)
    render_quantize(report, output_format.value)
    check_gate(report)


@app.command()
@user_errors
def inspect(
    teacher: Annotated[Path, typer.Argument(help="Teacher: a weights file with --arch, a .pt2 program, or a Hugging Face image or text classifier folder.")],
    arch: Annotated[Optional[str], typer.Option(help="Architecture of a weights file (see `dfkd archs`); folders and .pt2 programs carry their own.")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="Input as CxHxW, e.g. 3x32x32.")] = None,
    normalize: Annotated[Optional[str], typer.Option(help="Normalisation preset: imagenet, cifar10 or mnist.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Text file with one class name per line.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="DANGEROUS: allow checkpoints that run pickled code.")] = False,
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """What dfkd sees in a teacher: classes, input shape, BatchNorm layers, parameters, recipes."""
    from dfkd_cli.config import applicable_recipes, prior_recipes
    from dfkd_cli.policy import auto_choice
    from dfkd_cli.render import render_inspect
    from dfkd_cli.teacher import load_teacher, parse_input_shape

    if _is_text_folder(teacher, arch):
        from dfkd_cli.text.options import inspect_text_teacher

        render_inspect(inspect_text_teacher(teacher, labels, trust_pickle), output_format.value)
        return
    shape = parse_input_shape(input_shape) if input_shape else None
    t = load_teacher(teacher, arch, shape, normalize=normalize, labels=labels, trust_pickle=trust_pickle)
    info = {"path": str(teacher), "arch": t.arch, "source": t.source, "sha256": t.sha256, "num_classes": t.num_classes,
            "class_names": t.class_names, "input_shape": list(t.input_shape), "mean": list(t.mean), "std": list(t.std),
            "params": t.num_params, "bn_layers": t.bn_layers, "has_bn": t.has_bn,
            "default_student": t.default_student, "recipes": applicable_recipes(t), "auto": auto_choice(t),
            "recipes_needing_prior": [r for r in prior_recipes() if r in applicable_recipes(t)]}
    render_inspect(info, output_format.value)


@app.command()
@user_errors
def archs(
    pattern: Annotated[str, typer.Argument(help="Glob filter, e.g. 'resnet*' or '*wrn*'; 'timm:resnet*' for timm's models.")] = "*",
    output_format: FormatOption = OutputFormat.human,
) -> None:
    """List the architectures dfkd can build, filtered by a glob pattern."""
    from dfkd_cli.archs import get_arch, list_archs
    from dfkd_cli.archs_timm import is_timm_name
    from dfkd_cli.render import render_rows

    rows = [{"name": n, "family": get_arch(n).family, "default_student": get_arch(n).default_student or ""}
            for n in list_archs(pattern)]
    in_timm = is_timm_name(pattern)
    if not rows:
        whole = "dfkd archs 'timm:*'" if in_timm else "dfkd archs"
        raise DfkdError(f"no architecture matches '{pattern}'; try `{whole}` for the whole list")
    render_rows(rows, output_format.value, title="timm models" if in_timm else "architectures (timm's models too: dfkd archs 'timm:*')")


def main() -> None:
    """Console entry point. Ctrl-C and SIGTERM get their exit 130 and one line from here on, also
    while torch is still being imported (see :mod:`dfkd_cli.interrupts`)."""
    interrupts.install()
    app()
