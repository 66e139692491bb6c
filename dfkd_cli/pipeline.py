"""``dfkd compress``: teacher -> synthesizer -> student trainer -> exporter -> report.

The run is written into a hidden staging folder beside ``--out`` and renamed into place only when
every artefact exists, so a failed run never leaves files that look like a finished one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dfkd_cli import __version__
from dfkd_cli.config import RecipeConfig, applicable_recipes, prior_recipes
from dfkd_cli.errors import DfkdError, ExportError
from dfkd_cli.eval_data import EvalData, load_eval_data
from dfkd_cli.export import StudentMeta, export_onnx, save_student
from dfkd_cli.measure import deployment_checks, eval_data_warnings, gate_result, measure_models, real_data_report
from dfkd_cli.prior import PriorData
from dfkd_cli.report import SCHEMA_VERSION, write_report
from dfkd_cli.sample_grid import grid_sample_size, save_sample_grid
from dfkd_cli.precision import Precision, channels_last, contiguous, loss_scales, resolve_precision
from dfkd_cli.runtime import Display, Stopwatch, library_versions, seed_everything
from dfkd_cli.build import RunBuilder
from dfkd_cli.distill import Run
from dfkd_cli.planner import make_plan
from dfkd_cli.distributed import World
from dfkd_cli.race import RACE_SHARE
from dfkd_cli.resume import resume_state
from dfkd_cli.rundir import drop_checkpoints, keep_failed, move_into_place, staging_dir
from dfkd_cli.synth import Synthesizer, synthesizer_class
from dfkd_cli.session import Budgeting, Session, distill_session, run_processes
from dfkd_cli.synth.generator import largest_batch_size
from dfkd_cli.synthetic_set import SyntheticSet, load_synthetic_set, save_synthetic_set
from dfkd_cli.sources import student_source
from dfkd_cli.hf_student import write_hf_student
from dfkd_cli.teacher import Teacher, build_student, load_teacher
from dfkd_cli.toml_out import dump_toml
from dfkd_cli.trainer import predict_classes


@dataclass(frozen=True)
class CompressOptions:
    """Everything ``dfkd compress`` needs besides the recipe; saved as ``[run]`` in config.toml.
    Frozen: resolved once (:mod:`dfkd_cli.runconfig`); a stage that learns more (the student the
    teacher implies, a race's winner) makes a new copy with :func:`dataclasses.replace`."""

    teacher: Path
    arch: str | None = None  # None for a teacher that carries its architecture (see dfkd_cli.sources)
    student: str | None = None
    recipe: str = "auto"
    out: Path | None = None
    overwrite: bool = False
    steps: int | None = None
    time_budget_s: float | None = None
    input_shape: tuple[int, int, int] | None = None
    normalize: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    labels: Path | None = None
    eval_data: Path | None = None
    prior: Path | None = None
    quantize: str = "none"
    save_synthetic: bool = False
    from_synthetic: Path | None = None
    race_share: float = RACE_SHARE
    min_agreement: float | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast (and loss scaling for fp16) for synthesis and student steps
    compile: bool = False  # torch.compile the student and generator
    seed: int = 0
    trust_pickle: bool = False
    overrides: list[str] = field(default_factory=list)
    resume: bool = False  # continue the run in ``out`` from its last checkpoint
    dry_run: bool = False  # print the plan and stop
    origins: dict[str, str] = field(default_factory=dict)  # where each given option came from, for the plan
    explicit_keys: list[str] = field(default_factory=list)  # recipe keys the user set (never adjusted)
    step_adjustments: dict[str, list[Any]] = field(default_factory=dict)  # per recipe: what a short --steps scaled

    NOT_RECORDED = ("overwrite", "overrides", "out", "trust_pickle", "resume", "dry_run", "origins", "explicit_keys",
                    "step_adjustments")

    def to_dict(self) -> dict[str, Any]:
        """The ``[run]`` table of config.toml: absolute paths, no output folder or trust flags."""
        data = dataclasses.asdict(self)
        for key in self.NOT_RECORDED:
            data.pop(key)
        if self.time_budget_s is None:
            data["time_budget_s"] = "none"
        if self.recipe.endswith(".toml"):
            data["recipe"] = Path(self.recipe)
        return {k: str(v.resolve()) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in data.items()}


@dataclass
class Distilled:
    """What the distillation produced, for the artefacts and the report."""

    teacher: Teacher
    student: torch.nn.Module
    synth: Synthesizer
    holdout: torch.Tensor  # first half selected the student, second half is reported
    eval_data: EvalData | None
    training_set: tuple[torch.Tensor, str] | None  # (inputs, how they were sampled) for --save-synthetic
    run_info: dict[str, Any]


def default_out_dir(opts: CompressOptions) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{opts.teacher.stem}-{opts.recipe}-{stamp}"


def compress(opts: CompressOptions, recipes: list[RecipeConfig], display: Display) -> dict[str, Any] | None:
    """Run a whole compression and return the report (also written to ``opts.out``). One recipe
    distils alone; several race for a share of the budget first (``--recipe auto``). In a
    distributed run every rank trains and rank 0 alone writes and returns the report (the others
    return None)."""
    out = opts.out or default_out_dir(opts)
    inputs = [opts.teacher, opts.labels, opts.eval_data, opts.prior, opts.from_synthetic]
    with run_processes(out, opts.overwrite, opts.resume, inputs, opts.device) as (world, device):
        return _compress(opts, recipes, display, out, device, world)


def _compress(opts: CompressOptions, recipes: list[RecipeConfig], display: Display, out: Path, device: torch.device,
              world: World) -> dict[str, Any] | None:
    watch, started = Stopwatch(device), datetime.now(timezone.utc)
    precision = Precision(resolve_precision(opts.precision, device), device)
    _check_precision(precision, recipes, display)
    seed_everything(opts.seed)  # before the student's random initialisation
    teacher, student, eval_data, prior, synthetic = _prepare(opts, recipes[0], display, world.rank)
    opts = dataclasses.replace(opts, student=student_name(opts, teacher))
    resume = resume_state(out, teacher.sha256, recipes[0].recipe.name, device) if opts.resume else None
    if world.active:
        display.log(f"{world.size} processes: each synthesizes its own samples, gradients are averaged over all")
    watch.lap("load")

    teacher.to(device)
    if recipes[0].train.channels_last:
        channels_last(teacher.model)
    builder = RunBuilder(opts, teacher, student, device, precision, prior, synthetic, world)
    plan, recipes = make_plan(opts, recipes, teacher, device, precision, builder,
                              eval_images=len(eval_data.x) if eval_data is not None else 0)
    watch.lap("plan")
    if opts.dry_run:
        return {"dry_run": True, "plan": plan.to_dict(), "plan_lines": plan.lines()}
    for line in plan.lines():
        display.log(line)

    def make_run(recipe: RecipeConfig) -> Run:
        return builder.run(recipe, display)

    def settings(run: Run) -> str:  # checkpoints/run.toml: what --resume repeats (a race's winner)
        return dump_toml({"run": {**opts.to_dict(), "recipe": run.name}, **run.recipe.to_dict()})

    session = Session(out, device, world, precision, display, teacher.sha256, resume, started)
    budgeting = Budgeting(_distill_seconds(opts.time_budget_s, plan.export_s),  # export and evaluation fit in too
                          paces=plan.budget_binds or len(recipes) > 1, elapsed=watch.total)
    done = distill_session(session, recipes, make_run, budgeting, settings, opts.race_share)
    student = contiguous(done.run.trainer.student.cpu()) if done else None  # selected by distill_session
    contiguous(teacher.to(torch.device("cpu")).model)
    watch.lap("distill")
    if done is None:  # another rank of a distributed run: rank 0 publishes
        return None
    run = done.run
    if done.race is not None:
        opts = dataclasses.replace(opts, recipe=run.name)  # config.toml repeats the winner, not the race
    run_info = {**done.run_info, "prior": prior.describe() if prior else None,
                "from_synthetic": str(opts.from_synthetic.resolve()) if opts.from_synthetic else None,
                "synthetic_saved": opts.save_synthetic,
                "loss_scale": loss_scales(student=run.trainer.scaler, synthesizer=run.synth.scaler),
                "channels_last": run.recipe.train.channels_last, "compiled": opts.compile, "plan": plan.to_dict()}
    result = Distilled(teacher, student, run.synth, done.holdout, eval_data, _training_set(opts, run), run_info)
    return _publish(out, opts, run.recipe, result, display, watch)


def ran_options(opts: CompressOptions, teacher: Teacher, run_info: dict[str, Any]) -> dict[str, Any]:
    """config.toml's ``[run]``: the options with what they resolved to (input shape, normalisation,
    student, device, precision), so the file says what ran and ``--config`` repeats it."""
    return {**opts.to_dict(), "input_shape": list(teacher.input_shape), "mean": list(teacher.mean),
            "std": list(teacher.std), "student": run_info["plan"]["student"], "device": run_info["device"],
            "precision": run_info["precision"]}


def _distill_seconds(budget: float | None, export_s: float) -> float | None:
    """The part of ``--time-budget`` before export and evaluation, so the whole run ends within it."""
    return budget - export_s if budget is not None else None


def _check_precision(precision: Precision, recipes: list[RecipeConfig], display: Display) -> None:
    if precision.name == "fp16" and any(recipe.train.update == "lra" for recipe in recipes):
        raise DfkdError("--precision fp16 cannot scale lra's inner gradient (train.update = \"lra\"); "
                        "use --precision bf16 or fp32, or train.update=replay")
    if note := precision.slow_note():
        display.log(note)


def _training_set(opts: CompressOptions, run: Run) -> tuple[torch.Tensor, str] | None:
    if not opts.save_synthetic:
        return None
    if run.recorder is None:
        return run.synth.pool.tensor(), "the recipe's synthetic pool"
    seen = run.recorder.seen
    return run.recorder.tensor(), f"a uniform sample of the {seen:,} training inputs (the recipe makes every batch fresh)"


def _publish(out: Path, opts: CompressOptions, recipe: RecipeConfig, result: Distilled, display: Display,
             watch: Stopwatch) -> dict[str, Any]:
    """Write every artefact into a staging folder, then rename it to ``out`` in one step."""
    with staging_dir(out) as staging:
        try:
            report = _write_artefacts(staging, opts, recipe, result, display, watch)
            report["run"].update(result.run_info)
            report["warnings"] += _prior_warnings(result.run_info.get("prior")) + result.run_info["health"]["warnings"]
            write_report(staging, report)
            move_into_place(staging, out)
        except ExportError as err:
            for onnx_file in ("student.onnx", "student.int8.onnx"):
                (staging / onnx_file).unlink(missing_ok=True)
            failed = keep_failed(staging, out)
            drop_checkpoints(out)  # resuming would end in the same failed export
            raise ExportError(f"{err.message} (the PyTorch student is kept in '{failed}')") from None
    return report


def _prior_warnings(prior: dict[str, Any] | None) -> list[str]:
    if not prior or not prior["skipped_unreadable"]:
        return []
    return [f"{prior['skipped_unreadable']} of the {prior['images']} files in prior '{prior['path']}' could not be "
            "decoded and were skipped"]


def _prepare(opts: CompressOptions, recipe: RecipeConfig, display: Display, rank: int = 0
             ) -> tuple[Teacher, torch.nn.Module, EvalData | None, PriorData | None, SyntheticSet | None]:
    """Load and check every input before any long work starts."""
    teacher = load_teacher(opts.teacher, opts.arch, opts.input_shape, opts.normalize, opts.mean, opts.std,
                           opts.labels, trust_pickle=opts.trust_pickle)
    if recipe.recipe.family != "image":
        raise DfkdError(f"recipe '{recipe.recipe.name}' is for {recipe.recipe.family} teachers (a Hugging Face model "
                        f"folder); pick an image recipe for {teacher.arch}: {', '.join(applicable_recipes(teacher))}")
    cls = synthesizer_class(recipe.recipe.synthesizer)
    if (recipe.recipe.requires_bn or cls.capabilities.requires_bn) and not teacher.has_bn and opts.from_synthetic is None:
        usable = ", ".join(applicable_recipes(teacher)) or "none"
        raise DfkdError(f"recipe '{recipe.recipe.name}' needs a teacher with BatchNorm layers and {teacher.arch} has none; "
                        f"recipes that apply: {usable}")
    student = build_student(student_name(opts, teacher), teacher)
    eval_data = None
    if opts.eval_data is not None:
        eval_data = load_eval_data(opts.eval_data, teacher.input_shape, teacher.mean, teacher.std, teacher.class_names)
    synthetic = load_synthetic_set(opts.from_synthetic, teacher) if opts.from_synthetic is not None else None
    return teacher, student, eval_data, _open_prior(opts, recipe, teacher, rank), synthetic


def student_name(opts: CompressOptions, teacher: Teacher) -> str:
    """``--student``, else the teacher's default student."""
    if opts.student is not None:
        return opts.student
    if teacher.default_student is None:
        raise DfkdError(f"no default student for {teacher.arch}; pass --student NAME (list them with `dfkd archs`)")
    return teacher.default_student


def _open_prior(opts: CompressOptions, recipe: RecipeConfig, teacher: Teacher, rank: int = 0) -> PriorData | None:
    """The ``--prior`` images for recipes that use them; an error for those that do not."""
    cls, name = synthesizer_class(recipe.recipe.synthesizer), recipe.recipe.name
    if opts.from_synthetic is not None and opts.prior is not None:
        raise DfkdError("--from-synthetic trains on a saved set without synthesizing, so --prior has no use; leave it out")
    if opts.from_synthetic is not None:
        return None
    if opts.prior is not None and not cls.capabilities.uses_prior:
        raise DfkdError(f"recipe '{name}' does not use --prior; leave it out, or pick a recipe that does: {', '.join(prior_recipes())}")
    if opts.prior is None and cls.capabilities.uses_prior:
        raise DfkdError(f"recipe '{name}' needs --prior: a folder (or .npz) of unlabelled images from a related "
                        "domain, e.g. USPS digits for an MNIST teacher")
    if opts.prior is None:
        return None
    batch = max(recipe.train.batch_size, largest_batch_size(recipe.synth))  # "auto" is resolved later
    reserve = recipe.train.holdout if cls.capabilities.prior_holdout else 0
    return PriorData(opts.prior, teacher.input_shape, teacher.mean, teacher.std, batch, reserve, seed=opts.seed + rank)


def _write_artefacts(run_dir: Path, opts: CompressOptions, recipe: RecipeConfig, result: Distilled,
                     display: Display, watch: Stopwatch) -> dict[str, Any]:
    teacher, student, holdout, eval_data = result.teacher, result.student, result.holdout, result.eval_data
    display.stage("export", total=None)
    meta = StudentMeta(arch=opts.student, num_classes=teacher.num_classes, input_shape=teacher.input_shape,
                       mean=teacher.mean, std=teacher.std, class_names=teacher.class_names,
                       recipe=recipe.recipe.name, teacher_arch=teacher.arch, teacher_sha256=teacher.sha256,
                       dfkd_version=__version__, arch_source=student_source(opts.student, teacher))
    save_student(student, meta, run_dir / "student.safetensors")
    write_hf_student(run_dir, student, teacher)  # student_hf/ for a Hugging Face student, else nothing
    x_report = holdout[len(holdout) // 2 :].cpu()
    parity = (export_onnx(student, run_dir / "student.onnx", teacher.input_shape, x_report[:16])
              if deployment_checks() or opts.quantize == "int8" else None)  # int8 is made from student.onnx
    int8 = _quantize(opts, run_dir, teacher, holdout, eval_data, display)
    if result.training_set is not None:
        x_train, sampling = result.training_set
        save_synthetic_set(run_dir / "synthetic", x_train, holdout, teacher, recipe.recipe.name, sampling)
    pool_sample = result.synth.preview(grid_sample_size(teacher.num_classes)).cpu()
    save_sample_grid(pool_sample, predict_classes(teacher.model, pool_sample), teacher.mean, teacher.std,
                     teacher.class_names, run_dir / "samples.png")
    config = {"run": ran_options(opts, teacher, result.run_info), **recipe.to_dict()}
    (run_dir / "config.toml").write_text(dump_toml(config), encoding="utf-8")
    watch.lap("export")

    display.stage("evaluate", total=None)
    report = {"schema_version": SCHEMA_VERSION, "dfkd_version": __version__,
              **measure_models(teacher, student, opts.student, run_dir, x_report)}
    report["eval_data"] = real_data_report(teacher, student, eval_data) if eval_data else None
    report["warnings"] += eval_data_warnings(eval_data) if eval_data else []
    report["onnx_parity"] = parity.to_dict() if parity else None
    report["int8"] = int8
    report["gate"] = gate_result(opts.min_agreement, report)
    watch.lap("evaluate")
    watch.seconds["total"] = round(sum(watch.seconds.values()), 3)
    report["run"] = {"recipe": recipe.recipe.name, "seed": opts.seed, "wall_clock_s": dict(watch.seconds),
                     "peak_memory_mb": dict(watch.memory_mb), "config": config, "versions": library_versions()}
    return report


def _quantize(opts: CompressOptions, run_dir: Path, teacher: Teacher, holdout: torch.Tensor,
              eval_data: EvalData | None, display: Display) -> dict[str, Any] | None:
    """``--quantize int8``: student.int8.onnx calibrated on the selection half of the held-out
    synthetic samples, measured on the report half (and eval data)."""
    if opts.quantize != "int8":
        return None
    from dfkd_cli.quantize import quantize_and_measure  # onnxruntime.quantization is slow to import

    display.log("quantizing the student to int8 (calibration: held-out synthetic samples)")
    return quantize_and_measure(run_dir, teacher.model, teacher.input_shape, holdout, eval_data)
