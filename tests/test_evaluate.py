"""Tests for dfkd_cli.evaluate: predictions, agreement numbers, eval-data loading, latency and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from torch import nn

from dfkd_cli.errors import DfkdError
from dfkd_cli.evaluate import (
    agreement_report,
    count_params,
    file_size_bytes,
    onnx_latency_ms,
    predict,
    torch_latency_ms,
)
from dfkd_cli.eval_data import EvalData, load_eval_data

RGB_MEAN, RGB_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def one_hot_logits(classes: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()


# --- predict and agreement -------------------------------------------------------------------


def test_predict_batches_restores_mode_and_returns_cpu_float() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Dropout(0.5))
    model.train()
    x = torch.randn(10, 3, 2, 2)
    logits = predict(model, x, batch_size=3)
    assert model.training
    assert logits.shape == (10, 5) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(x))  # eval: dropout off, so results match


def test_agreement_report_exact_numbers_without_labels() -> None:
    names = ["cat", "dog", "ship", "tree"]
    teacher = one_hot_logits([0, 0, 1, 2, 2, 2], 4)
    student = one_hot_logits([0, 1, 1, 2, 2, 0], 4)

    report = agreement_report(teacher, student, names)

    assert report["n"] == 6
    assert report["top1_agreement"] == pytest.approx(4 / 6)
    assert list(report["per_class"]) == names
    assert report["per_class"]["cat"] == {"n": 2, "agreement": 0.5}
    assert report["per_class"]["dog"] == {"n": 1, "agreement": 1.0}
    assert report["per_class"]["ship"]["n"] == 3
    assert report["per_class"]["ship"]["agreement"] == pytest.approx(2 / 3)
    assert report["per_class"]["tree"] == {"n": 0, "agreement": None}  # never predicted by the teacher
    assert "teacher_accuracy" not in report


def test_agreement_report_with_labels_adds_accuracies() -> None:
    names = ["cat", "dog", "ship", "tree"]
    teacher = one_hot_logits([0, 0, 1, 2, 2, 2], 4)
    student = one_hot_logits([0, 1, 1, 2, 2, 0], 4)
    labels = torch.tensor([0, 0, 1, 2, 2, 1])

    report = agreement_report(teacher, student, names, labels)

    assert report["teacher_accuracy"] == pytest.approx(5 / 6)
    assert report["student_accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"]["cat"]["student_accuracy"] == 0.5
    assert report["per_class"]["dog"]["student_accuracy"] == 0.5
    assert report["per_class"]["ship"]["student_accuracy"] == 1.0
    assert report["per_class"]["ship"]["n_labelled"] == 2
    assert report["per_class"]["tree"]["student_accuracy"] is None
    assert report["per_class"]["cat"]["agreement"] == 0.5  # agreement stays keyed by teacher prediction


def test_agreement_report_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        agreement_report(torch.zeros(3, 2), torch.zeros(3, 3), ["a", "b"])
    with pytest.raises(ValueError):
        agreement_report(torch.zeros(3, 2), torch.zeros(3, 2), ["a"])


# --- load_eval_data: npz --------------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_grey_nhw_uint8_is_scaled_and_normalised(tmp_path: Path) -> None:
    x = np.zeros((4, 6, 6), np.uint8)
    x[1, 2, 3] = 255
    path = save_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1]))

    data = load_eval_data(path, (1, 6, 6), (0.5,), (0.25,), class_names=["a", "b", "c"])

    assert isinstance(data, EvalData) and data.source == "npz" and data.skipped == 0
    assert data.x.shape == (4, 1, 6, 6) and data.x.dtype == torch.float32
    assert data.x[1, 0, 2, 3].item() == pytest.approx((1.0 - 0.5) / 0.25)
    assert data.x[0, 0, 0, 0].item() == pytest.approx((0.0 - 0.5) / 0.25)
    assert data.y is not None and data.y.dtype == torch.int64 and data.y.tolist() == [0, 1, 2, 1]


def test_npz_nhwc_uint8_maps_channels(tmp_path: Path) -> None:
    x = np.zeros((2, 5, 5, 3), np.uint8)
    x[0, 1, 2] = (255, 51, 0)
    data = load_eval_data(save_npz(tmp_path / "d.npz", x=x), (3, 5, 5), RGB_MEAN, RGB_STD)

    assert data.y is None
    expected = [(1.0 - 0.5) / 0.2, (0.2 - 0.4) / 0.25, (0.0 - 0.3) / 0.5]
    assert data.x[0, :, 1, 2].tolist() == pytest.approx(expected)


def test_npz_float_nchw_is_taken_as_unit_range_and_limited(tmp_path: Path) -> None:
    x = np.full((5, 3, 4, 4), 0.25, np.float32)
    data = load_eval_data(save_npz(tmp_path / "d.npz", x=x, y=np.arange(5)), (3, 4, 4), RGB_MEAN, RGB_STD, limit=3)
    assert data.x.shape == (3, 3, 4, 4)
    assert data.x[2, 1, 0, 0].item() == pytest.approx((0.25 - 0.4) / 0.25)
    assert data.y is not None and data.y.tolist() == [0, 1, 2]


def test_npz_grey_is_expanded_to_rgb_and_resized(tmp_path: Path) -> None:
    x = np.full((2, 16, 12), 255, np.uint8)
    data = load_eval_data(save_npz(tmp_path / "d.npz", x=x), (3, 8, 8), RGB_MEAN, RGB_STD)
    assert data.x.shape == (2, 3, 8, 8)
    assert data.x[1, 2].flatten().tolist() == pytest.approx([(1.0 - 0.3) / 0.5] * 64, abs=1e-5)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "has no array 'x'"),
        ({"x": np.zeros((2, 4, 4, 4, 4), np.uint8)}, "has shape"),
        ({"x": np.full((2, 4, 4), 3.0, np.float32)}, "pixel values span"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 5])}, "labels 0..5"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0.0, 1.0])}, "integer labels"),
        ({"x": np.zeros((0, 4, 4), np.uint8)}, "no samples"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DfkdError, match=message) as info:
        load_eval_data(path, (1, 4, 4), (0.5,), (0.5,), class_names=["a", "b"])
    assert info.value.exit_code == 2 and "\n" not in info.value.message


def test_missing_path_and_wrong_file_type(tmp_path: Path) -> None:
    with pytest.raises(DfkdError, match="not found"):
        load_eval_data(tmp_path / "nope.npz", (1, 4, 4), (0.5,), (0.5,))
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(DfkdError, match="neither an .npz file nor a folder"):
        load_eval_data(tmp_path / "data.csv", (1, 4, 4), (0.5,), (0.5,))


# --- load_eval_data: image folders ---------------------------------------------------------


def make_folder(root: Path, colours: dict[str, list[tuple[int, int, int]]], size: tuple[int, int] = (12, 10)) -> Path:
    for name, fills in colours.items():
        (root / name).mkdir(parents=True)
        for index, fill in enumerate(fills):
            Image.new("RGB", size, fill).save(root / name / f"{index}.png")
    return root


def test_image_folder_maps_class_names_skips_corrupt_and_normalises(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "val", {"cat": [(255, 0, 0), (255, 0, 0)], "dog": [(0, 0, 255)]})
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "dog" / "notes.txt").write_text("ignored: not an image")

    data = load_eval_data(root, (3, 8, 8), RGB_MEAN, RGB_STD, class_names=["dog", "bird", "cat"])

    assert data.source == "image_folder" and data.label_mapping == "class_names"
    assert data.skipped == 1
    assert data.x.shape == (3, 3, 8, 8)
    assert data.y is not None and sorted(data.y.tolist()) == [0, 2, 2]
    red = data.x[data.y == 2][0]
    assert red[:, 4, 4].tolist() == pytest.approx([(1 - 0.5) / 0.2, (0 - 0.4) / 0.25, (0 - 0.3) / 0.5])


def test_image_folder_digit_names_and_grey_conversion(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "val", {"1": [(255, 255, 255)], "0": [(0, 0, 0)]}, size=(20, 20))
    data = load_eval_data(root, (1, 10, 10), (0.5,), (0.5,), class_names=["zero", "one"])
    assert data.label_mapping == "digits"
    assert data.x.shape == (2, 1, 10, 10)
    white = data.x[data.y == 1][0]
    assert white.min().item() == pytest.approx(1.0)  # (1 - 0.5) / 0.5


def test_image_folder_sorted_mapping_and_round_robin_limit(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "val", {"b": [(0, 0, 0)] * 3, "a": [(9, 9, 9)] * 3})
    data = load_eval_data(root, (3, 8, 8), RGB_MEAN, RGB_STD, limit=2)
    assert data.label_mapping == "sorted"
    assert data.y is not None and sorted(data.y.tolist()) == [0, 1]  # one of each class, not two of "a"


@pytest.mark.parametrize("layout", ["no_subfolders", "no_images", "all_corrupt"])
def test_image_folder_errors(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "val"
    root.mkdir()
    if layout != "no_subfolders":
        (root / "cat").mkdir()
    if layout == "all_corrupt":
        (root / "cat" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DfkdError, match="sub-folders|no images|no readable images"):
        load_eval_data(root, (3, 8, 8), RGB_MEAN, RGB_STD)


# --- sizes and latency ----------------------------------------------------------------------


def test_count_params_and_file_size(tmp_path: Path) -> None:
    shared = nn.Linear(4, 3)
    assert count_params(nn.Sequential(shared, nn.ReLU(), shared)) == 15  # shared weights counted once
    (tmp_path / "f.bin").write_bytes(b"x" * 1234)
    assert file_size_bytes(tmp_path / "f.bin") == 1234


def write_linear_onnx(path: Path, in_features: int, out_features: int) -> Path:
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((in_features, out_features)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


def test_latencies_are_positive_floats(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    torch_ms = torch_latency_ms(model, (1, 4, 4), batch_size=2, warmup=1, iters=5)
    onnx_ms = onnx_latency_ms(write_linear_onnx(tmp_path / "m.onnx", 16, 3), (1, 4, 4), batch_size=2, warmup=1, iters=5)
    for value in (torch_ms, onnx_ms):
        assert isinstance(value, float) and 0 < value < 1000
