"""Results on stdout: a Rich summary for people, one JSON document for machines, or nothing.

Reports (compress, eval, quantize) are checked against their schema and the human summaries read
the typed :class:`~dfkd_cli.report_model.Report`; the JSON output is the report dict itself."""

from __future__ import annotations

import json
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from dfkd_cli.report_model import Latency, Report, Teacher


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.3g}{unit}" if isinstance(value, float) else f"{value:,}{unit}"


def render_rows(rows: list[dict[str, Any]], output_format: str, title: str) -> None:
    """A list of records as a table (human), a JSON array (json) or nothing (quiet)."""

    def human(console: Console, rows: list[dict[str, Any]]) -> None:
        table = Table(title=title, title_justify="left", box=None)
        for column in rows[0]:
            table.add_column(column.replace("_", " "))
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        console.print(table)

    _emit(rows, output_format, human)


def _summary_table(report: Report) -> Table:
    teacher, student = report.teacher or Teacher.blank(), report.student
    table = Table(box=None, show_header=True)
    for column in ("", "teacher", "student"):
        table.add_column(column)
    table.add_row("architecture", str(teacher.arch), str(student.arch))
    table.add_row("parameters", _num(teacher.params), _num(student.params))
    t_lat, s_lat = teacher.latency_ms or Latency.blank(), student.latency_ms or Latency.blank()
    table.add_row("latency torch (ms)", _num(t_lat.torch), _num(s_lat.torch))
    table.add_row("latency onnx (ms)", _num(t_lat.onnx), _num(s_lat.onnx))
    real = report.eval_data
    if real and (real.has("teacher_accuracy") or real.has("student_accuracy")):
        table.add_row("accuracy (real data)", _pct(real.teacher_accuracy), _pct(real.student_accuracy))
    return table


def _agreement_lines(report: Report) -> list[str]:
    lines = []
    synthetic = report.synthetic_holdout
    if synthetic:
        lines.append(f"agreement on held-out synthetic samples: {_pct(synthetic.top1_agreement)} (n={synthetic.n})")
    real = report.eval_data
    if real and real.has("top1_agreement"):
        lines.append(f"agreement on real data: {_pct(real.top1_agreement)} (n={real.n}, {real.source})")
    if real and real.has("onnx_top1_agreement"):
        lines.append(f"ONNX student agreement on real data: {_pct(real.onnx_top1_agreement)}")
    gate = report.gate
    if gate:
        verdict = "passed" if gate.passed else "FAILED"
        lines.append(f"gate --min-agreement {gate.min_agreement}: {verdict} ({_pct(gate.measured)} on {gate.measured_on})")
    return lines


def _emit(data: Any, output_format: str, human: Callable[[Console, Any], None]) -> None:
    """One JSON document (json), the ``human`` rendering (human), or nothing (quiet)."""
    if output_format == "json":
        _json(data)
    elif output_format == "human":
        human(_console(), data)


def _warnings(console: Console, report: Report) -> None:
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def render_plan(result: dict[str, Any], output_format: str) -> None:
    """``dfkd compress --dry-run``: the plan as lines, or as one JSON document."""
    if output_format == "json":
        _json(result["plan"])
    elif output_format == "human":
        print("\n".join(result["plan_lines"]))


def _typed(report: dict[str, Any]) -> Report:
    """The report dict as the typed, checked :class:`Report` the human renderings read."""
    from dfkd_cli.report import typed_report  # imports torch: only once there is a report

    return typed_report(report)


def _emit_report(report: dict[str, Any], output_format: str, human: Callable[[Console, Report], None]) -> None:
    """A report checked against its schema, then printed: the dict itself as JSON (json), ``human``
    reading the typed report (human), or nothing (quiet)."""
    typed = _typed(report)
    _emit(report, output_format, lambda console, _: human(console, typed))


def render_compress(report: dict[str, Any], output_format: str) -> None:
    """Summary of a finished compress run."""
    _emit_report(report, output_format, _human_compress)


def _human_compress(console: Console, report: Report) -> None:
    run, student = report.run, report.student
    wall_clock = run.wall_clock_s or {}
    console.print(f"[bold]dfkd[/bold] {run.recipe}: {(report.teacher or Teacher.blank()).arch} -> {student.arch}, "
                  f"{run.steps} student steps, {wall_clock.get('total', 0):.1f} s on {run.hardware}")
    for line in _agreement_lines(report):
        console.print(line)
    console.print(_summary_table(report))
    if student.compression_ratio:
        console.print(f"compression: {student.compression_ratio:.2f}x fewer parameters")
    if run.race:
        rows = ", ".join(f"{row.recipe} {_pct(row.pooled_agreement)}" for row in run.race.entrants)
        console.print(f"race: {run.race.winner} led on pooled held-out synthetic agreement ({rows})")
    int8 = report.int8
    if int8:
        part = int8.eval_data or int8.synthetic
        console.print(f"int8 student: agreement {_pct(part.int8_top1_agreement)} (fp32 {_pct(part.fp32_top1_agreement)}), "
                      f"{int8.file_bytes.int8:,} bytes (fp32 {int8.file_bytes.fp32:,})")
    _warnings(console, report)
    if report.family == "text":
        for name, texts in (report.samples or {}).items():
            if texts:
                console.print(f"synthesized text the teacher calls {name}: {texts[0]!r}", markup=False)
        console.print(f"artefacts: {run.out}/ (student/, student.safetensors, student.onnx, report.json, "
                      "report.md, config.toml)")
        return
    hf_student = (student.source or {}).get("kind") == "hf-image"
    extras = [name for name, present in (("student.int8.onnx", int8), ("synthetic/", run.synthetic_saved),
                                         ("student_hf/", hf_student)) if present]
    console.print(f"artefacts: {run.out}/ (student.safetensors, student.onnx, report.json, report.md, "
                  f"samples.png, config.toml{''.join(', ' + e for e in extras)})")


def render_eval(report: dict[str, Any], output_format: str) -> None:
    """Summary of `dfkd eval`."""
    _emit_report(report, output_format, _human_eval)


def _human_eval(console: Console, report: Report) -> None:
    real = report.eval_data
    console.print(f"[bold]dfkd eval[/bold] {report.student.arch} ({report.student.path})")
    for line in _agreement_lines(report):
        console.print(line)
    if real and real.has("student_accuracy"):
        teacher_acc = f", teacher {_pct(real.teacher_accuracy)}" if real.has("teacher_accuracy") else ""
        console.print(f"accuracy on real data: student {_pct(real.student_accuracy)}{teacher_acc}")
    if real and real.has("onnx_accuracy"):
        console.print(f"ONNX student accuracy on real data: {_pct(real.onnx_accuracy)}")
    _warnings(console, report)


def render_quantize(report: dict[str, Any], output_format: str) -> None:
    """The int8 section of a run's report (JSON: the whole updated report)."""
    _emit_report(report, output_format, _human_quantize)


def _human_quantize(console: Console, report: Report) -> None:
    int8 = report.int8
    if int8 is None:
        raise ValueError("the report has no int8 section to show")
    for part, title in ((int8.synthetic, "held-out synthetic"), (int8.eval_data, "eval data")):
        if part:
            console.print(f"int8 agreement with the teacher on {title} (n={part.n}): "
                          f"{_pct(part.int8_top1_agreement)} (fp32 {_pct(part.fp32_top1_agreement)})")
    size, latency = int8.file_bytes, int8.latency_ms
    console.print(f"size {size.int8:,} bytes (fp32 {size.fp32:,}); latency {latency.int8:.3g} ms "
                  f"(fp32 {latency.fp32:.3g} ms), batch 1 on the CPU")


def _human_inspect_text(console: Console, info: dict[str, Any]) -> None:
    names = ", ".join(info["class_names"][:10]) + (" ..." if len(info["class_names"]) > 10 else "")
    console.print(f"[bold]{info['path']}[/bold]  ({info['arch']}, sha256 {info['sha256'][:12]})", markup=True)
    console.print(f"classes       {info['num_classes']}: {names}", markup=False)
    console.print(f"layers        {info['layers']}, hidden size {info['hidden_size']}, up to {info['max_positions']} tokens")
    console.print(f"tokenizer     {info['tokenizer']}, {info['vocab_size']:,} tokens")
    console.print(f"parameters    {info['params']:,}")
    console.print(f"student       default {info['default_student']}")
    console.print(f"recipes       {', '.join(info['recipes'])}")


def render_inspect(info: dict[str, Any], output_format: str) -> None:
    """What dfkd sees in a teacher checkpoint."""
    _emit(info, output_format, _human_inspect)


def _human_inspect(console: Console, info: dict[str, Any]) -> None:
    if info.get("family") == "text":
        _human_inspect_text(console, info)
        return
    shape = "x".join(str(v) for v in info["input_shape"])
    names = ", ".join(info["class_names"][:10]) + (" ..." if len(info["class_names"]) > 10 else "")
    bn = info["bn_layers"]
    console.print(f"[bold]{info['path']}[/bold]  ({info['arch']}, sha256 {info['sha256'][:12]})")
    console.print(f"classes       {info['num_classes']}: {names}")
    console.print(f"input shape   {shape}, mean {info['mean']}, std {info['std']}")
    console.print(f"parameters    {info['params']:,}")
    console.print(f"BatchNorm     {len(bn)} layers" + (f" ({', '.join(bn[:4])}, ...)" if bn else ""))
    console.print(f"student       default {info['default_student'] or '- (pass --student)'}")
    console.print(f"recipes       {', '.join(info['recipes'])}")
    auto = info["auto"]
    console.print(f"              --recipe auto: {auto['recipe']} (policy rule '{auto['rule']}', "
                  f"{auto['budget_s'] / 60:g} min on {auto['device']}); may race: {', '.join(auto['race']) or '-'}")
    if info.get("recipes_needing_prior"):
        console.print(f"              with --prior images only: {', '.join(info['recipes_needing_prior'])}")
