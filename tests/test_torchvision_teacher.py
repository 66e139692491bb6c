"""A torchvision teacher end to end: a resnet18 state dict with 10 classes at 3x32x32."""

from __future__ import annotations

import pytest
import torch
import torchvision

import kit


@pytest.mark.slow
@pytest.mark.export  # the teacher's ONNX latency is part of what it checks
def test_torchvision_resnet18_state_dict_compresses_and_exports(tmp_path):
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(weights=None, num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in teacher.state_dict().items()}}, path)
    out = tmp_path / "run"
    resnet18 = {"path": path, "args": ["--arch", "resnet18", "--input-shape", "3x32x32"]}
    report = kit.report_of(kit.cli(*kit.compress_args(resnet18, out, "noise", 3, *kit.train(holdout=8, batch_size=8))))
    assert report["teacher"]["num_classes"] == 10 and report["teacher"]["input_shape"] == [3, 32, 32]
    assert report["teacher"]["params"] == sum(p.numel() for p in teacher.parameters())
    assert report["student"]["compression_ratio"] > 50
    assert report["teacher"]["latency_ms"]["onnx"] is not None
    assert (out / "student.onnx").is_file() and (out / "samples.png").is_file()
