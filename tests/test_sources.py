"""The teacher kinds (dfkd_cli/sources.py): how a path is told apart, and what each kind refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dfkd_cli.errors import DfkdError
from dfkd_cli.export import StudentMeta
from dfkd_cli.sources import needs_arch, refuse_arch, teacher_kind


def _folder(tmp_path: Path, name: str, architectures: list[str] | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if architectures is not None:
        (folder / "config.json").write_text(json.dumps({"architectures": architectures}), encoding="utf-8")
    return folder


def test_kinds_are_told_apart_by_suffix_and_config(tmp_path: Path) -> None:
    assert teacher_kind(tmp_path / "net.pt2") == "program"
    assert teacher_kind(tmp_path / "NET.PT2") == "program"
    assert teacher_kind(tmp_path / "net.safetensors") == "checkpoint"
    assert teacher_kind(_folder(tmp_path, "vit", ["ViTForImageClassification"])) == "hf-image"
    # a text classifier folder and a folder without a config are not image folders
    assert teacher_kind(_folder(tmp_path, "bert", ["BertForSequenceClassification"])) == "checkpoint"
    assert teacher_kind(_folder(tmp_path, "empty", None)) == "checkpoint"
    broken = _folder(tmp_path, "broken", None)
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    assert teacher_kind(broken) == "checkpoint"


def test_only_weights_files_take_an_arch(tmp_path: Path) -> None:
    assert needs_arch(tmp_path / "w.pt") and not needs_arch(tmp_path / "w.pt2")
    refuse_arch("checkpoint", tmp_path / "w.pt", "resnet8")  # the one kind --arch is for
    refuse_arch("program", tmp_path / "w.pt2", None)
    with pytest.raises(DfkdError, match="leave out --arch"):
        refuse_arch("program", tmp_path / "w.pt2", "resnet8")
    with pytest.raises(DfkdError, match="config.json"):
        refuse_arch("hf-image", tmp_path / "vit", "resnet8")


def test_student_metadata_records_the_architecture_source_and_reads_old_files() -> None:
    meta = StudentMeta("timm:test_resnet", 3, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, ["a", "b", "c"], "noise",
                       "resnet8", "ab", "0.1.0", arch_source={"kind": "timm", "name": "timm:test_resnet"})
    assert StudentMeta.from_metadata(meta.to_metadata()) == meta
    old = {key: value for key, value in meta.to_metadata().items() if not key.endswith("arch_source")}
    assert StudentMeta.from_metadata(old).arch_source == {}
    damaged = {**meta.to_metadata(), "dfkd.arch_source": "[1, 2]"}
    with pytest.raises(DfkdError, match="not a JSON object"):
        StudentMeta.from_metadata(damaged)


def test_registry_teachers_say_where_their_defaults_came_from(tmp_path: Path) -> None:
    from dfkd_cli.archs import create_model
    from dfkd_cli.teacher import load_teacher

    path = tmp_path / "lenet.pt"
    torch.manual_seed(0)
    torch.save(create_model("lenet5", 10, (1, 32, 32)).state_dict(), path)
    teacher = load_teacher(path, "lenet5")
    assert teacher.source == {"kind": "registry", "name": "lenet5"}
    assert teacher.default_student == "lenet5_half"
    assert "default for lenet5: 32x32 pixels" in teacher.shape_note
    assert "mnist statistics" in teacher.stats_note
    with pytest.raises(DfkdError, match="pass --arch"):
        load_teacher(path, None)
