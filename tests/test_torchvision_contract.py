"""Every torchvision classification model as a dfkd teacher: built by the registry at the smallest input
it takes, its own state dict saved with ``torch.save``, loaded through :func:`load_teacher` (every check
a user's file goes through), run, and exported to ONNX with parity (issue #19 item 5).

What each tier covers (markers in pyproject.toml):

- default: every model. Those up to ``LIGHT_PARAMS`` parameters are built, saved, loaded and run for
  real; the larger ones (vit_h_14, regnet_y_128gf, VGG, ...: up to 2.5 GB each) go through the same
  file on the meta device, which holds shapes and no data: the state dict's keys and shapes, its module
  versions, dfkd's fit check, a load through the modules' own loaders and a forward pass of shapes.
  ONNX export with parity (2-6 s a model) for the two in ``EXPORTED_BY_DEFAULT``.
- ``heavy`` (opt-in: ``DFKD_HEAVY_TESTS=1 python -m pytest -m heavy tests/test_torchvision_contract.py``):
  the full contract, ONNX included, for every model, up to vit_h_14's 630M parameters at 224x224.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from dfkd_cli.archs import build_on_meta, create_model, get_arch, list_archs, param_shapes
from dfkd_cli.checkpoint import read_state_dict, with_module_versions
from dfkd_cli.export import export_onnx
from dfkd_cli.teacher import fit_state_dict, load_teacher

TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)
NUM_CLASSES = 5  # not ImageNet's 1000: the loader must read it from the checkpoint's classifier
# 32x32 (CIFAR) is taken by every torchvision CNN (densenet, vgg and convnext need 29-32); these need more.
SMALLEST_SIDE = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 221}
VIT_SIDE = 224  # torchvision's ViT takes exactly its image_size, which dfkd leaves at 224
DEFAULT_SIDE = 32
# Above this many parameters (torchvision's published count), the default tier checks on the meta device.
LIGHT_PARAMS = 12_000_000
# Exported in the default tier: the model whose loader needs the version metadata, and the cheapest
# export (the first export also pays ~2 s of exporter start-up). Every model is exported in the heavy tier.
EXPORTED_BY_DEFAULT = ("mnasnet0_5", "squeezenet1_1")
HEAVY = os.environ.get("DFKD_HEAVY_TESTS") == "1"
# BatchNorm statistics of an untrained model set from one batch this large: with 8 or 32, the deep
# EfficientNets' 1x1 feature maps got statistics that made logits of 1e5 on other inputs, where ONNX
# parity fails (efficientnet_v2_l still did at 32).
CALIBRATION_BATCH = 128


def smallest_side(name: str) -> int:
    """The side of the smallest square input ``name`` is tested at."""
    return VIT_SIDE if name.startswith("vit_") else SMALLEST_SIDE.get(name, DEFAULT_SIDE)


def published_params(name: str) -> int:
    """The parameter count torchvision publishes for ``name`` (its ImageNet weights), read without building it."""
    return min(weights.meta["num_params"] for weights in torchvision.models.get_model_weights(name))


def meta_model(name: str) -> nn.Module:
    """``name`` as the registry builds it, its weights holding shapes and no data."""
    return build_on_meta(name, NUM_CLASSES).eval()


def module_versions(model: nn.Module) -> dict[str, int]:
    """The format version of every module, as ``state_dict`` records it."""
    return {name: module._version for name, module in model.named_modules()}


def calibrated_teacher(name: str, shape: tuple[int, int, int]) -> nn.Module:
    """An untrained ``name`` whose outputs depend on its input: BatchNorm statistics set from one batch of
    random inputs (dropout and stochastic depth off, or the statistics mismatch eval mode and the logits
    reach 1e5), and classifier heads torchvision initialises to zero (ViT's) given small random weights."""
    torch.manual_seed(0)  # the same untrained model whichever tests ran before
    model = create_model(name, NUM_CLASSES, shape).eval()
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
            module.train()
    with torch.no_grad():
        model(torch.randn(CALIBRATION_BATCH, *shape, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def check_full_contract(name: str, folder: Path, export: bool) -> None:
    """Build, save, load through dfkd's checks, run (same outputs as the saved model) and, if ``export``,
    export to ONNX with parity."""
    side = smallest_side(name)
    shape = (3, side, side)
    model = calibrated_teacher(name, shape)
    path = folder / f"{name}.pt"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(path, name, input_shape=shape)
    assert (teacher.arch, teacher.num_classes, teacher.input_shape) == (name, NUM_CLASSES, shape)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(x), model(x))
    if export:
        parity = export_onnx(teacher.model, folder / f"{name}.onnx", shape, x, role="teacher")
        assert parity.top1_agreement == 1.0 and (folder / f"{name}.onnx").is_file()


def check_meta_contract(name: str, folder: Path) -> None:
    """The checks of :func:`check_full_contract` that need no weights' values, on a file of meta tensors."""
    model = meta_model(name)
    path = folder / f"{name}.pt"
    torch.save(model.state_dict(), path)
    state = read_state_dict(path)
    assert {key: tuple(value.shape) for key, value in state.items()} == param_shapes(name, NUM_CLASSES, 3)
    assert {module: entry["version"] for module, entry in state._metadata.items()} == module_versions(model)
    assert fit_state_dict(name, state) == (NUM_CLASSES, 3)
    model.load_state_dict(with_module_versions(model, state), strict=True, assign=True)  # the modules' loaders
    side = smallest_side(name)
    with torch.no_grad():
        assert model(torch.empty(1, 3, side, side, device="meta")).shape == (1, NUM_CLASSES)


def test_every_torchvision_classifier_is_registered() -> None:
    registered = set(list_archs())
    assert len(TORCHVISION_MODELS) >= 80 and set(TORCHVISION_MODELS) <= registered
    assert {get_arch(name).family for name in TORCHVISION_MODELS} == {"torchvision"}


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_state_dict_loads_and_runs(name: str, tmp_path: Path) -> None:
    if published_params(name) > LIGHT_PARAMS:
        check_meta_contract(name, tmp_path)
    else:
        check_full_contract(name, tmp_path, export=name in EXPORTED_BY_DEFAULT)


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="opt-in: set DFKD_HEAVY_TESTS=1 (every model built and exported for real)")
@pytest.mark.parametrize("name", [name for name in TORCHVISION_MODELS if name not in EXPORTED_BY_DEFAULT])
def test_full_contract_with_onnx_export(name: str, tmp_path: Path) -> None:
    check_full_contract(name, tmp_path, export=True)


def _accepts(model: nn.Module, side: int) -> bool:
    try:
        return model(torch.empty(1, 3, side, side, device="meta")).shape == (1, NUM_CLASSES)
    except (RuntimeError, ValueError, AssertionError):
        return False


@pytest.mark.parametrize("name", [*SMALLEST_SIDE, "vit_b_16"])
def test_the_tested_side_is_the_smallest_the_model_takes(name: str) -> None:
    model = meta_model(name)
    assert _accepts(model, smallest_side(name)) and not _accepts(model, smallest_side(name) - 1)


# --- module versions: torchvision's MNASNet cannot load weights without them --------------------


def test_module_versions_survive_nesting_and_the_dataparallel_prefix(tmp_path: Path) -> None:
    wrapped = nn.DataParallel(torchvision.models.mnasnet0_5(num_classes=NUM_CLASSES))
    torch.save({"epoch": 3, "state_dict": wrapped.state_dict()}, tmp_path / "m.pt")
    state = read_state_dict(tmp_path / "m.pt")
    assert next(iter(state)) == "layers.0.weight"
    assert {module: entry["version"] for module, entry in state._metadata.items()} == module_versions(wrapped.module)


def test_safetensors_mnasnet_loads_as_the_current_format(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = calibrated_teacher("mnasnet0_5", (3, 32, 32))
    save_file(model.state_dict(), tmp_path / "m.safetensors")  # a safetensors file records no versions
    teacher = load_teacher(tmp_path / "m.safetensors", "mnasnet0_5", input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(x), model(x))


class _VersionedLinear(nn.Linear):
    """A module in format version 3 that records the version each load hands it."""

    _version = 3

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: dict, *args: Any) -> None:
        self.loaded_version = local_metadata.get("version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_a_recorded_version_is_kept_and_a_missing_one_is_the_current(tmp_path: Path) -> None:
    model = nn.Sequential(_VersionedLinear(2, 2), _VersionedLinear(2, 2))
    state = model.state_dict()
    state._metadata["0"]["version"] = 1  # written by an older release of the module
    del state._metadata["1"]
    torch.save(state, tmp_path / "m.pt")
    model.load_state_dict(with_module_versions(model, read_state_dict(tmp_path / "m.pt")))
    assert (model[0].loaded_version, model[1].loaded_version) == (1, 3)


def test_mnasnet_student_snapshots_and_saved_file_reload(tmp_path: Path) -> None:
    from dfkd_cli.config import TrainConfig
    from dfkd_cli.export import StudentMeta, load_student, save_student
    from dfkd_cli.trainer import StudentTrainer, predict_classes

    teacher = calibrated_teacher("shufflenet_v2_x0_5", (3, 32, 32))
    student = calibrated_teacher("mnasnet0_5", (3, 32, 32))
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=1), torch.device("cpu"))
    trainer.snapshot()
    x = torch.randn(4, 3, 32, 32)
    assert 0.0 <= trainer.select_snapshot(x, predict_classes(teacher, x)) <= 1.0
    meta = StudentMeta("mnasnet0_5", NUM_CLASSES, (3, 32, 32), (0.5,) * 3, (0.25,) * 3,
                       [str(i) for i in range(NUM_CLASSES)], "noise", "shufflenet_v2_x0_5", "0" * 64, "0")
    save_student(trainer.restore_best(), meta, tmp_path / "student.safetensors")
    loaded, _ = load_student(tmp_path / "student.safetensors")
    saved = student.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())


# --- the cost of a large teacher ----------------------------------------------------------------


def test_the_largest_regnet_is_probed_without_building_it() -> None:
    from dfkd_cli.archs import arch_has_bn

    assert arch_has_bn("regnet_y_128gf")  # torch.device("meta") cannot build RegNet: it raised here
    assert param_shapes("regnet_y_128gf", NUM_CLASSES, 3)["fc.weight"] == (NUM_CLASSES, 7392)


class _CountedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("budget_s, calls", [(60.0, 3 + 20), (0.0, 1 + 3)])
def test_latency_of_a_slow_model_is_timed_within_the_budget(monkeypatch: pytest.MonkeyPatch, budget_s: float,
                                                           calls: int) -> None:
    from dfkd_cli import evaluate

    monkeypatch.setattr(evaluate, "LATENCY_BUDGET_S", budget_s)  # 0: every pass counts as slow
    model = _CountedForward()
    assert evaluate.torch_latency_ms(model, (1, 2, 2), warmup=3, iters=20) > 0
    assert model.calls == calls
