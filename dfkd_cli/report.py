"""The run report: one versioned JSON document and a Markdown rendering of it.

``report.json`` is the source of truth. :func:`write_report` reads the pipeline's dict into the
typed :class:`~dfkd_cli.report_model.Report` (which checks every key against the published schema,
docs/report.schema.json), writes that report's JSON and renders ``report.md`` from the same object,
so the two never disagree.

Example:
    >>> write_report(run_dir, {"schema_version": SCHEMA_VERSION, "dfkd_version": "0.1.0",
    ...                        "run": {...}, "teacher": {...}, "student": {...}, ...})
    >>> sorted(p.name for p in run_dir.iterdir())
    ['report.json', 'report.md']
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd_cli.atomic import atomic_write
from dfkd_cli.report_model import (SCHEMA_VERSION, Agreement, EvalData, Gate, Int8, OnnxParity, Race, Report, Run,
                                   Student, StudentFiles, Teacher)

__all__ = ["SCHEMA_VERSION", "render_markdown", "typed_report", "write_report"]

STAGES = ("load", "synthesize", "train", "export", "evaluate", "total")
MAX_CLASS_ROWS = 100  # per-class table rows in report.md before only the weakest classes are listed


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Validate ``report`` and write ``report.json`` and ``report.md`` into ``run_dir`` atomically.

    Non-finite floats become ``null`` (strict JSON), paths become strings; the result is read into
    a typed :class:`Report` (``ValueError`` naming the first key that is missing, unknown or of the
    wrong type, or a ``schema_version`` other than :data:`SCHEMA_VERSION`), and both files are
    written from it. The caller's dict is not changed.

    Example:
        >>> write_report(Path("runs/x"), report)
    """
    typed = typed_report(report)
    text = json.dumps(typed.to_dict(), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "report.json", text + "\n")
    atomic_write(run_dir / "report.md", render_markdown(typed))


def typed_report(report: dict[str, Any]) -> Report:
    """``report`` (as the pipeline builds it: paths, numpy scalars, NaN allowed) as a checked :class:`Report`."""
    return Report.from_dict(_json_ready(report))


def _json_ready(value: Any) -> Any:
    """A copy of ``value`` made of JSON types: NaN/inf -> None, Path -> str, numpy/torch scalars -> Python."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def render_markdown(report: Report | dict[str, Any]) -> str:
    """Render a report as Markdown. A dict is read leniently (``Report.from_dict(partial=True)``):
    every optional section may be missing or ``None``.

    Example:
        >>> render_markdown(report).splitlines()[0]
        '# dfkd report: resnet34 → resnet8'
    """
    if not isinstance(report, Report):
        report = Report.from_dict(_json_ready(report), partial=True)
    teacher, student = report.teacher or Teacher.blank(), report.student or Student.blank()
    run = report.run or Run.blank()
    sections = [
        f"# dfkd report: {_known(teacher.arch)} → {_known(student.arch)}",
        _run_line(report.dfkd_version, run),
        _summary_section(report, run),
        _models_section(teacher, student),
        _warnings_section(report.warnings or []),
        _race_section(run.race),
        _per_class_section(report.synthetic_holdout, report.eval_data),
        _text_samples_section(report.samples),
        _timings_section(run),
        _config_section(run.config),
        _versions_section(run.versions),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _known(value: Any) -> str:
    return "?" if value is None else str(value)


def _run_line(dfkd_version: str | None, run: Run) -> str:
    parts = [f"dfkd {_known(dfkd_version)}", f"recipe `{_known(run.recipe)}`", f"seed {_known(run.seed)}"]
    parts += [value for value in (run.device, run.hardware) if value]
    if run.steps is not None:
        parts.append(f"{run.steps} steps")
    if run.started:
        parts.append(f"started {run.started}")
    return " · ".join(parts)


def _summary_section(report: Report, run: Run) -> str:
    synthetic, real = report.synthetic_holdout, report.eval_data
    rows = [("Gate", _gate_text(report.gate))]
    if synthetic:
        rows.append((f"Top-1 agreement, synthetic hold-out (n={_known(synthetic.n)})", _percent(synthetic.top1_agreement)))
    if real:
        rows.append((f"Top-1 agreement, eval data (n={_known(real.n)})", _percent(real.top1_agreement)))
        for who, accuracy in (("teacher", real.teacher_accuracy), ("student", real.student_accuracy)):
            if accuracy is not None:
                rows.append((f"{who.capitalize()} accuracy, eval data", _percent(accuracy)))
    rows += _int8_rows(report.int8)
    curve = run.stability
    if curve:
        rows.append((f"Agreement along the run ({curve.evaluations} evaluations, synthetic)",
                     f"mean {curve.mean:.2f}%, variance {curve.variance:.2f}, max {curve.max:.2f}%"))
    prior = run.prior
    if prior:
        rows.append(("Prior images (--prior)", f"{prior.images:,} in {_escape(prior.path)}, "
                     f"{prior.skipped_unreadable:,} unreadable skipped"))
    ratio = report.student.compression_ratio if report.student else None
    rows.append(("Compression (teacher / student parameters)", f"{ratio:.1f}×" if isinstance(ratio, (int, float)) else "–"))
    rows.append(("ONNX parity", _parity_text(report.onnx_parity)))
    return "## Summary\n\n" + _table(("Metric", "Value"), rows)


def _int8_rows(int8: Int8 | None) -> list[tuple[str, str]]:
    if not int8:
        return []
    rows = []
    for part, title in ((int8.synthetic, "synthetic hold-out"), (int8.eval_data, "eval data")):
        if part:
            rows.append((f"int8 ONNX top-1 agreement, {title} (n={part.n})",
                         f"{_percent(part.int8_top1_agreement)} (fp32 ONNX {_percent(part.fp32_top1_agreement)})"))
    size, latency = int8.file_bytes, int8.latency_ms
    rows.append(("int8 ONNX size and latency (batch 1, CPU)",
                 f"{_bytes(size.int8)} vs {_bytes(size.fp32)}; {_ms(latency.int8)} vs {_ms(latency.fp32)}"))
    return rows


def _gate_text(gate: Gate | None) -> str:
    if not gate or gate.min_agreement is None:
        return "none set"
    verdict = "**passed**" if gate.passed else "**FAILED**"
    return f"{verdict} (min agreement {_percent(gate.min_agreement)} on {_known(gate.measured_on)})"


def _parity_text(parity: OnnxParity | None) -> str:
    if not parity:
        return "not exported"
    return (
        f"max abs diff {_number(parity.max_abs_diff, '.2e')}, top-1 agreement {_percent(parity.top1_agreement)}, "
        f"batch sizes {parity.batch_sizes}, opset {parity.opset}"
    )


def _models_section(teacher: Teacher, student: Student) -> str:
    teacher_latency, student_latency = teacher.latency_ms, student.latency_ms
    rows = [
        ("Architecture", f"`{_known(teacher.arch)}`", f"`{_known(student.arch)}`"),
        ("Parameters", _count(teacher.params), _count(student.params)),
        ("File size", _bytes(teacher.file_bytes), _student_sizes(student.file_bytes)),
        ("Latency, PyTorch CPU (batch 1)", _ms(teacher_latency and teacher_latency.torch),
         _ms(student_latency and student_latency.torch)),
        ("Latency, ONNX Runtime CPU (batch 1)", _ms(teacher_latency and teacher_latency.onnx),
         _ms(student_latency and student_latency.onnx)),
    ]
    return "## Teacher and student\n\n" + _table(("", "Teacher", "Student"), rows)


def _student_sizes(files: StudentFiles | None) -> str:
    present = files.to_dict() if files else {}
    sizes = [f"{_bytes(size)} ({kind})" for kind, size in present.items() if size is not None]
    return ", ".join(sizes) or "–"


def _race_section(race: Race | None) -> str:
    if not race:
        return ""
    rows = [(f"**{row.recipe}**" if row.recipe == race.winner else row.recipe, str(row.steps),
             f"{row.seconds:.1f}", _percent(row.pooled_agreement), _percent(row.own_agreement))
            for row in race.entrants]
    return (f"## Race (--recipe auto, {race.share:.0%} of the budget)\n\nThe leader on {race.pooled_samples} "
            "pooled held-out synthetic samples (an equal share from every entrant) trained on with the rest.\n\n"
            + _table(("recipe", "steps", "seconds", "pooled agreement", "own held-out agreement"), rows))


def _warnings_section(warnings: Sequence[str]) -> str:
    return "## Warnings\n\n" + "\n".join(f"- {warning}" for warning in warnings) if warnings else ""


def _text_samples_section(samples: dict[str, list[str]] | None) -> str:
    """Synthesized texts per class (text runs), as the teacher labels them."""
    if not samples:
        return ""
    lines = ["## Synthesized texts, by the teacher's label", ""]
    for name, texts in samples.items():
        lines.append(f"**{_escape(name)}**")
        lines += [f"- {_escape(text)}" for text in texts] or ["- (none)"]
        lines.append("")
    return "\n".join(lines).rstrip()


def _per_class_section(synthetic: Agreement | None, real: EvalData | None) -> str:
    sources = [
        (label, part.per_class, any(entry.has("student_accuracy") for entry in part.per_class.values()))
        for label, part in (("Synthetic", synthetic), ("Eval", real))
        if part and part.per_class
    ]
    if not sources:
        return ""
    names = list(dict.fromkeys(name for _, per_class, _ in sources for name in per_class))
    note = "Agreement is keyed by the teacher's predicted class, accuracy by the true label."
    if len(names) > MAX_CLASS_ROWS:
        weakest_of = sources[-1][1]  # eval data when present, else the synthetic hold-out
        names = sorted(names, key=lambda n: _sort_key(weakest_of[n].agreement if n in weakest_of else None))[:MAX_CLASS_ROWS]
        note += f" Only the {MAX_CLASS_ROWS} classes with the lowest agreement are listed; report.json has all."
    header = ["Class"]
    for label, _, has_accuracy in sources:
        header += [f"{label} n", f"{label} agreement"] + ([f"{label} student accuracy"] if has_accuracy else [])
    rows = []
    for name in names:
        cells = [_escape(name)]
        for _, per_class, has_accuracy in sources:
            entry = per_class.get(name)
            cells += ["–" if entry is None or entry.n is None else str(entry.n), _percent(entry and entry.agreement)]
            cells += [_percent(entry and entry.student_accuracy)] if has_accuracy else []
        rows.append(cells)
    return "## Per-class agreement\n\n" + note + "\n\n" + _table(header, rows)


def _sort_key(agreement: float | None) -> float:
    return agreement if isinstance(agreement, (int, float)) else math.inf


def _timings_section(run: Run) -> str:
    """Seconds and peak memory per stage, and the distillation's throughput."""
    wall_clock, memory = run.wall_clock_s or {}, run.peak_memory_mb or {}
    if not wall_clock:
        return ""
    ordered = [stage for stage in STAGES if stage in wall_clock] + [stage for stage in wall_clock if stage not in STAGES]
    rows = [(stage, _number(wall_clock[stage], ".1f"), _number(memory[stage].rss if stage in memory else None, ".0f"),
             _number(memory[stage].cuda_allocated if stage in memory else None, ".0f")) for stage in ordered]
    text = "## Timings\n\n" + _table(("Stage", "Seconds", "Peak RSS MiB", "Peak CUDA MiB"), rows)
    meter = run.throughput
    if meter:
        text += (f"\n\nDistillation: {_number(meter.synthetic_samples_per_s, ',.0f')} synthetic samples/s over "
                 f"{_number(meter.synthesis_s, '.1f')} s of synthesis, {_number(meter.student_samples_per_s, ',.0f')} "
                 f"student samples/s over {_number(meter.student_s, '.1f')} s of student steps.")
    return text


def _config_section(config: dict[str, Any] | None) -> str:
    if not config:
        return ""
    return "## Configuration\n\n```json\n" + json.dumps(config, indent=2, ensure_ascii=False) + "\n```"


def _versions_section(versions: dict[str, str] | None) -> str:
    if not versions:
        return ""
    return "## Versions\n\n" + _table(("Package", "Version"), [(name, str(version)) for name, version in versions.items()])


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "–"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def _ms(value: Any) -> str:
    return f"{value:.3g} ms" if isinstance(value, (int, float)) else "–"


def _count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.2f}{suffix}"
    return str(int(value))


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    for limit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= limit:
            return f"{value / limit:.1f} {suffix}"
    return f"{int(value)} B"
