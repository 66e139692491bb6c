"""Measurements shared by ``dfkd compress`` and ``dfkd eval``: agreement, size, latency, gates."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd_cli import validate
from dfkd_cli.errors import DfkdError, ExportError
from dfkd_cli.evaluate import (
    agreement_report,
    count_params,
    file_size_bytes,
    onnx_latency_ms,
    predict,
    torch_latency_ms,
)
from dfkd_cli.eval_data import EvalData
from dfkd_cli.export import export_onnx, onnx_predict
from dfkd_cli.sources import student_source
from dfkd_cli.teacher import Teacher

# Internal, not a user option: the test suite turns this off (tests/conftest.py) for runs that are not
# about deployment, so compress skips the ONNX export and every latency loop; the report says so.
DEPLOYMENT_CHECKS = True
DEPLOYMENT_SKIPPED = "ONNX export and latency measurement skipped (internal test setting, never set by the CLI)"


def deployment_checks() -> bool:
    """Whether compress exports ONNX and measures latency: always, except in parts of the test suite."""
    return DEPLOYMENT_CHECKS


def teacher_summary(teacher: Teacher, warnings: list[str]) -> dict[str, Any]:
    """Identity, size and CPU latency (PyTorch and onnxruntime) of the teacher."""
    model = teacher.model.cpu()
    path = Path(teacher.path)
    return {
        "arch": teacher.arch,
        "source": source_summary(teacher.source),
        "path": str(path),
        "sha256": teacher.sha256,
        "num_classes": teacher.num_classes,
        "input_shape": list(teacher.input_shape),
        "has_bn": teacher.has_bn,
        "params": count_params(model),
        "file_bytes": file_size_bytes(path) if path.is_file() else None,
        "latency_ms": {"torch": torch_latency_ms(model, teacher.input_shape),
                       "onnx": _teacher_onnx_latency(model, teacher.input_shape, warnings)}
        if deployment_checks() else {"torch": None, "onnx": None},
    }


def source_summary(source: dict[str, Any]) -> dict[str, Any]:
    """Where an architecture came from, for the report (a Hugging Face config is named by its
    model type rather than copied in full: the student file keeps the whole config)."""
    summary = {key: value for key, value in source.items() if key != "config"}
    if isinstance(source.get("config"), dict):
        summary["model_type"] = source["config"].get("model_type")
    return summary


def _teacher_onnx_latency(model: nn.Module, input_shape: tuple[int, int, int], warnings: list[str]) -> float | None:
    with tempfile.TemporaryDirectory(prefix="dfkd-teacher-onnx-") as tmp:
        path = Path(tmp) / "teacher.onnx"
        try:
            export_onnx(model, path, input_shape, torch.randn(4, *input_shape), role="teacher")
        except ExportError as err:
            warnings.append(f"teacher ONNX latency not measured: {err.message}")
            return None
        return onnx_latency_ms(path, input_shape)


def student_summary(student: nn.Module, arch: str, input_shape: tuple[int, int, int], teacher_params: int | None,
                    safetensors_path: Path | None, onnx_path: Path | None) -> dict[str, Any]:
    """Size, CPU latency and compression ratio of the student."""
    params = count_params(student)
    return {
        "arch": arch,
        "params": params,
        "file_bytes": {"safetensors": file_size_bytes(safetensors_path) if safetensors_path else None,
                       "onnx": file_size_bytes(onnx_path) if onnx_path else None},
        "latency_ms": {"torch": torch_latency_ms(student, input_shape),
                       "onnx": onnx_latency_ms(onnx_path, input_shape) if onnx_path else None}
        if deployment_checks() else {"torch": None, "onnx": None},
        "compression_ratio": round(teacher_params / params, 3) if teacher_params else None,
    }


def measure_models(teacher: Teacher, student: nn.Module, student_arch: str, run_dir: Path,
                   x_report: torch.Tensor) -> dict[str, Any]:
    """The teacher/student/synthetic-holdout part of a compress report."""
    warnings: list[str] = [] if deployment_checks() else [DEPLOYMENT_SKIPPED]
    teacher_part = teacher_summary(teacher, warnings)
    onnx_path = run_dir / "student.onnx"
    student_part = student_summary(student, student_arch, teacher.input_shape, teacher_part["params"],
                                   run_dir / "student.safetensors", onnx_path if onnx_path.is_file() else None)
    student_part["source"] = source_summary(student_source(student_arch, teacher))
    holdout = agreement_report(predict(teacher.model, x_report), predict(student, x_report), teacher.class_names)
    return {"teacher": teacher_part, "student": student_part, "synthetic_holdout": holdout, "warnings": warnings}


def real_data_report(teacher: Teacher | None, student: nn.Module, data: EvalData,
                     onnx_path: Path | None = None) -> dict[str, Any]:
    """Agreement (when there is a teacher) and accuracy (when labelled) on real data."""
    student_logits = predict(student, data.x)
    teacher_logits = predict(teacher.model, data.x) if teacher is not None else None
    if teacher is not None:
        report = agreement_report(teacher_logits, student_logits, teacher.class_names, data.y)
    else:
        report = {"n": len(data.x)}
        if data.y is not None:
            report["student_accuracy"] = float((student_logits.argmax(1) == data.y).float().mean())
    if onnx_path is not None:
        onnx_classes = torch.from_numpy(onnx_predict(onnx_path, data.x.numpy())).argmax(1)
        reference = (teacher_logits if teacher_logits is not None else student_logits).argmax(1)
        report["onnx_top1_agreement"] = float((onnx_classes == reference).float().mean())
        if data.y is not None:
            report["onnx_accuracy"] = float((onnx_classes == data.y).float().mean())
    report.update(source=data.source, skipped_files=data.skipped, label_mapping=data.label_mapping)
    return report


def eval_data_warnings(data: EvalData) -> list[str]:
    """Things about real data a user should know before trusting its accuracy numbers."""
    warnings = []
    if data.label_mapping == "sorted":
        warnings.append("eval-data folder names are not the teacher's class names; labels follow sorted folder order")
    if data.skipped:
        warnings.append(f"{data.skipped} unreadable eval-data file(s) skipped")
    return warnings


def check_fraction(value: float | None, flag: str) -> None:
    """A threshold between 0 and 1, checked before any long work starts."""
    if value is not None:
        validate.fraction(value, flag)


def gate_result(min_agreement: float | None, report: dict[str, Any], use_onnx: bool = False) -> dict[str, Any] | None:
    """Check ``--min-agreement`` on real data when given, else on the held-out synthetic samples;
    on the int8 student when the report has one (it is then the deliverable)."""
    if min_agreement is None:
        return None
    if report.get("int8"):
        return _int8_gate(min_agreement, report["int8"])
    source = "eval_data" if report.get("eval_data") else "synthetic_holdout"
    section = report.get(source)
    if not section or "top1_agreement" not in section:
        raise DfkdError("--min-agreement needs a teacher to agree with; pass --teacher (and --eval-data)")
    key = "onnx_top1_agreement" if use_onnx and "onnx_top1_agreement" in section else "top1_agreement"
    measured = section[key]
    return {"min_agreement": min_agreement, "measured_on": source, "metric": key, "measured": measured,
            "passed": measured >= min_agreement}


def _int8_gate(min_agreement: float, int8: dict[str, Any]) -> dict[str, Any]:
    source = "eval_data" if int8.get("eval_data") else "synthetic"
    measured = int8[source]["int8_top1_agreement"]
    return {"min_agreement": min_agreement, "measured_on": f"int8 student, {source.replace('_', ' ')}",
            "metric": "int8_top1_agreement", "measured": measured, "passed": measured >= min_agreement}


def evaluate_student(student_path: Path, teacher_path: Path | None, arch: str | None, eval_data_path: Path | None,
                     onnx_path: Path | None, min_agreement: float | None, trust_pickle: bool = False) -> dict[str, Any]:
    """The `dfkd eval` report: the student rebuilt from its own metadata, measured against the
    teacher (when given) on real data (when given)."""
    from dfkd_cli import __version__
    from dfkd_cli.eval_data import load_eval_data
    from dfkd_cli.export import load_student
    from dfkd_cli.report import SCHEMA_VERSION
    from dfkd_cli.runtime import library_versions
    from dfkd_cli.sources import needs_arch
    from dfkd_cli.teacher import load_teacher
    check_fraction(min_agreement, "--min-agreement")
    if teacher_path is None and eval_data_path is None:
        raise DfkdError("nothing to measure; pass --teacher (agreement) and/or --eval-data (accuracy)")
    if onnx_path is not None and not onnx_path.is_file():
        raise DfkdError(f"ONNX file '{onnx_path}' not found; check the path")
    student, meta = load_student(student_path)
    warnings: list[str] = []
    teacher = None
    if teacher_path is not None:
        recorded = meta.teacher_arch if needs_arch(teacher_path) else None  # folders and programs carry theirs
        teacher = load_teacher(teacher_path, arch or recorded, meta.input_shape, mean=list(meta.mean),
                               std=list(meta.std), trust_pickle=trust_pickle)
        if teacher.num_classes != meta.num_classes:
            raise DfkdError(f"teacher '{teacher_path}' has {teacher.num_classes} classes but student '{student_path}' "
                            f"has {meta.num_classes}; pass the teacher the student was distilled from")
        teacher.class_names = list(meta.class_names)
        if teacher.sha256 != meta.teacher_sha256:
            warnings.append(f"teacher file sha256 {teacher.sha256[:12]} differs from the one the student was "
                            f"distilled from ({meta.teacher_sha256[:12]})")
    data = None
    if eval_data_path is not None:
        data = load_eval_data(eval_data_path, meta.input_shape, meta.mean, meta.std, list(meta.class_names))
        if data.y is None and teacher is None:
            raise DfkdError(f"eval data '{eval_data_path}' has no labels, so without a teacher there is nothing to "
                            "measure; add labels (y in the .npz, a sub-folder per class) or pass --teacher")
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "dfkd_version": __version__, "kind": "eval",
        "run": {"versions": library_versions()},
        "teacher": {"arch": teacher.arch, "source": source_summary(teacher.source), "path": str(teacher_path),
                    "sha256": teacher.sha256} if teacher else None,
        "student": {"arch": meta.arch, "source": source_summary(meta.arch_source), "path": str(student_path), "params": count_params(student),
                    "recipe": meta.recipe, "teacher_sha256": meta.teacher_sha256},
        "eval_data": real_data_report(teacher, student, data, onnx_path) if data is not None else None,
        "warnings": warnings + (eval_data_warnings(data) if data is not None else []),
    }
    report["gate"] = gate_result(min_agreement, report, use_onnx=onnx_path is not None)
    return report
