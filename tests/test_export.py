"""Tests for dfkd_cli.export: safetensors round trip with metadata, ONNX export behind a parity gate."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfkd_cli import export
from dfkd_cli.errors import DfkdError, ExportError
from dfkd_cli.export import OnnxParity, StudentMeta, export_onnx, load_student, onnx_predict, save_student

INPUT_SHAPE = (3, 8, 8)


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def trained_cnn(seed: int = 0) -> TinyCNN:
    """A TinyCNN whose BatchNorm running statistics are not the identity."""
    torch.manual_seed(seed)
    model = TinyCNN()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, *INPUT_SHAPE) * 2 + 1)
    return model.eval()


def make_meta(**changes: object) -> StudentMeta:
    values = dict(
        arch="tiny_cnn",
        num_classes=4,
        input_shape=INPUT_SHAPE,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        class_names=["cat", "dog", "ship", "tree, big"],
        recipe="deepinversion",
        teacher_arch="resnet18",
        teacher_sha256="ab" * 32,
        dfkd_version="0.1.0",
    )
    values.update(changes)
    return StudentMeta(**values)


@pytest.fixture
def fake_archs(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Stand-in for dfkd_cli.archs whose create_model builds a fresh (untrained) TinyCNN."""
    calls: list[tuple] = []

    def create_model(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        calls.append((name, num_classes, input_shape))
        return TinyCNN(num_classes=num_classes, in_channels=input_shape[0])

    monkeypatch.setitem(sys.modules, "dfkd_cli.archs", types.SimpleNamespace(create_model=create_model))
    return calls


def test_metadata_is_flat_strings_with_prefix_and_round_trips() -> None:
    meta = make_meta()
    metadata = meta.to_metadata()
    assert metadata["format"] == "pt"
    assert all(isinstance(v, str) for v in metadata.values())
    assert set(metadata) - {"format"} == {f"dfkd.{name}" for name in meta.__dataclass_fields__}
    assert json.loads(metadata["dfkd.class_names"]) == meta.class_names
    assert StudentMeta.from_metadata(metadata) == meta


def test_save_load_round_trip_keeps_metadata_and_outputs(tmp_path: Path, fake_archs: list[tuple]) -> None:
    model, meta = trained_cnn(), make_meta()
    path = tmp_path / "student.safetensors"
    save_student(model, meta, path)

    loaded, loaded_meta = load_student(path)

    assert loaded_meta == meta
    assert fake_archs == [("tiny_cnn", 4, INPUT_SHAPE)]
    assert not loaded.training
    x = torch.randn(5, *INPUT_SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [p.name for p in tmp_path.iterdir()] == ["student.safetensors"]  # no temp file left behind


def test_file_without_dfkd_metadata_is_rejected(tmp_path: Path, fake_archs: list[tuple]) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in trained_cnn().state_dict().items()}, str(path), metadata={"format": "pt"})
    with pytest.raises(DfkdError, match="not a dfkd student file") as info:
        load_student(path)
    assert info.value.exit_code == 2
    assert "\n" not in info.value.message


def test_malformed_metadata_value_is_rejected() -> None:
    metadata = make_meta().to_metadata()
    metadata["dfkd.input_shape"] = "[3, 8"
    with pytest.raises(DfkdError, match="dfkd.input_shape"):
        StudentMeta.from_metadata(metadata)


@pytest.mark.parametrize("content", [None, b"", b"definitely not safetensors"])
def test_missing_or_corrupt_student_file_gives_dfkd_error(tmp_path: Path, fake_archs: list[tuple], content: bytes | None) -> None:
    path = tmp_path / "student.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DfkdError, match="student file"):
        load_student(path)


def test_weights_that_do_not_fit_the_architecture_give_dfkd_error(tmp_path: Path, fake_archs: list[tuple]) -> None:
    path = tmp_path / "student.safetensors"
    names = [str(i) for i in range(7)]
    save_student(trained_cnn(), make_meta(num_classes=7, class_names=names), path)  # head has 4 outputs, metadata claims 7
    with pytest.raises(DfkdError, match="does not fit architecture 'tiny_cnn'"):
        load_student(path)


def test_export_onnx_passes_parity_and_accepts_batch_sizes_1_2_7(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = trained_cnn()
    model.train()  # the caller's mode must survive the export
    path = tmp_path / "student.onnx"

    parity = export_onnx(model, path, INPUT_SHAPE, torch.randn(12, *INPUT_SHAPE))

    assert capfd.readouterr().out == ""
    assert isinstance(parity, OnnxParity)
    assert parity.batch_sizes == [1, 2, 7]
    assert 0.0 <= parity.max_abs_diff < 1e-4
    assert parity.top1_agreement == 1.0
    assert parity.opset >= 18
    assert parity.to_dict() == {"batch_sizes": [1, 2, 7], "max_abs_diff": parity.max_abs_diff, "top1_agreement": 1.0,
                                "opset": parity.opset, "max_abs_logit": parity.max_abs_logit}
    assert model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]

    session = export.onnx_session(path)
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    model.eval()
    for batch_size in (1, 2, 7):
        x = torch.randn(batch_size, *INPUT_SHAPE)
        logits = onnx_predict(path, x.numpy())
        assert logits.shape == (batch_size, 4)
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)


def test_export_onnx_repeats_rows_when_given_fewer_than_seven(tmp_path: Path) -> None:
    parity = export_onnx(trained_cnn(), tmp_path / "student.onnx", INPUT_SHAPE, torch.randn(1, *INPUT_SHAPE))
    assert parity.top1_agreement == 1.0
    assert (tmp_path / "student.onnx").is_file()


def test_failed_parity_on_tolerance_raises_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "student.onnx"
    with pytest.raises(ExportError, match=r"ONNX parity check failed: max \|diff\| .* \(limit -\d") as info:
        export_onnx(trained_cnn(), path, INPUT_SHAPE, torch.randn(8, *INPUT_SHAPE), atol=-1.0)
    assert info.value.exit_code == 3
    assert "\n" not in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_on_agreement_raises_even_with_loose_tolerance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_predict = export.onnx_predict

    def shifted_predict(model: object, x: np.ndarray) -> np.ndarray:
        return np.roll(real_predict(model, x), 1, axis=1)  # same values, different argmax

    monkeypatch.setattr(export, "onnx_predict", shifted_predict)
    with pytest.raises(ExportError, match=r"top-1 agreement 0\.\d+ \(need 1\.0\)"):
        export_onnx(trained_cnn(), tmp_path / "student.onnx", INPUT_SHAPE, torch.randn(10, *INPUT_SHAPE), atol=1e9)
    assert list(tmp_path.iterdir()) == []


def test_unexportable_model_raises_export_error_without_output(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3 * 8 * 8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.linear(x.flatten(1))
            return logits if x.sum() > 0 else -logits  # data-dependent branch: torch.export refuses

    with pytest.raises(ExportError, match="ONNX export failed"):
        export_onnx(DataDependent(), tmp_path / "student.onnx", INPUT_SHAPE, torch.randn(4, *INPUT_SHAPE))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert list(tmp_path.iterdir()) == []


def test_model_that_fixes_the_batch_size_is_rejected(tmp_path: Path) -> None:
    class BatchOfTwo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3 * 8 * 8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x.reshape(2, -1))  # only works for batches of two

    with pytest.raises(ExportError, match="fixed the batch size to 2"):
        export_onnx(BatchOfTwo(), tmp_path / "student.onnx", INPUT_SHAPE, torch.randn(4, *INPUT_SHAPE))
    assert list(tmp_path.iterdir()) == []


class _HugeLogits(nn.Module):
    """Logits around 1e9, as a diverged student has: float32 rounding alone differs by ~1e2 there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3))) * 1e9


def test_parity_tolerance_is_relative_for_large_logits(tmp_path):
    torch.manual_seed(0)
    parity = export_onnx(_HugeLogits(), tmp_path / "huge.onnx", (3, 8, 8), torch.randn(10, 3, 8, 8))
    assert parity.max_abs_logit > 1e7 and parity.top1_agreement == 1.0
    assert (tmp_path / "huge.onnx").is_file()
