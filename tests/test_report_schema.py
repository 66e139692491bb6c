"""The typed report and its published JSON Schema (docs/report.schema.json): the file is what the
code generates, real reports of every kind validate against it and round-trip through
:class:`Report`, and a wrong or missing key is refused by both, naming the key."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from jsonschema import Draft202012Validator

from dfkd_cli.report import write_report
from dfkd_cli.report_model import Report, report_json_schema, report_json_schema_text

import kit
from test_report import full_report
from textkit import toy_corpus

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "report.schema.json"
VALIDATOR = Draft202012Validator(report_json_schema())


def test_published_schema_is_the_generated_one() -> None:
    published = SCHEMA_FILE.read_text(encoding="utf-8")
    assert published == report_json_schema_text(), (
        "docs/report.schema.json is out of date: python -m dfkd_cli.report_model > docs/report.schema.json")
    Draft202012Validator.check_schema(json.loads(published))


@pytest.fixture(scope="module")
def runs(tiny_teacher: dict, bert_teacher_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """For each kind of report, the document dfkd wrote (report.json; for eval, what it prints) and
    the dict the command printed: an image compress run (exported, int8, eval data, a gate), the
    `dfkd eval --format json` of its student, and the same for text."""
    root = tmp_path_factory.mktemp("report-schema")
    image, text = root / "image", root / "text"
    table = root / "dev.tsv"
    table.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in toy_corpus(24, seed=7)))
    with kit.deployment_checks(True):
        image_run = kit.report_of(kit.cli(*kit.compress_args(
            tiny_teacher, image, "dfad", 3, *kit.train(), *kit.generator(), "--eval-data", tiny_teacher["eval"],
            "--quantize", "int8", "--min-agreement", "0")))
        image_eval = kit.report_of(kit.cli("eval", image / "student.safetensors", "--teacher", tiny_teacher["path"],
                                           "--eval-data", tiny_teacher["eval"], "--onnx", image / "student.onnx",
                                           "--format", "json"))
        text_run = kit.report_of(kit.cli("compress", bert_teacher_folder, "--recipe", "random-text", "--steps", 3,
                                         "--out", text, "--eval-data", table, "-s", "train.holdout=16",
                                         "-s", "train.eval_every=3", *kit.CPU_JSON))
        text_eval = kit.report_of(kit.cli("eval", text / "student", "--eval-data", table, "--format", "json"))
    return {"image compress": (json.loads((image / "report.json").read_text(encoding="utf-8")), image_run),
            "image eval": (image_eval, image_eval),
            "text compress": (json.loads((text / "report.json").read_text(encoding="utf-8")), text_run),
            "text eval": (text_eval, text_eval)}


@pytest.fixture(scope="module")
def reports(runs: dict[str, Any]) -> dict[str, Any]:
    """Each kind's document as dfkd wrote it."""
    return {kind: written for kind, (written, _) in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["image compress", "image eval", "text compress", "text eval"])
def test_real_reports_validate_and_round_trip_exactly(runs: dict[str, Any], kind: str) -> None:
    document, printed = runs[kind]
    assert [error.message for error in VALIDATOR.iter_errors(document)] == []
    assert json.dumps(document) == json.dumps(printed)  # report.json keeps the pipeline's keys and order
    again = Report.from_dict(document).to_dict()
    assert json.dumps(again) == json.dumps(document)  # same keys, values and order
    assert Report.from_dict(document, partial=True).to_dict() == document


def single_key_changes(document: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every key path of ``document`` (open-ended sections as a whole) with a wrong value for it:
    removed (None), null, a string, a fraction, an object."""
    if isinstance(document, dict):
        for name, value in document.items():
            for change in (None, ("null",), "text", 0.5, {}):
                yield path + (name,), change
            if name not in ("config", "plan", "source", "versions"):
                yield from single_key_changes(value, path + (name,))
    elif isinstance(document, list) and document:
        yield from single_key_changes(document[0], path + (0,))


def changed(document: Any, path: tuple, change: Any) -> Any:
    document = copy.deepcopy(document)
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if change is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = None if change == ("null",) else change
    return document


@pytest.mark.slow
def test_the_reader_and_the_schema_agree_on_every_single_key_change(reports: dict[str, Any]) -> None:
    """Both accept, or both refuse: the schema says exactly what Report.from_dict checks."""
    disagreements, refused = [], 0
    for kind, document in reports.items():
        for path, change in single_key_changes(document):
            wrong = changed(document, path, change)
            try:
                Report.from_dict(wrong)
                read = True
            except ValueError:
                read, refused = False, refused + 1
            if read != VALIDATOR.is_valid(wrong):
                disagreements.append((kind, path, change, read))
    assert disagreements == []
    assert refused > 1000  # the changes did exercise the checks


def image_report() -> dict[str, Any]:
    """A complete image compress report as JSON (tests/test_report.py's)."""
    return json.loads(json.dumps(full_report()))


@pytest.mark.parametrize(("path", "change", "message"), [
    (("student",), None, "report key student: missing (every image compress report has it)"),
    (("run", "health"), None, "report key run.health: missing"),
    (("run", "steps"), "200", "report key run.steps: expected an integer, got '200' (str)"),
    (("run", "seed"), True, "report key run.seed: expected an integer, got True"),
    (("teacher", "latency_ms", "torch"), "fast", "report key teacher.latency_ms.torch: expected a number or null"),
    (("synthetic_holdout", "per_class", "cat", "n"), 0.5, 'report key synthetic_holdout.per_class["cat"].n: expected an integer'),
    (("teacher",), ("null",), "report key teacher: is null, expected an object"),
    (("gate", "metric"), "accuracy", "report key gate.metric: expected one of 'top1_agreement'"),
    (("warnings",), ["ok", 3], r"report key warnings[1]: expected a string"),
    (("run", "throughput", "speed"), 1.0, "report key run.throughput.speed: unknown key"),
    (("schema_version",), 2, "report key schema_version: is 2, this dfkd reads and writes 1"),
    (("kind",), "train", "report key kind: expected one of 'compress', 'eval'"),
    (("family",), "text", "report key kind: missing (every text compress report has it)"),
])
def test_a_wrong_or_missing_key_is_refused_by_name(path: tuple, change: Any, message: str, tmp_path: Path) -> None:
    assert VALIDATOR.is_valid(image_report())  # so the one change below is what each check refuses
    document = changed(image_report(), path, change)
    with pytest.raises(ValueError) as raised:
        Report.from_dict(document)
    assert str(raised.value).startswith(message)
    assert not VALIDATOR.is_valid(document)
    with pytest.raises(ValueError, match=re.escape(message)):
        write_report(tmp_path, document)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def image_eval_report() -> dict[str, Any]:
    """A complete `dfkd eval` report of an image student."""
    report = image_report()
    return {"schema_version": 1, "dfkd_version": "0.1.0", "kind": "eval", "run": {"versions": report["run"]["versions"]},
            "teacher": {name: report["teacher"][name] for name in ("arch", "source", "path", "sha256")},
            "student": {"arch": "resnet8", "source": report["student"]["source"], "path": "run/student.safetensors",
                        "params": 78_000, "recipe": "dfad", "teacher_sha256": "ab" * 32},
            "eval_data": report["eval_data"], "warnings": [], "gate": None}


def test_each_kind_of_report_requires_its_own_keys() -> None:
    evaluated = image_eval_report()
    assert Report.from_dict(evaluated).to_dict() == evaluated and VALIDATOR.is_valid(evaluated)
    without_teacher = evaluated | {"teacher": None}  # dfkd eval --eval-data alone
    assert Report.from_dict(without_teacher).teacher is None and VALIDATOR.is_valid(without_teacher)
    without_path = changed(evaluated, ("student", "path"), None)
    with pytest.raises(ValueError, match=re.escape("report key student.path: missing (every image eval report has it)")):
        Report.from_dict(without_path)
    assert not VALIDATOR.is_valid(without_path)
    compressed_without_teacher = image_report() | {"teacher": None}
    with pytest.raises(ValueError, match="report key teacher: is null"):
        Report.from_dict(compressed_without_teacher)
    assert not VALIDATOR.is_valid(compressed_without_teacher)
    as_text = image_report() | {"kind": "compress", "family": "text"}
    with pytest.raises(ValueError, match=re.escape("report key teacher.class_names: missing (every text compress")):
        Report.from_dict(as_text)
    assert "'class_names' is a required property" in [error.message for error in VALIDATOR.iter_errors(as_text)]


def test_a_report_built_in_code_writes_its_keys_in_field_order() -> None:
    report = Report.from_dict(image_report())
    rebuilt = type(report)(**{name: getattr(report, name) for name in report.__dataclass_fields__})
    written = rebuilt.to_dict()
    assert list(written) == ["schema_version", "dfkd_version", "run", "teacher", "student", "synthetic_holdout",
                             "eval_data", "onnx_parity", "int8", "warnings", "gate"]  # absent: kind, family, samples
    assert written == image_report() and VALIDATOR.is_valid(written)
