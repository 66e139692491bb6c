"""Loading teachers from state-dict files: layouts, inferred shapes and every kind of bad input."""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from dfkd_cli.archs import create_model
from dfkd_cli.checkpoint import read_state_dict, sha256_file
from dfkd_cli.errors import DfkdError
from dfkd_cli.teacher import (
    Teacher,
    build_student,
    fit_state_dict,
    load_teacher,
    parse_input_shape,
    read_labels,
    resolve_normalization,
)


DAFL_TO_FAST_DATAFREE = {"conv1.": "features.0.", "conv2.": "features.3.", "conv3.": "features.6.",
                         "fc1.": "fc.0.", "fc2.": "fc.2."}


def trained_like(name: str, num_classes: int, shape: tuple[int, int, int]) -> nn.Module:
    """A random model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, num_classes, shape)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def as_saved(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as DataParallel training scripts save it: nested and ``module.``-prefixed."""
    return {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}


def same_outputs(teacher: Teacher, model: nn.Module) -> bool:
    x = torch.randn(4, *teacher.input_shape)
    with torch.no_grad():
        return torch.allclose(teacher.model(x), model(x), atol=1e-6)


def write_pt(tmp_path: Path, model: nn.Module, name: str = "teacher.pt") -> Path:
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(DfkdError) as info:
        call(*args, **kwargs)
    assert "\n" not in info.value.message and info.value.exit_code == 2
    return info.value.message


# --- round trips ------------------------------------------------------------------------------


def test_resnet8_round_trip_nested_pt(tmp_path: Path) -> None:
    model = trained_like("resnet8", 5, (3, 32, 32))
    path = tmp_path / "resnet8.pt"
    torch.save(as_saved(model), path)
    teacher = load_teacher(path, "resnet8")
    assert (teacher.num_classes, teacher.input_shape, teacher.arch) == (5, (3, 32, 32), "resnet8")
    assert same_outputs(teacher, model)
    assert teacher.mean == (0.4914, 0.4822, 0.4465) and teacher.class_names == ["0", "1", "2", "3", "4"]
    assert teacher.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert teacher.path == str(path)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.has_bn and "bn1" in teacher.bn_layers and "layer2.0.downsample.1" in teacher.bn_layers
    assert teacher.num_params == sum(p.numel() for p in model.parameters())
    assert teacher.classifier_name == "fc" and teacher.to("cpu") is teacher


def test_resnet8_round_trip_safetensors_gray(tmp_path: Path) -> None:
    model = trained_like("resnet8", 3, (1, 32, 32))
    path = tmp_path / "resnet8.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    teacher = load_teacher(path, "resnet8")
    assert (teacher.num_classes, teacher.input_shape) == (3, (1, 32, 32))
    assert teacher.mean == (pytest.approx(sum((0.4914, 0.4822, 0.4465)) / 3),)
    assert same_outputs(teacher, model)


@pytest.mark.parametrize("layout", ["dafl", "fast_datafree"])
def test_lenet5_round_trip_both_layouts(tmp_path: Path, layout: str) -> None:
    model = trained_like("lenet5", 10, (1, 32, 32))
    state = model.state_dict()
    if layout == "fast_datafree":
        state = {next(new + k[len(old):] for old, new in DAFL_TO_FAST_DATAFREE.items() if k.startswith(old)): v
                 for k, v in state.items()}
        assert "features.6.weight" in state and "fc.2.bias" in state
    path = tmp_path / "lenet5.pth"
    torch.save({"model": state}, path)
    teacher = load_teacher(path, "lenet5")
    assert (teacher.num_classes, teacher.input_shape) == (10, (1, 32, 32))
    assert teacher.mean == (0.1307,) and teacher.std == (0.3081,)
    assert not teacher.has_bn and teacher.bn_layers == []
    assert same_outputs(teacher, model)


def test_torchvision_resnet18_gray_round_trip_and_suggestion(tmp_path: Path) -> None:
    model = trained_like("resnet18", 10, (1, 32, 32))
    path = tmp_path / "resnet18.pt"
    torch.save(as_saved(model), path)
    teacher = load_teacher(path, "resnet18", input_shape=(1, 32, 32))
    assert (teacher.num_classes, teacher.input_shape) == (10, (1, 32, 32))
    assert teacher.mean == (pytest.approx(0.449),)  # ImageNet preset averaged for one channel
    assert same_outputs(teacher, model)
    message = error_of(load_teacher, path, "cifar_resnet18", input_shape=(1, 32, 32))
    assert "did you mean --arch resnet18?" in message


def test_fp16_checkpoint_without_batch_counters(tmp_path: Path) -> None:
    model = trained_like("wrn16_1", 4, (3, 32, 32))
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "wrn.safetensors"
    safetensors.torch.save_file(state, path)
    teacher = load_teacher(path, "WRN-16-1")
    assert teacher.arch == "wrn16_1" and teacher.num_classes == 4
    assert next(teacher.model.parameters()).dtype == torch.float32


def test_fit_state_dict_and_build_student(tmp_path: Path) -> None:
    model = trained_like("resnet20", 100, (1, 28, 28))
    assert fit_state_dict("resnet20", model.state_dict()) == (100, 1)
    teacher = load_teacher(write_pt(tmp_path, model), "resnet20", input_shape=(1, 28, 28))
    student = build_student("resnet8", teacher)
    assert student.training and student.conv1.in_channels == 1
    with torch.no_grad():
        assert student.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 100)


def test_read_state_dict_strips_compile_prefix_and_finds_lone_dict(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"step": 1, "teacher": {"_orig_mod.module.fc.weight": torch.ones(2, 3)}}, path)
    assert list(read_state_dict(path)) == ["fc.weight"]


def test_training_metadata_does_not_need_trust(tmp_path: Path) -> None:
    model = trained_like("resnet8", 10, (3, 32, 32))
    path = tmp_path / "ckpt.pth"
    extras = {"best_acc1": np.float64(0.93), "curve": np.zeros(3), "args": argparse.Namespace(lr=0.1)}
    torch.save({"state_dict": model.state_dict(), **extras}, path)
    assert same_outputs(load_teacher(path, "resnet8"), model)


# --- bad input --------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "not found; check the path" in error_of(load_teacher, tmp_path / "nope.pt", "resnet8")
    torch.save({}, tmp_path / "inside.pt")
    message = error_of(load_teacher, tmp_path, "resnet8")
    assert "is a directory" in message and "inside.pt" in message


def test_empty_truncated_and_random_files(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is empty" in error_of(read_state_dict, tmp_path / "empty.pt")
    real = write_pt(tmp_path, trained_like("resnet8", 10, (3, 32, 32)), "full.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(real[: len(real) // 2])
    message = error_of(load_teacher, tmp_path / "half.pt", "resnet8")
    assert "is not a readable PyTorch or safetensors file" in message and "truncated or corrupted" in message
    (tmp_path / "noise.pt").write_bytes(random.Random(0).randbytes(4096))
    assert "not a readable" in error_of(load_teacher, tmp_path / "noise.pt", "resnet8")
    (tmp_path / "noise.safetensors").write_bytes(random.Random(1).randbytes(4096))
    assert "not a readable" in error_of(read_state_dict, tmp_path / "noise.safetensors")


def test_file_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "acc": 0.9}, path)
    message = error_of(read_state_dict, path)
    assert "contains no tensors" in message and "epoch" in message


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    model = trained_like("resnet8", 10, (3, 32, 32))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    message = error_of(load_teacher, path, "resnet8")
    assert "needs pickled code" in message and "--trust-pickle" in message and "state_dict()" in message
    teacher = load_teacher(path, "resnet8", trust_pickle=True)
    assert same_outputs(teacher, model)


def test_wrong_arch_lists_keys_and_suggests(tmp_path: Path) -> None:
    path = write_pt(tmp_path, trained_like("resnet20", 10, (3, 32, 32)))
    message = error_of(load_teacher, path, "resnet8")
    assert f"checkpoint '{path}' does not fit resnet8" in message
    assert "unexpected keys: layer1.1.conv1.weight" in message and "more)" in message
    assert "did you mean --arch resnet20?" in message
    wrn = write_pt(tmp_path, trained_like("wrn16_2", 10, (3, 32, 32)), "wrn.pt")
    message = error_of(load_teacher, wrn, "wrn16_1")
    assert "shape mismatches: block1.layer.0.conv1.weight: checkpoint 32x16x3x3 vs model 16x16x3x3" in message
    assert "did you mean --arch wrn16_2?" in message
    lenet = write_pt(tmp_path, trained_like("lenet5", 10, (1, 32, 32)), "lenet.pt")
    message = error_of(load_teacher, lenet, "resnet8")
    assert "missing keys: bn1.weight, bn1.bias, bn1.running_mean (+" in message
    assert "shape mismatches: conv1.weight: checkpoint 6x1x5x5 vs model 16x1x3x3" in message
    assert "did you mean --arch lenet5?" in message


def test_input_shape_errors(tmp_path: Path) -> None:
    lenet = write_pt(tmp_path, trained_like("lenet5", 10, (1, 32, 32)), "lenet.pt")
    message = error_of(load_teacher, lenet, "lenet5", input_shape=(1, 16, 16))
    assert message.startswith("architecture lenet5 cannot take input shape 1x16x16") and "1x32x32" in message
    message = error_of(load_teacher, lenet, "lenet5", input_shape=(3, 32, 32))
    assert "has 3 channels but the checkpoint's conv1.weight takes 1; pass --input-shape 1x32x32" in message


@pytest.mark.parametrize("text", ["3x32", "3x32x32x1", "axbxc", "0x32x32", "", "3 by 32 by 32"])
def test_bad_input_shape_text(text: str) -> None:
    assert "write it as CxHxW" in error_of(parse_input_shape, text)


def test_parse_input_shape_accepts_variants() -> None:
    assert parse_input_shape("3x32x32") == (3, 32, 32)
    assert parse_input_shape(" 1X28x28 ") == (1, 28, 28)


def test_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\nbird\n\n")
    assert read_labels(path, 3) == ["cat", "dog", "bird"]
    assert "has 3 names but the teacher has 10 classes" in error_of(read_labels, path, 10)
    path.write_text("cat\n\ndog\n")
    assert "empty line 2" in error_of(read_labels, path, 3)
    assert "not found" in error_of(read_labels, tmp_path / "none.txt", 3)
    ckpt = write_pt(tmp_path, trained_like("resnet8", 3, (3, 32, 32)))
    path.write_text("cat\ndog\nbird\n")
    assert load_teacher(ckpt, "resnet8", labels=path).class_names == ["cat", "dog", "bird"]
    path.write_text("cat\ndog\n")
    assert "has 2 names but the teacher has 3 classes" in error_of(load_teacher, ckpt, "resnet8", labels=path)


def test_resolve_normalization() -> None:
    assert resolve_normalization(None, None, None, 3, "cifar10") == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert resolve_normalization("imagenet", [0.5, 0.5, 0.5], None, 3, "cifar10")[0] == (0.5, 0.5, 0.5)
    assert resolve_normalization("mnist", None, None, 3, "cifar10") == ((0.1307,) * 3, (0.3081,) * 3)
    assert resolve_normalization(None, [0.5], [0.25], 3, "mnist") == ((0.5,) * 3, (0.25,) * 3)
    gray_mean, gray_std = resolve_normalization("imagenet", None, None, 1, "cifar10")
    assert gray_mean == (pytest.approx(0.449),) and gray_std == (pytest.approx(0.226),)
    assert "--mean has 2 values but the input has 3 channels" in error_of(
        resolve_normalization, None, [0.1, 0.2], None, 3, "cifar10")
    assert "unknown normalization preset 'imagent'" in error_of(
        resolve_normalization, "imagent", None, None, 3, "cifar10")
    assert "must be positive" in error_of(resolve_normalization, None, None, [0.0], 1, "mnist")
