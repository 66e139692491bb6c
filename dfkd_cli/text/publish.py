"""Artefacts and measurements of a text run, and ``dfkd eval`` for a text student.

A run folder holds ``student/`` (a Hugging Face folder with the tokenizer), ``student.safetensors``
(with dfkd metadata), ``student.onnx`` (``input_ids``, ``attention_mask``, ``token_type_ids``;
dynamic batch and length), ``config.toml`` and ``report.json`` / ``report.md``; the report adds
synthesized texts per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfkd_cli import __version__
from dfkd_cli.batches import TextBatch
from dfkd_cli.distill import Run
from dfkd_cli.errors import DfkdError
from dfkd_cli.evaluate import median_ms, agreement_report, count_params
from dfkd_cli.measure import DEPLOYMENT_SKIPPED, check_fraction, deployment_checks, gate_result
from dfkd_cli.report import SCHEMA_VERSION
from dfkd_cli.runtime import Display, library_versions
from dfkd_cli.selection import split
from dfkd_cli.text.models import TextTeacher, load_text_teacher
from dfkd_cli.text.trainer import TextTrainer, text_logits

SAMPLES_PER_CLASS = 5  # synthesized texts per class shown in the report
LATENCY_TEXT = "the film was a thoughtful and quietly moving portrait of a family"  # one sentence, ~15 tokens


def publish(run_dir: Path, opts: Any, run: Run, student_name: str, eval_table: tuple[list[str], list[int] | None] | None,
            holdout: TextBatch, run_info: dict[str, Any], display: Display) -> dict[str, Any]:
    """Write the student (HF folder, safetensors, ONNX) and return the report."""
    from dfkd_cli.text.export import export_text_onnx, save_text_student

    display.stage("export", total=None)
    trainer, teacher, recipe = run.trainer, run.trainer.teacher, run.recipe
    student = trainer.student.cpu().eval()
    teacher.model.cpu()
    trainer.device = torch.device("cpu")
    meta = {"class_names": teacher.class_names, "recipe": recipe.recipe.name, "teacher": str(teacher.path.resolve()),
            "teacher_sha256": teacher.sha256, "version": __version__, "max_length": trainer.max_length,
            "student": student_name}
    sizes = save_text_student(student, teacher.tokenizer, meta, run_dir)
    report_half = split(holdout)[1]
    onnx = run_dir / "student.onnx"
    parity = (export_text_onnx(student, teacher.tokenizer, onnx, report_half.texts[:32], trainer.max_length)
              if deployment_checks() or opts.quantize == "int8" else None)  # int8 is made from student.onnx
    eval_logits = trainer.teacher_logits(eval_table[0]) if eval_table else None  # once, for int8 and the report
    int8 = _quantize(opts, run_dir, trainer, report_half, eval_table, eval_logits, display)
    if opts.save_synthetic:
        from dfkd_cli.text.synthetic_set import save_text_set

        save_text_set(run_dir / "synthetic", run.synth.pool.batch(), holdout, teacher, recipe.recipe.name)
    display.stage("evaluate", total=None)
    synthetic = agreement_report(report_half.logits, trainer.student_logits(report_half.texts), teacher.class_names)
    warnings: list[str] = [] if parity else [DEPLOYMENT_SKIPPED]
    real = measure_table(teacher, trainer, eval_table, str(opts.eval_data), teacher_logits=eval_logits) if eval_table else None
    report = {
        "schema_version": SCHEMA_VERSION, "dfkd_version": __version__, "kind": "compress", "family": "text",
        "teacher": {"arch": teacher.kind, "path": str(teacher.path), "sha256": teacher.sha256,
                    "num_classes": teacher.num_classes, "class_names": teacher.class_names, "params": teacher.num_params,
                    "latency_ms": _latency_ms(teacher.model, teacher.tokenizer, None)},
        "student": {"arch": student_name, "params": count_params(student), "layers": int(student.config.num_hidden_layers),
                    "file_bytes": {"safetensors": sizes.get("student.safetensors"), "onnx": onnx.stat().st_size if parity else None},
                    "latency_ms": _latency_ms(student, teacher.tokenizer, onnx if parity else None),
                    "compression_ratio": round(teacher.num_params / count_params(student), 3)},
        "synthetic_holdout": synthetic, "eval_data": real, "onnx_parity": parity, "int8": int8,
        "samples": run.synth.pool.by_class(teacher.class_names, SAMPLES_PER_CLASS),
        "warnings": warnings,
        "run": {"recipe": recipe.recipe.name, "seed": opts.seed, **run_info},
    }
    report["gate"] = gate_result(opts.min_agreement, report)
    return report


def _quantize(opts: Any, run_dir: Path, trainer: TextTrainer, report_half: TextBatch,
              eval_table: tuple[list[str], list[int] | None] | None, eval_logits: torch.Tensor | None,
              display: Display) -> dict[str, Any] | None:
    """``--quantize int8``: student.int8.onnx measured beside student.onnx (see :mod:`dfkd_cli.text.quantize`)."""
    if opts.quantize != "int8":
        return None
    from dfkd_cli.text.quantize import quantize_text_and_measure

    display.log("quantizing the student to int8 (dynamic quantization)")
    eval_set = None
    if eval_table is not None and eval_logits is not None:
        texts, labels = eval_table
        eval_set = (TextBatch(texts, eval_logits), torch.tensor(labels) if labels is not None else None)
    return quantize_text_and_measure(run_dir, trainer.tokenizer, trainer.max_length, report_half, eval_set)


def measure_table(teacher: TextTeacher | None, trainer: TextTrainer, table: tuple[list[str], list[int] | None],
                  source: str, onnx_path: Path | None = None, teacher_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """Agreement (with a teacher) and accuracy (with labels) on a labelled text table; the teacher's
    logits on it are computed here unless given."""
    texts, labels = table
    if teacher is not None and teacher_logits is None:
        teacher_logits = trainer.teacher_logits(texts)
    y = torch.tensor(labels) if labels is not None else None
    student = trainer.student_logits(texts)
    names = teacher.class_names if teacher else trainer.class_names
    if teacher is None:
        report: dict[str, Any] = {"n": len(texts)}
        if y is not None:
            report["student_accuracy"] = float((student.argmax(1) == y).float().mean())
    else:
        report = agreement_report(teacher_logits, student, names, y)
    if onnx_path is not None:
        from dfkd_cli.text.onnx_predict import onnx_text_predict

        onnx = torch.from_numpy(onnx_text_predict(onnx_path, trainer.tokenizer, texts, trainer.max_length))
        if teacher_logits is not None:
            report["onnx_top1_agreement"] = float((onnx.argmax(1) == teacher_logits.argmax(1)).float().mean())
        if y is not None:
            report["onnx_accuracy"] = float((onnx.argmax(1) == y).float().mean())
    report["source"] = source
    return report


def _latency_ms(model: Any, tokenizer: Any, onnx_path: Path | None) -> dict[str, float | None]:
    """Batch-1 CPU latency in PyTorch and (when exported) onnxruntime; None when deployment checks are off."""
    if not deployment_checks():
        return {"torch": None, "onnx": None}
    return {"torch": text_latency_ms(model, tokenizer), "onnx": onnx_text_latency_ms(onnx_path, tokenizer) if onnx_path else None}


def text_latency_ms(model: Any, tokenizer: Any, iters: int = 20) -> float:
    """Median CPU milliseconds for one sentence (batch 1)."""
    enc = tokenizer([LATENCY_TEXT], return_tensors="pt")
    model.eval()
    with torch.inference_mode():
        return median_ms(lambda: model(**enc), warmup=3, iters=iters)


def onnx_text_latency_ms(path: Path, tokenizer: Any, iters: int = 20) -> float:
    from dfkd_cli.export import onnx_session

    session = onnx_session(path)
    names = {i.name for i in session.get_inputs()}
    enc = tokenizer([LATENCY_TEXT], return_tensors="np")
    feed = {k: v.astype("int64") for k, v in enc.items() if k in names}
    return median_ms(lambda: session.run(None, feed), warmup=3, iters=iters)


class _Reader:
    """A student with its tokenizer, shaped like the trainer for :func:`measure_table`."""

    def __init__(self, student: Any, teacher: TextTeacher | None, tokenizer: Any, class_names: list[str], max_length: int) -> None:
        self.student, self.teacher, self.tokenizer, self.class_names, self.max_length = student, teacher, tokenizer, class_names, max_length

    def student_logits(self, texts: list[str]) -> torch.Tensor:
        return text_logits(self.student, self.tokenizer, texts, self.max_length, torch.device("cpu"))

    def teacher_logits(self, texts: list[str]) -> torch.Tensor:
        assert self.teacher is not None
        return text_logits(self.teacher.model, self.tokenizer, texts, self.max_length, torch.device("cpu"))


def evaluate_text_student(student_path: Path, teacher_path: Path | None, eval_data: Path | None, text_column: str,
                          label_column: str | None, onnx_path: Path | None, min_agreement: float | None,
                          trust_pickle: bool = False) -> dict[str, Any]:
    """The ``dfkd eval`` report for a text student (a run's ``student/`` folder or its safetensors)."""
    from dfkd_cli.text.data import read_text_table
    from dfkd_cli.text.load import load_text_student

    check_fraction(min_agreement, "--min-agreement")
    if eval_data is None:
        raise DfkdError("a text student needs --eval-data (a .tsv or .csv with a text column) to be measured on")
    if onnx_path is not None and not onnx_path.is_file():
        raise DfkdError(f"ONNX file '{onnx_path}' not found; check the path")
    student, tokenizer, meta = load_text_student(student_path)
    names = list(meta["class_names"])
    teacher, warnings = None, []
    if teacher_path is not None:
        teacher = load_text_teacher(teacher_path, trust_pickle=trust_pickle)
        if teacher.sha256 != meta.get("teacher_sha256", teacher.sha256):
            warnings.append(f"teacher weights sha256 {teacher.sha256[:12]} differ from the ones the student was "
                            f"distilled from ({str(meta['teacher_sha256'])[:12]})")
        teacher.class_names = names
    table = read_text_table(eval_data, text_column, label_column, names)
    if table[1] is None and teacher is None:
        raise DfkdError(f"eval data '{eval_data}' has no labels, so without a teacher there is nothing to measure; "
                        "name the label column (--label-column) or pass --teacher")
    reader = _Reader(student, teacher, tokenizer, names, int(meta.get("max_length", 128)))
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "dfkd_version": __version__, "kind": "eval", "family": "text",
        "run": {"versions": library_versions()},
        "teacher": {"arch": teacher.kind, "path": str(teacher_path), "sha256": teacher.sha256} if teacher else None,
        "student": {"arch": meta.get("student", type(student).__name__), "path": str(student_path),
                    "params": count_params(student), "recipe": meta.get("recipe"), "teacher_sha256": meta.get("teacher_sha256")},
        "eval_data": measure_table(teacher, reader, table, str(eval_data), onnx_path),  # type: ignore[arg-type]
        "warnings": warnings,
    }
    report["gate"] = gate_result(min_agreement, report, use_onnx=onnx_path is not None)
    return report
