"""Tests for dfkd_cli.report: report.json / report.md writing and the sample grid."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd_cli.evaluate import agreement_report
from dfkd_cli.report import SCHEMA_VERSION, render_markdown, write_report
from dfkd_cli.sample_grid import save_sample_grid

CLASS_NAMES = ["cat", "dog", "ship | boat"]


def one_hot(classes: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), len(CLASS_NAMES)).float()


def full_report() -> dict[str, Any]:
    synthetic = agreement_report(one_hot([0, 1, 2, 2, 0, 1]), one_hot([0, 1, 2, 1, 0, 1]), CLASS_NAMES)
    real = agreement_report(one_hot([0, 1, 2, 2]), one_hot([0, 1, 2, 0]), CLASS_NAMES, torch.tensor([0, 1, 2, 1]))
    return {
        "schema_version": SCHEMA_VERSION,
        "dfkd_version": "0.1.0",
        "run": {
            "recipe": "deepinversion",
            "seed": 7,
            "device": "cpu",
            "hardware": "CPU: Test (2 threads)",
            "started": "2025-01-01T12:00:00+00:00",
            "wall_clock_s": {"load": 0.5, "synthesize": 10.0, "train": 20.0, "export": 3.0, "evaluate": 1.0, "total": 34.5},
            "steps": 200,
            "config": {"synth": {"steps": 200, "lr": 0.1}, "train": {"epochs": 3}},
            "versions": {"torch": "2.15.0", "torchvision": "0.29.2", "onnxruntime": "1.31.1", "python": "3.11.7"},
            # the rest of what every image compress report holds (docs/report.schema.json)
            "peak_memory_mb": {}, "best_step": 180, "out": "runs/x", "prior": None, "from_synthetic": None,
            "stability": None, "race": None, "synthetic_saved": False, "resumed_from_step": None, "precision": "fp32",
            "loss_scale": None, "channels_last": True, "compiled": False, "processes": None, "plan": {},
            "throughput": {"synthesis_s": 10.0, "student_s": 20.0, "synthetic_samples": 6400, "student_samples": 12800,
                           "synthetic_samples_per_s": 640.0, "student_samples_per_s": 640.0},
            "health": {"rollbacks": 0, "lr_scales": {}, "checkpoints": "off", "warnings": []},
        },
        "teacher": {
            "arch": "resnet18", "path": "teacher.pt", "sha256": "ab" * 32, "num_classes": 3, "input_shape": [3, 32, 32],
            "source": {"kind": "registry", "name": "resnet18"},
            "params": 11_200_000, "file_bytes": 44_800_000, "latency_ms": {"torch": 4.2, "onnx": None}, "has_bn": True,
        },
        "student": {
            "arch": "resnet8", "params": 78_000, "file_bytes": {"safetensors": 320_000, "onnx": 330_000},
            "source": {"kind": "registry", "name": "resnet8"},
            "latency_ms": {"torch": 0.41, "onnx": 0.12}, "compression_ratio": 11_200_000 / 78_000,
        },
        "synthetic_holdout": synthetic,
        "eval_data": real | {"source": "npz", "skipped_files": 0, "label_mapping": "npz"},
        "onnx_parity": {"batch_sizes": [1, 2, 7], "max_abs_diff": 2.4e-6, "top1_agreement": 1.0, "opset": 18,
                        "max_abs_logit": 9.5},
        "int8": None,
        "gate": {"min_agreement": 0.7, "measured_on": "eval_data", "metric": "top1_agreement", "measured": 0.75,
                 "passed": True},
        "warnings": ["teacher has no BatchNorm layers; DeepInversion's BN prior is off"],
    }


def test_write_report_round_trips_json_and_renders_markdown(tmp_path: Path) -> None:
    report = full_report()
    write_report(tmp_path, report)

    assert json.loads((tmp_path / "report.json").read_text(encoding="utf-8")) == report
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# dfkd report: resnet18 → resnet8")
    assert "83.33%" in markdown  # synthetic hold-out agreement, 5 of 6
    assert "| Top-1 agreement, eval data (n=4) | 75.00% |" in markdown
    assert "| Teacher accuracy, eval data | 75.00% |" in markdown
    assert "143.6×" in markdown
    assert "ship \\| boat" in markdown  # pipes in class names do not break the table
    assert "**passed**" in markdown and "teacher has no BatchNorm" in markdown
    assert '"lr": 0.1' in markdown and "| onnxruntime | 1.31.1 |" in markdown
    assert "| total | 34.5 |" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temp files


def test_markdown_renders_with_every_optional_section_null() -> None:
    report = full_report()
    report.update(synthetic_holdout=None, eval_data=None, onnx_parity=None, gate=None, warnings=[])
    report["run"] = {"recipe": "noise", "seed": 0}
    report["student"]["latency_ms"] = {"torch": 0.4, "onnx": None}

    markdown = render_markdown(report)

    assert "Per-class" not in markdown and "## Warnings" not in markdown and "## Timings" not in markdown
    assert "| ONNX parity | not exported |" in markdown
    assert "| Gate | none set |" in markdown


def test_write_report_rejects_missing_keys_and_other_schema(tmp_path: Path) -> None:
    report = full_report()
    del report["student"]
    with pytest.raises(ValueError, match="student"):
        write_report(tmp_path, report)
    report = full_report() | {"schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(ValueError, match="schema_version"):
        write_report(tmp_path, report)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_numbers_and_paths_become_strict_json(tmp_path: Path) -> None:
    report = full_report()
    report["student"]["latency_ms"]["onnx"] = math.nan
    report["teacher"]["path"] = tmp_path / "teacher.pt"
    report["run"]["seed"] = np.int64(7)
    original = copy.deepcopy(report)

    write_report(tmp_path, report)

    text = (tmp_path / "report.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    data = json.loads(text)
    assert data["student"]["latency_ms"]["onnx"] is None
    assert data["teacher"]["path"] == str(tmp_path / "teacher.pt")
    assert data["run"]["seed"] == 7
    assert report["teacher"]["path"] == original["teacher"]["path"]  # the caller's dict is not modified


def test_many_classes_list_only_the_weakest() -> None:
    names = [f"class{i}" for i in range(150)]
    per_class = {name: {"n": 1, "agreement": 1.0 if i != 120 else 0.0} for i, name in enumerate(names)}
    report = full_report() | {"synthetic_holdout": {"n": 150, "top1_agreement": 0.99, "per_class": per_class}, "eval_data": None}
    markdown = render_markdown(report)
    class_rows = [line for line in markdown.splitlines() if line.startswith("| class")]
    assert len(class_rows) == 100
    assert class_rows[0].startswith("| class120 |")


def grid_height(rows: int, tile: int) -> int:
    return 2 + rows * (tile + 2)


def test_sample_grid_has_one_row_per_class_and_blank_rows(tmp_path: Path) -> None:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = torch.full((10, 3, 32, 32), (0.0 - 0.5) / 0.25)  # all black after de-normalising
    labels = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 2, 2])  # class 1 ("dog") never predicted
    path = tmp_path / "samples.png"

    save_sample_grid(x, labels, mean, std, CLASS_NAMES, path, per_class=4)

    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] == grid_height(rows=3, tile=64)  # 32 px tiles shown at 64 px
    grid = pixels[:, -grid_height(rows=4, tile=64) :]  # 4 columns; the class-name margin is on the left

    def tile(row: int, column: int) -> np.ndarray:
        top, left = 2 + row * 66, 2 + column * 66
        return grid[top : top + 64, left : left + 64]

    assert [tile(0, c).max() for c in range(3)] == [0, 0, 0]  # "cat": its three black samples
    assert tile(0, 3).min() == 255  # ... and one blank tile
    assert all(tile(1, c).min() == 255 for c in range(4))  # "dog": a blank row
    assert [tile(2, c).max() for c in range(4)] == [0, 0, 0, 0]  # "ship": capped at per_class=4
    assert pixels[:, :3].min() == 255  # the margin is white left of the class names
    assert pixels[:, 3:-266].min() < 128  # ... which are drawn in black


def test_sample_grid_caps_at_100_classes(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(120)]
    x = torch.zeros(120, 1, 28, 28)
    save_sample_grid(x, torch.arange(120), (0.5,), (0.5,), names, tmp_path / "g.png", per_class=1)
    with Image.open(tmp_path / "g.png") as image:
        assert image.height == grid_height(rows=100, tile=56)
