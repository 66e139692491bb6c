"""A torchvision teacher end to end: a resnet18 state dict with 10 classes at 3x32x32."""

from __future__ import annotations

import json

import torch
import torchvision
from typer.testing import CliRunner

from dfkd_cli.cli import app


def test_torchvision_resnet18_state_dict_compresses_and_exports(tmp_path):
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}}, path)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["compress", str(path), "--arch", "resnet18", "--input-shape", "3x32x32",
                                      "--student", "resnet8", "--recipe", "noise", "--steps", "3", "--out", str(out),
                                      "-s", "train.holdout=8", "-s", "train.batch_size=8", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["teacher"]["num_classes"] == 10 and report["teacher"]["input_shape"] == [3, 32, 32]
    assert report["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert report["student"]["compression_ratio"] > 50
    assert report["teacher"]["latency_ms"]["onnx"] is not None
    assert (out / "student.onnx").is_file() and (out / "samples.png").is_file()
