"""The report as typed records: what ``report.json`` holds, for ``dfkd compress`` and ``dfkd eval``.

Four kinds of document share one shape, :class:`Report`: an image compress report (no ``kind`` or
``family`` key), a text compress report (``"kind": "compress", "family": "text"``), and the ``dfkd
eval`` reports of an image or a text student (``"kind": "eval"``, plus ``"family": "text"``). Each
key says in which kinds it is always present and in which it may be null; ``dfkd quantize`` adds
``int8`` (and the gate) to an image compress report. The JSON Schema published as
``docs/report.schema.json`` is generated from these classes (``python -m dfkd_cli.report_model``);
``docs/report.md`` describes the document.

Example:
    >>> report = Report.from_dict(json.loads(Path("run/report.json").read_text()))
    >>> report.synthetic_holdout.top1_agreement, report.run.steps
    (0.97, 2000)
    >>> report.to_dict() == json.loads(Path("run/report.json").read_text())
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from dfkd_cli.report_schema import (
    COMPRESS,
    EVAL,
    IMAGE,
    IMAGE_COMPRESS,
    IMAGE_EVAL,
    TEXT_COMPRESS,
    TEXT_EVAL,
    Reader,
    Record,
    json_schema,
    key,
    read_value,
)

SCHEMA_VERSION = 1
ALL_BUT_IMAGE_COMPRESS = (TEXT_COMPRESS, IMAGE_EVAL, TEXT_EVAL)
TEXT = (TEXT_COMPRESS, TEXT_EVAL)
# How each kind of document is recognised (a JSON Schema): a missing kind is "compress", a missing family "image".
MATCHERS = {
    IMAGE_COMPRESS: {"properties": {"kind": {"const": "compress"}, "family": {"const": "image"}}},
    TEXT_COMPRESS: {"required": ["family"], "properties": {"kind": {"const": "compress"}, "family": {"const": "text"}}},
    IMAGE_EVAL: {"required": ["kind"], "properties": {"kind": {"const": "eval"}, "family": {"const": "image"}}},
    TEXT_EVAL: {"required": ["kind", "family"], "properties": {"kind": {"const": "eval"}, "family": {"const": "text"}}},
}


@dataclass(frozen=True, kw_only=True)
class Latency(Record):
    """Median CPU milliseconds for one input (batch 1); null when not measured."""

    torch: float | None = key("in PyTorch", null=True)
    onnx: float | None = key("in onnxruntime (null: no ONNX file, or its export failed)", null=True)


@dataclass(frozen=True, kw_only=True)
class Teacher(Record):
    """The teacher: identity, and in compress reports its size and speed."""

    arch: str = key("architecture name (text: the model class, type and depth)")
    source: dict[str, Any] | None = key("where the architecture came from: kind (registry, timm, hf-image, program) "
                                        "and its name or model type", required=IMAGE)
    path: str = key("the teacher file or folder as given")
    sha256: str = key("SHA-256 of the weights")
    num_classes: int | None = key("number of classes", required=COMPRESS)
    class_names: list[str] | None = key("class names, in index order", required=[TEXT_COMPRESS])
    input_shape: list[int] | None = key("channels, height, width", required=[IMAGE_COMPRESS])
    has_bn: bool | None = key("whether it has BatchNorm layers", required=[IMAGE_COMPRESS])
    params: int | None = key("parameter count", required=COMPRESS)
    file_bytes: int | None = key("size of the weights file (null: not a single file)", required=[IMAGE_COMPRESS],
                                 null=True)
    latency_ms: Latency | None = key("CPU latency", required=COMPRESS)


@dataclass(frozen=True, kw_only=True)
class StudentFiles(Record):
    """Sizes in bytes of the student's files; null when the file was not written."""

    safetensors: int | None = key("student.safetensors", null=True)
    onnx: int | None = key("student.onnx", null=True)


@dataclass(frozen=True, kw_only=True)
class Student(Record):
    """The student: in compress reports its size, speed and compression; in eval reports its file and origin."""

    arch: str = key("architecture name (e.g. resnet8, timm:NAME, hf:small, bert-1)")
    params: int = key("parameter count")
    source: dict[str, Any] | None = key("where the architecture came from (as teacher.source)", required=IMAGE)
    path: str | None = key("the student file or folder measured", required=EVAL)
    recipe: str | None = key("the recipe that made it (from its metadata)", required=EVAL, null=EVAL)
    teacher_sha256: str | None = key("SHA-256 of the teacher it was distilled from (from its metadata)",
                                     required=EVAL, null=EVAL)
    layers: int | None = key("transformer layers", required=[TEXT_COMPRESS])
    file_bytes: StudentFiles | None = key("file sizes", required=COMPRESS)
    latency_ms: Latency | None = key("CPU latency", required=COMPRESS)
    compression_ratio: float | None = key("teacher parameters / student parameters", required=COMPRESS, null=COMPRESS)


@dataclass(frozen=True, kw_only=True)
class ClassAgreement(Record):
    """One class: agreement keyed by the teacher's prediction, accuracy by the true label."""

    n: int = key("samples the teacher assigns to this class")
    agreement: float | None = key("fraction of those the student assigns to it too (null: n is 0)", null=True)
    n_labelled: int | None = key("samples labelled with this class (labelled data only)", required=False)
    student_accuracy: float | None = key("student accuracy on them (null: none labelled)", required=False, null=True)


@dataclass(frozen=True, kw_only=True)
class Agreement(Record):
    """Top-1 agreement of the student with the teacher on held-out synthetic samples."""

    n: int = key("samples measured (the reported half of the hold-out)")
    top1_agreement: float = key("fraction of samples where student and teacher pick the same class")
    per_class: dict[str, ClassAgreement] = key("by class name")


@dataclass(frozen=True, kw_only=True)
class EvalData(Record):
    """Real data: agreement when there is a teacher, accuracy when it is labelled."""

    n: int = key("samples measured")
    top1_agreement: float | None = key("agreement with the teacher (with a teacher)", required=False)
    teacher_accuracy: float | None = key("teacher accuracy (with a teacher and labels)", required=False)
    student_accuracy: float | None = key("student accuracy (with labels)", required=False)
    per_class: dict[str, ClassAgreement] | None = key("by class name (with a teacher)", required=False)
    onnx_top1_agreement: float | None = key("the ONNX student's agreement (dfkd eval --onnx)", required=False)
    onnx_accuracy: float | None = key("the ONNX student's accuracy (dfkd eval --onnx, labels)", required=False)
    source: str = key("image data: npz or image_folder; text data: the table's path")
    skipped_files: int | None = key("unreadable files skipped", required=IMAGE)
    label_mapping: str | None = key("how labels were read: npz, class_names, digits or sorted", required=IMAGE)


@dataclass(frozen=True, kw_only=True)
class OnnxParity(Record):
    """How closely student.onnx in onnxruntime reproduces the PyTorch student."""

    batch_sizes: list[int] = key("batch sizes compared")
    lengths: list[int] | None = key("sequence lengths compared", required=[TEXT_COMPRESS])
    max_abs_diff: float = key("largest absolute logit difference")
    top1_agreement: float = key("fraction of inputs with the same top-1 class")
    opset: int = key("ONNX opset")
    inputs: list[str] | None = key("ONNX input names", required=[TEXT_COMPRESS])
    max_length: int | None = key("longest sequence the export accepts, in tokens", required=[TEXT_COMPRESS])
    max_abs_logit: float = key("largest absolute logit: the scale the difference is judged against")


@dataclass(frozen=True, kw_only=True)
class Int8Agreement(Record):
    """The fp32 and int8 ONNX students measured against the teacher on one set of inputs."""

    n: int = key("samples measured")
    fp32_top1_agreement: float = key("agreement of the fp32 ONNX student with the teacher")
    int8_top1_agreement: float = key("agreement of the int8 ONNX student with the teacher")
    int8_vs_fp32_top1: float = key("fraction where int8 and fp32 pick the same class")
    fp32_accuracy: float | None = key("fp32 accuracy (labelled eval data)", required=False)
    int8_accuracy: float | None = key("int8 accuracy (labelled eval data)", required=False)


@dataclass(frozen=True, kw_only=True)
class Int8Sizes(Record):
    """File sizes in bytes."""

    fp32: int = key("student.onnx")
    int8: int = key("student.int8.onnx")


@dataclass(frozen=True, kw_only=True)
class Int8Latency(Record):
    """Median onnxruntime CPU milliseconds for one input (batch 1)."""

    fp32: float = key("student.onnx")
    int8: float = key("student.int8.onnx")


@dataclass(frozen=True, kw_only=True)
class Int8(Record):
    """student.int8.onnx: calibrated on held-out synthetic samples, measured on the others (and eval data)."""

    format: str = key("quantization format")
    calibration: str = key("what calibrated it")
    synthetic: Int8Agreement = key("on the reported half of the held-out synthetic samples")
    eval_data: Int8Agreement | None = key("on --eval-data (null: none given)", null=True)
    file_bytes: Int8Sizes = key("file sizes")
    latency_ms: Int8Latency = key("CPU latency")


@dataclass(frozen=True, kw_only=True)
class Gate(Record):
    """The --min-agreement check; the exit code is 1 when it failed."""

    min_agreement: float = key("the threshold given")
    measured_on: Literal["eval_data", "synthetic_holdout", "int8 student, eval data", "int8 student, synthetic"] = key(
        "which measurement was compared")
    metric: Literal["top1_agreement", "onnx_top1_agreement", "int8_top1_agreement"] = key("which agreement was compared")
    measured: float = key("its value")
    passed: bool = key("measured >= min_agreement")


@dataclass(frozen=True, kw_only=True)
class PeakMemory(Record):
    """Peak memory in MiB up to the end of a stage."""

    rss: float = key("process resident set size")
    cuda_allocated: float | None = key("CUDA memory allocated (null: not on a CUDA device)", null=True)


@dataclass(frozen=True, kw_only=True)
class Stability(Record):
    """The held-out synthetic agreement at each evaluation along the run, in percent."""

    evaluations: int = key("evaluations")
    mean: float = key("mean, percent")
    variance: float = key("variance, percent squared")
    max: float = key("maximum, percent")


@dataclass(frozen=True, kw_only=True)
class RaceEntrant(Record):
    """One recipe in the race."""

    recipe: str = key("recipe name")
    steps: int = key("student steps it made in its slice")
    seconds: float = key("seconds its slice took")
    pooled_agreement: float = key("agreement on the pooled held-out samples (decides the winner)")
    own_agreement: float = key("agreement on its own held-out samples")


@dataclass(frozen=True, kw_only=True)
class Race(Record):
    """--recipe auto: the recipes that raced for a share of the budget."""

    share: float = key("share of the budget the race took")
    pooled_samples: int = key("pooled held-out samples the entrants were compared on")
    winner: str = key("the recipe that trained on")
    entrants: list[RaceEntrant] = key("every entrant")


@dataclass(frozen=True, kw_only=True)
class Throughput(Record):
    """Speed of the distillation."""

    synthesis_s: float = key("seconds spent synthesizing")
    student_s: float = key("seconds spent in student steps")
    synthetic_samples: int = key("synthetic samples made")
    student_samples: int = key("samples the student trained on")
    synthetic_samples_per_s: float = key("synthetic_samples / synthesis_s (0 when no time was spent)")
    student_samples_per_s: float = key("student_samples / student_s (0 when no time was spent)")


@dataclass(frozen=True, kw_only=True)
class Prior(Record):
    """--prior images."""

    path: str = key("resolved path")
    source: str = key("image_folder or npz")
    images: int = key("images found")
    held_out: int = key("images held out to select the student")
    skipped_unreadable: int = key("files that could not be decoded")


@dataclass(frozen=True, kw_only=True)
class Processes(Record):
    """A run with several processes (--nproc)."""

    count: int = key("processes")
    identical_students: bool = key("whether every rank ended with the same student")


@dataclass(frozen=True, kw_only=True)
class Health(Record):
    """Training health: rollbacks after divergence and checkpoints."""

    rollbacks: int = key("rollbacks to the last good checkpoint")
    lr_scales: dict[str, float] = key("learning-rate multipliers the rollbacks left, by component")
    checkpoints: str = key("checkpoint folder, or 'off'")
    warnings: list[str] = key("what the supervisor noticed (also in the report's warnings)")


@dataclass(frozen=True, kw_only=True)
class Run(Record):
    """How the run went; an eval report holds only the library versions."""

    recipe: str | None = key("the recipe that ran (a race: the winner)", required=COMPRESS)
    seed: int | None = key("random seed", required=COMPRESS)
    wall_clock_s: dict[str, float] | None = key("seconds per stage, and total", required=COMPRESS)
    peak_memory_mb: dict[str, PeakMemory] | None = key("peak memory by stage", required=COMPRESS)
    config: dict[str, Any] | None = key("the resolved options and recipe (what config.toml holds)", required=COMPRESS)
    versions: dict[str, str] = key("versions of Python and the libraries the numbers depend on")
    started: str | None = key("start time, ISO 8601 with time zone", required=COMPRESS)
    device: str | None = key("torch device", required=COMPRESS)
    hardware: str | None = key("the hardware, in words", required=COMPRESS)
    steps: int | None = key("student steps made", required=COMPRESS)
    best_step: int | None = key("the step of the student kept (the latest within noise of the best held-out agreement)",
                                required=COMPRESS)
    out: str | None = key("the run folder", required=COMPRESS)
    prior: Prior | None = key("--prior images (null: none)", required=[IMAGE_COMPRESS], null=True)
    from_synthetic: str | None = key("--from-synthetic set (null: none)", required=[IMAGE_COMPRESS], null=True)
    stability: Stability | None = key("agreement along the run (null: never evaluated)", required=COMPRESS, null=True)
    race: Race | None = key("the race (null: one recipe ran)", required=[IMAGE_COMPRESS], null=True)
    synthetic_saved: bool | None = key("whether synthetic/ was written (--save-synthetic)", required=[IMAGE_COMPRESS])
    resumed_from_step: int | None = key("the checkpoint step --resume continued from (null: a fresh run)",
                                        required=[IMAGE_COMPRESS], null=True)
    precision: str | None = key("fp32, bf16 or fp16", required=COMPRESS)
    loss_scale: dict[str, float] | None = key("final fp16 loss scale by component (null: not fp16)", required=COMPRESS,
                                              null=True)
    channels_last: bool | None = key("whether the models ran in channels_last", required=[IMAGE_COMPRESS])
    compiled: bool | None = key("whether torch.compile was used (--compile)", required=[IMAGE_COMPRESS])
    throughput: Throughput | None = key("speed of the distillation", required=[IMAGE_COMPRESS])
    processes: Processes | None = key("several processes (null: one)", required=[IMAGE_COMPRESS], null=True)
    plan: dict[str, Any] | None = key("the plan printed before the run (see dfkd compress --dry-run)",
                                      required=[IMAGE_COMPRESS])
    health: Health | None = key("training health", required=[IMAGE_COMPRESS])


@dataclass(frozen=True, kw_only=True)
class Report(Record):
    """A dfkd report: report.json of `dfkd compress`, or the JSON `dfkd eval` prints."""

    schema_version: Literal[1] = key("version of this document's layout; a reader checks it first")
    dfkd_version: str = key("the dfkd that wrote it")
    kind: Literal["compress", "eval"] | None = key("absent in image compress reports (meaning compress)",
                                                   required=ALL_BUT_IMAGE_COMPRESS)
    family: Literal["image", "text"] | None = key("absent in image reports (meaning image)", required=TEXT)
    run: Run = key("how the run went")
    teacher: Teacher | None = key("the teacher (null: dfkd eval without --teacher)", null=EVAL)
    student: Student = key("the student")
    synthetic_holdout: Agreement | None = key("agreement on held-out synthetic samples", required=COMPRESS)
    eval_data: EvalData | None = key("measurements on real data (null: no --eval-data)", null=True)
    onnx_parity: OnnxParity | None = key("the ONNX export check (null: not exported)", required=COMPRESS, null=True)
    int8: Int8 | None = key("the int8 student (null: none made)", required=[IMAGE_COMPRESS], null=True)
    samples: dict[str, list[str]] | None = key("synthesized texts by the teacher's label", required=[TEXT_COMPRESS])
    warnings: list[str] = key("things to know before trusting the numbers")
    gate: Gate | None = key("the --min-agreement check (null: none set)", null=True)

    @classmethod
    def from_dict(cls, data: Any, *, partial: bool = False) -> Report:
        """The typed report; ``ValueError`` names the first key that is unknown, missing or wrong
        (``partial``: missing keys and nulls read as None, for rendering an incomplete document)."""
        return cls.read(data, Reader(document_kind(data), partial), "")


def document_kind(data: Any) -> str:
    """The kind of report ``data`` is, from its ``kind`` and ``family`` keys (checked)."""
    if not isinstance(data, dict):
        raise ValueError(f"a report is a JSON object, got {type(data).__name__}")
    reader = Reader(IMAGE_COMPRESS)
    kind = read_value(Literal["compress", "eval"], data.get("kind", "compress"), reader, "kind")
    family = read_value(Literal["image", "text"], data.get("family", "image"), reader, "family")
    if "schema_version" not in data:
        raise ValueError("report key schema_version: missing (every report has it)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"report key schema_version: is {data['schema_version']!r}, this dfkd reads and "
                         f"writes {SCHEMA_VERSION}")
    return f"{family} {kind}"


def report_json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Report`, as published in docs/report.schema.json."""
    return json_schema(Report, MATCHERS, title=f"dfkd report, schema_version {SCHEMA_VERSION}")


def report_json_schema_text() -> str:
    """docs/report.schema.json's exact text."""
    return json.dumps(report_json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(report_json_schema_text(), end="")
