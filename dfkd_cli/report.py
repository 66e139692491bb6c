"""The run report: one versioned JSON document, a Markdown rendering of it, and a grid of samples.

``report.json`` is the source of truth; ``report.md`` is rendered from that dict alone, so the two
never disagree.

Example:
    >>> write_report(run_dir, {"schema_version": SCHEMA_VERSION, "dfkd_version": "0.1.0",
    ...                        "run": {...}, "teacher": {...}, "student": {...}})
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

from dfkd_cli.atomic import atomic_write, replace, temporary_sibling

__all__ = ["REQUIRED_KEYS", "SCHEMA_VERSION", "grid_sample_size", "render_markdown", "save_sample_grid", "write_report"]

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "dfkd_version", "run", "teacher", "student")
STAGES = ("load", "synthesize", "train", "export", "evaluate", "total")
MAX_CLASS_ROWS = 100  # per-class table rows in report.md before only the weakest classes are listed
MAX_GRID_CLASSES = 100
_GRID_PAD = 2
_THUMBNAIL_MAX = 96  # larger images are shrunk so a 100-class grid stays a reasonable PNG


def grid_sample_size(num_classes: int) -> int:
    """Training samples the teacher labels for samples.png: enough to fill a row of each class it
    shows (16 per class: classes are not equally common), at most 1,024 (a large teacher's
    labelling cost counts against the budget)."""
    return min(1024, 16 * min(num_classes, MAX_GRID_CLASSES))


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Validate ``report`` and write ``report.json`` and ``report.md`` into ``run_dir`` atomically.

    Non-finite floats become ``null`` (strict JSON), paths become strings; ``report.md`` is rendered
    from exactly what ``report.json`` holds. Raises ``ValueError`` when a top-level key is missing or
    ``schema_version`` is not :data:`SCHEMA_VERSION`.

    Example:
        >>> write_report(Path("runs/x"), report)
    """
    missing = [key for key in REQUIRED_KEYS if key not in report]
    if missing:
        raise ValueError(f"report lacks top-level key(s) {', '.join(missing)}")
    if report["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"report schema_version is {report['schema_version']!r}, this dfkd writes {SCHEMA_VERSION}")
    text = json.dumps(_json_ready(report), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "report.json", text + "\n")
    atomic_write(run_dir / "report.md", render_markdown(json.loads(text)))


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


def render_markdown(report: dict[str, Any]) -> str:
    """Render a report dict as Markdown; every optional section may be missing or ``None``.

    Example:
        >>> render_markdown(report).splitlines()[0]
        '# dfkd report: resnet34 → resnet8'
    """
    teacher, student = report.get("teacher") or {}, report.get("student") or {}
    sections = [
        f"# dfkd report: {teacher.get('arch', '?')} → {student.get('arch', '?')}",
        _run_line(report),
        _summary_section(report),
        _models_section(teacher, student),
        _warnings_section(report.get("warnings") or []),
        _race_section((report.get("run") or {}).get("race")),
        _per_class_section(report.get("synthetic_holdout"), report.get("eval_data")),
        _text_samples_section(report.get("samples")),
        _timings_section(report.get("run") or {}),
        _config_section((report.get("run") or {}).get("config")),
        _versions_section(report),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _run_line(report: dict[str, Any]) -> str:
    run = report.get("run") or {}
    parts = [f"dfkd {report.get('dfkd_version', '?')}", f"recipe `{run.get('recipe', '?')}`", f"seed {run.get('seed', '?')}"]
    parts += [str(run[key]) for key in ("device", "hardware") if run.get(key)]
    if run.get("steps") is not None:
        parts.append(f"{run['steps']} steps")
    if run.get("started"):
        parts.append(f"started {run['started']}")
    return " · ".join(parts)


def _summary_section(report: dict[str, Any]) -> str:
    synthetic, real = report.get("synthetic_holdout") or {}, report.get("eval_data") or {}
    rows = [("Gate", _gate_text(report.get("gate")))]
    if synthetic:
        rows.append((f"Top-1 agreement, synthetic hold-out (n={synthetic.get('n', '?')})", _percent(synthetic.get("top1_agreement"))))
    if real:
        rows.append((f"Top-1 agreement, eval data (n={real.get('n', '?')})", _percent(real.get("top1_agreement"))))
        for who in ("teacher", "student"):
            if f"{who}_accuracy" in real:
                rows.append((f"{who.capitalize()} accuracy, eval data", _percent(real[f"{who}_accuracy"])))
    rows += _int8_rows(report.get("int8"))
    curve = (report.get("run") or {}).get("stability")
    if curve:
        rows.append((f"Agreement along the run ({curve['evaluations']} evaluations, synthetic)",
                     f"mean {curve['mean']:.2f}%, variance {curve['variance']:.2f}, max {curve['max']:.2f}%"))
    prior = (report.get("run") or {}).get("prior")
    if prior:
        rows.append(("Prior images (--prior)", f"{prior['images']:,} in {_escape(prior['path'])}, "
                     f"{prior['skipped_unreadable']:,} unreadable skipped"))
    ratio = (report.get("student") or {}).get("compression_ratio")
    rows.append(("Compression (teacher / student parameters)", f"{ratio:.1f}×" if isinstance(ratio, (int, float)) else "–"))
    rows.append(("ONNX parity", _parity_text(report.get("onnx_parity"))))
    return "## Summary\n\n" + _table(("Metric", "Value"), rows)


def _int8_rows(int8: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not int8:
        return []
    rows = []
    for source, title in (("synthetic", "synthetic hold-out"), ("eval_data", "eval data")):
        part = int8.get(source)
        if part:
            rows.append((f"int8 ONNX top-1 agreement, {title} (n={part['n']})",
                         f"{_percent(part['int8_top1_agreement'])} (fp32 ONNX {_percent(part['fp32_top1_agreement'])})"))
    size, latency = int8["file_bytes"], int8["latency_ms"]
    rows.append(("int8 ONNX size and latency (batch 1, CPU)",
                 f"{_bytes(size['int8'])} vs {_bytes(size['fp32'])}; {_ms(latency['int8'])} vs {_ms(latency['fp32'])}"))
    return rows


def _gate_text(gate: dict[str, Any] | None) -> str:
    if not gate or gate.get("min_agreement") is None:
        return "none set"
    verdict = "**passed**" if gate.get("passed") else "**FAILED**"
    return f"{verdict} (min agreement {_percent(gate['min_agreement'])} on {gate.get('measured_on', '?')})"


def _parity_text(parity: dict[str, Any] | None) -> str:
    if not parity:
        return "not exported"
    return (
        f"max abs diff {_number(parity.get('max_abs_diff'), '.2e')}, top-1 agreement {_percent(parity.get('top1_agreement'))}, "
        f"batch sizes {parity.get('batch_sizes')}, opset {parity.get('opset')}"
    )


def _models_section(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    student_files = student.get("file_bytes") or {}
    teacher_latency, student_latency = teacher.get("latency_ms") or {}, student.get("latency_ms") or {}
    rows = [
        ("Architecture", f"`{teacher.get('arch', '?')}`", f"`{student.get('arch', '?')}`"),
        ("Parameters", _count(teacher.get("params")), _count(student.get("params"))),
        ("File size", _bytes(teacher.get("file_bytes")), _student_sizes(student_files)),
        ("Latency, PyTorch CPU (batch 1)", _ms(teacher_latency.get("torch")), _ms(student_latency.get("torch"))),
        ("Latency, ONNX Runtime CPU (batch 1)", _ms(teacher_latency.get("onnx")), _ms(student_latency.get("onnx"))),
    ]
    return "## Teacher and student\n\n" + _table(("", "Teacher", "Student"), rows)


def _student_sizes(files: dict[str, Any]) -> str:
    sizes = [f"{_bytes(size)} ({kind})" for kind, size in files.items() if size is not None]
    return ", ".join(sizes) or "–"


def _race_section(race: dict[str, Any] | None) -> str:
    if not race:
        return ""
    rows = [(f"**{row['recipe']}**" if row["recipe"] == race["winner"] else row["recipe"], str(row["steps"]),
             f"{row['seconds']:.1f}", _percent(row["pooled_agreement"]), _percent(row["own_agreement"]))
            for row in race["entrants"]]
    return (f"## Race (--recipe auto, {race['share']:.0%} of the budget)\n\nThe leader on {race['pooled_samples']} "
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


def _per_class_section(synthetic: dict[str, Any] | None, real: dict[str, Any] | None) -> str:
    sources = [
        (label, part["per_class"], any("student_accuracy" in entry for entry in part["per_class"].values()))
        for label, part in (("Synthetic", synthetic), ("Eval", real))
        if part and part.get("per_class")
    ]
    if not sources:
        return ""
    names = list(dict.fromkeys(name for _, per_class, _ in sources for name in per_class))
    note = "Agreement is keyed by the teacher's predicted class, accuracy by the true label."
    if len(names) > MAX_CLASS_ROWS:
        weakest_of = sources[-1][1]  # eval data when present, else the synthetic hold-out
        names = sorted(names, key=lambda n: _sort_key((weakest_of.get(n) or {}).get("agreement")))[:MAX_CLASS_ROWS]
        note += f" Only the {MAX_CLASS_ROWS} classes with the lowest agreement are listed; report.json has all."
    header = ["Class"]
    for label, _, has_accuracy in sources:
        header += [f"{label} n", f"{label} agreement"] + ([f"{label} student accuracy"] if has_accuracy else [])
    rows = []
    for name in names:
        cells = [_escape(name)]
        for _, per_class, has_accuracy in sources:
            entry = per_class.get(name) or {}
            cells += [str(entry.get("n", "–")), _percent(entry.get("agreement"))]
            cells += [_percent(entry.get("student_accuracy"))] if has_accuracy else []
        rows.append(cells)
    return "## Per-class agreement\n\n" + note + "\n\n" + _table(header, rows)


def _sort_key(agreement: float | None) -> float:
    return agreement if isinstance(agreement, (int, float)) else math.inf


def _timings_section(run: dict[str, Any]) -> str:
    """Seconds and peak memory per stage, and the distillation's throughput."""
    wall_clock, memory = run.get("wall_clock_s") or {}, run.get("peak_memory_mb") or {}
    if not wall_clock:
        return ""
    ordered = [stage for stage in STAGES if stage in wall_clock] + [stage for stage in wall_clock if stage not in STAGES]
    rows = [(stage, _number(wall_clock[stage], ".1f"), _number((memory.get(stage) or {}).get("rss"), ".0f"),
             _number((memory.get(stage) or {}).get("cuda_allocated"), ".0f")) for stage in ordered]
    text = "## Timings\n\n" + _table(("Stage", "Seconds", "Peak RSS MiB", "Peak CUDA MiB"), rows)
    meter = run.get("throughput")
    if meter:
        text += (f"\n\nDistillation: {_number(meter['synthetic_samples_per_s'], ',.0f')} synthetic samples/s over "
                 f"{_number(meter['synthesis_s'], '.1f')} s of synthesis, {_number(meter['student_samples_per_s'], ',.0f')} "
                 f"student samples/s over {_number(meter['student_s'], '.1f')} s of student steps.")
    return text


def _config_section(config: Any) -> str:
    if not config:
        return ""
    return "## Configuration\n\n```json\n" + json.dumps(config, indent=2, ensure_ascii=False) + "\n```"


def _versions_section(report: dict[str, Any]) -> str:
    versions = (report.get("run") or {}).get("versions") or {}
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


def save_sample_grid(
    x: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: list[str],
    path: Path,
    per_class: int = 8,
) -> None:
    """Save a PNG grid: one row per class (first 100), up to ``per_class`` images of that class each.

    ``x`` are normalised inputs and ``labels`` the teacher's predicted classes. Images are
    de-normalised to [0, 1]; tiny ones (under 64 px) are doubled in size, large ones shrunk to 96 px.
    Rows of classes with no sample stay blank, and each row is labelled with its class name on the left.
    Row ``r`` spans pixels ``[pad + r * (h + pad), pad + r * (h + pad) + h)`` with ``pad = 2``.

    Example:
        >>> save_sample_grid(synthetic_x, teacher_pred, mean, std, class_names, run_dir / "samples.png")
    """
    from torchvision.utils import make_grid

    classes = class_names[:MAX_GRID_CLASSES]
    images = _displayable(x.detach().to("cpu", torch.float32), mean, std)
    labels = labels.detach().to("cpu")
    blank = torch.ones_like(images[0]) if len(images) else None
    tiles: list[torch.Tensor] = []
    for index in range(len(classes)):
        chosen = list(images[labels == index][:per_class])
        tiles += chosen + [blank] * (per_class - len(chosen))
    grid = make_grid(torch.stack(tiles), nrow=per_class, padding=_GRID_PAD, pad_value=1.0)
    canvas = _label_rows(grid, classes, tile_height=images.shape[-2])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_sibling(path, ".png") as temporary:
        canvas.save(temporary, format="PNG")
        replace(temporary, path)


def _displayable(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """De-normalise to [0, 1] and bring the images to a size that is comfortable to look at."""
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"need images [N>0, C, H, W], got {list(x.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x * std_t + mean_t).clamp(0, 1)
    side = max(x.shape[-2:])
    if side < 64:
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    elif side > _THUMBNAIL_MAX:
        scale = _THUMBNAIL_MAX / side
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True).clamp(0, 1)
    return x


def _label_rows(grid: torch.Tensor, classes: list[str], tile_height: int) -> Any:
    """A PIL image of ``grid`` with a white margin on the left holding each row's class name."""
    from PIL import Image, ImageDraw, ImageFont

    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    body = Image.fromarray(pixels)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(body)
    try:
        boxes = [measure.textbbox((0, 0), name, font=font) for name in classes]
    except UnicodeError:  # Pillow without FreeType has a latin-1 bitmap font only: leave rows unlabelled
        return body
    margin = 8 + max(right for _, _, right, _ in boxes)
    canvas = Image.new("RGB", (body.width + margin, body.height), "white")
    canvas.paste(body, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (name, (_, upper, _, lower)) in enumerate(zip(classes, boxes)):
        top = _GRID_PAD + row * (tile_height + _GRID_PAD) + (tile_height - (lower - upper)) // 2 - upper
        draw.text((4, top), name, fill="black", font=font)
    return canvas
