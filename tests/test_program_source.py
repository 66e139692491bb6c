"""torch.export programs (.pt2) as teachers: the session's tiny trained resnet8 exported with a
dynamic batch, plus small hand-made programs; every file is built inside the test."""

from __future__ import annotations

import copy
import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import kit
from dfkd_cli.program import ProgramBatchNorm1d, ProgramBatchNorm2d, load_program_teacher, program_has_bn
from dfkd_cli.precision import channels_last
from dfkd_cli.sources import teacher_has_bn
from dfkd_cli.synth.losses import BatchNormStatistics

MARKER = "PWNED"
DYNAMIC = 'dynamic_shapes=({0: torch.export.Dim("batch")},)'
TEACHER_ARGS = ["--mean", "0.5", "--std", "0.5"]  # the tiny teacher's training normalisation (conftest)


@torch.library.custom_op("dfkdtest::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class SmallNet(nn.Module):
    """conv -> BatchNorm2d -> view -> linear -> BatchNorm1d -> linear; options for the refused kinds."""

    def __init__(self, bn: bool = True, custom_op: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc1 = nn.Linear(4 * 8 * 8, 8)
        self.bn1 = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.fc = nn.Linear(8, 3)
        self.custom_op = custom_op
        for module in self.modules():  # statistics that are not the identity, so a wrong BatchNorm shows
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        h = h.view(h.size(0), -1)  # a view: fails on channels_last activations
        h = _twice(h) if self.custom_op else h
        return self.fc(torch.relu(self.bn1(self.fc1(h))))


def export(model: nn.Module, path: Path, shape: tuple[int, ...], dynamic: bool = True, decompose: bool = False) -> Path:
    x = torch.randn(2, *shape)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
    torch.export.save(program.run_decompositions() if decompose else program, path)
    return path


def rewrite(source: Path, target: Path, edits: dict[str, Callable[[bytes], bytes]]) -> Path:
    """A copy of the archive with the entries ending in each key of ``edits`` passed through it."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = old.read(name)
            for suffix, edit in edits.items():
                data = edit(data) if name.endswith(suffix) else data
            new.writestr(name, data)
    return target


@pytest.fixture(scope="module")
def programs(tiny_teacher, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("programs")
    torch.manual_seed(0)
    teacher = copy.deepcopy(tiny_teacher["model"]).eval()
    return {
        "net": export(teacher, root / "net.pt2", (1, 16, 16)),
        "fixed": export(teacher, root / "fixed.pt2", (1, 16, 16), dynamic=False),
        "core": export(SmallNet().eval(), root / "core.pt2", (3, 16, 16), decompose=True),
        "nobn": export(SmallNet(bn=False).eval(), root / "nobn.pt2", (3, 16, 16)),
        "training": export(SmallNet().train(), root / "training.pt2", (3, 16, 16)),
        "custom": export(SmallNet(custom_op=True).eval(), root / "custom.pt2", (3, 16, 16)),
    }


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels_last strides even for one channel (as a channels_last generator's output
    has them; ``x.contiguous(memory_format=torch.channels_last)`` leaves a 1-channel batch as it is)."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_the_program_teacher_is_the_model_with_its_batchnorm_as_modules(programs, tiny_teacher):
    model = tiny_teacher["model"]
    teacher = load_program_teacher(programs["net"], None, None, [0.5], [0.5], None)
    assert (teacher.arch, teacher.num_classes, teacher.input_shape) == ("program:net", 4, (1, 16, 16))
    assert teacher.source == {"kind": "program", "sha256": teacher.sha256} and teacher.default_student == "resnet8"
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert teacher.bn_layers == list(originals) and program_has_bn(programs["net"]) and teacher.classifier == "fc"
    for name in originals:  # the program's own tensors, not copies
        assert torch.equal(teacher.model.get_submodule(name).running_var, originals[name].running_var)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert (teacher.model(x) - expected).abs().max() < 1e-5
    with torch.inference_mode():
        assert teacher.model(x[:1]).shape == (1, 4)
    channels_last(teacher.model)  # what the pipeline does, then channels_last inputs as the trainer feeds
    teacher.model.train()  # the program is eval-only: its BatchNorm stays in eval mode
    assert not any(m.training for m in teacher.model.modules() if isinstance(m, ProgramBatchNorm2d))
    pixels = nhwc(x).requires_grad_(True)
    out = teacher.model.eval()(pixels)
    assert (out - expected).abs().max() < 1e-5
    out.sum().backward()  # synthesis backpropagates through the teacher into the images
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_core_aten_batchnorm_and_linear_become_modules_the_recipes_hook(programs):
    teacher = load_program_teacher(programs["core"], None, None, None, None, None)
    types = {name: type(teacher.model.get_submodule(name)) for name in teacher.bn_layers}
    assert types == {"bn": ProgramBatchNorm2d, "bn1": ProgramBatchNorm1d} and teacher.classifier == "fc"
    assert isinstance(teacher.model.get_submodule("fc"), nn.Linear)
    reference = torch.export.load(programs["core"]).module()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert (teacher.model(nhwc(x)) - reference(x)).abs().max() < 1e-5
    pixels = x.clone().requires_grad_(True)
    with BatchNormStatistics(teacher.model) as statistics:
        teacher.model(pixels)
    assert len(statistics.layer_losses) == 2  # the DeepInversion hooks fire on both BatchNorm layers
    sum(statistics.layer_losses).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert "ASSUMED" in teacher.stats_note and "--mean" in teacher.stats_note
    assert teacher.mean == pytest.approx((0.485, 0.456, 0.406))  # ImageNet's


def test_compress_eval_and_inspect_through_the_cli(programs, tiny_teacher, tmp_path):
    teacher = {"path": programs["net"], "args": TEACHER_ARGS}
    out = tmp_path / "run"
    report = kit.report_of(kit.cli(*kit.compress_args(teacher, out, "noise", 2, *kit.train(), *kit.synth(batch_size=16))))
    assert report["teacher"]["arch"] == "program:net"
    evaluated = kit.report_of(kit.cli("eval", out / "student.safetensors", "--teacher", programs["net"],
                                      "--eval-data", tiny_teacher["eval"], "--format", "json"))
    # The program is the trained teacher: same accuracy on the real data as the model it came from.
    assert evaluated["eval_data"]["teacher_accuracy"] == pytest.approx(tiny_teacher["accuracy"], abs=1e-6)
    assert evaluated["teacher"]["arch"] == "program:net" and not evaluated["warnings"]
    info = kit.report_of(kit.cli("inspect", programs["net"], "--format", "json"))
    assert (info["arch"], info["num_classes"], info["input_shape"], info["has_bn"]) == ("program:net", 4, [1, 16, 16], True)
    assert info["source"]["kind"] == "program" and "deepinversion" in info["recipes"]


def test_a_batchnorm_recipe_runs_on_a_program(programs, tmp_path):
    teacher = {"path": programs["net"], "args": TEACHER_ARGS}
    report = kit.report_of(kit.cli(*kit.compress_args(
        teacher, tmp_path / "di", "deepinversion", 2, *kit.train(),
        *kit.overrides("synth.iterations=2", "synth.batch_size=8", "synth.jitter=0", "synth.flip=false"))))
    assert report["teacher"]["has_bn"] is True


def test_a_fixed_batch_program_is_refused_with_how_to_export_it(programs, tmp_path):
    out = tmp_path / "never"
    assert_one_line_error(kit.cli("inspect", programs["fixed"]), "fixed batch size of 2", DYNAMIC)
    assert_one_line_error(kit.cli(*kit.compress_args({"path": programs["fixed"], "args": []}, out, "noise", 2)), DYNAMIC)
    assert not out.exists()


def _expression_payload(data: bytes) -> bytes:
    text = data.decode()
    first = re.search(r'"expr_str": "([^"]*)"', text)
    assert first is not None
    evil = first.group(1) + " if __import__('os').system('touch MARKER') == 0 else 0"
    return text.replace(first.group(0), json.dumps({"expr_str": evil})[1:-1], 1).encode()


def _pickled_weight(data: bytes) -> bytes:
    """Mark the first weight as pickled (torch would then torch.load it with weights_only=False)."""
    config = json.loads(data)
    next(iter(config["config"].values()))["use_pickle"] = True
    return json.dumps(config).encode()


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _exploit_bytes(marker: Path) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        import io

        buffer = io.BytesIO()
        torch.save((_Exploit(marker),), buffer)
        return buffer.getvalue()

    return edit


@pytest.mark.parametrize("case", ["expression", "pickled-weight", "example-inputs", "name", "aoti", "custom-op",
                                  "training", "random", "truncated", "state-dict", "empty", "missing"])
def test_bad_or_malicious_programs_are_refused_in_one_line(case, programs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the payloads write MARKER in the working folder
    marker = tmp_path / MARKER
    net, path = programs["net"], tmp_path / f"{case}.pt2"
    expected = {"expression": "grammar", "pickled-weight": "pickled", "example-inputs": "example inputs",
                "name": "not a Python identifier", "aoti": "AOTInductor", "custom-op": "custom operator dfkdtest::twice",
                "training": "model.eval()", "random": "zip", "truncated": "zip", "state-dict": "does not read as plain data",
                "empty": "zip", "missing": "not found"}[case]
    if case == "expression":
        rewrite(net, path, {"models/model.json": _expression_payload})
    elif case == "pickled-weight":
        rewrite(net, path, {"model_weights_config.json": _pickled_weight, "weights/weight_0": _exploit_bytes(marker)})
    elif case == "example-inputs":
        rewrite(net, path, {"sample_inputs/model.pt": _exploit_bytes(marker)})
    elif case == "name":
        rewrite(net, path, {"models/model.json": lambda d: d.replace(b'"name": "x"', b'"name": "x=1;y"', 1)})
    elif case == "aoti":
        rewrite(net, path, {})
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("net/data/aotinductor/model/model.so", b"\x7fELF")
    elif case in ("custom-op", "training"):
        path = programs["custom" if case == "custom-op" else "training"]
    elif case in ("random", "truncated", "empty"):
        data = {"random": bytes(range(256)) * 8, "truncated": net.read_bytes()[:3000], "empty": b""}[case]
        path.write_bytes(data)
    elif case == "state-dict":
        torch.save({"w": torch.zeros(2)}, path)
    assert_one_line_error(kit.cli("inspect", path), expected)
    assert not marker.exists()


def test_guard_code_in_a_program_is_never_run(programs, tmp_path, monkeypatch):
    """ExportedProgram.module() would exec the file's guards_code on each call; dfkd asks for no guards."""
    monkeypatch.chdir(tmp_path)

    def add_guard(data: bytes) -> bytes:
        program = json.loads(data)
        program["guards_code"] = ["__import__('os').system('touch PWNED') == 0 or True"]
        return json.dumps(program).encode()

    path = rewrite(programs["net"], tmp_path / "guarded.pt2", {"models/model.json": add_guard})
    teacher = load_program_teacher(path, None, None, None, None, None)
    teacher.model(torch.randn(3, 1, 16, 16))
    assert teacher.num_classes == 4 and not (tmp_path / MARKER).exists()


class MakesTensors(nn.Module):
    """Creates tensors in forward: export records the CPU as their device."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).amax((2, 3))
        return self.fc(h + torch.arange(4, device=x.device) + torch.zeros(h.shape[0], 1, device=x.device))


def test_tensors_made_inside_the_program_follow_the_teacher_to_its_device(tmp_path):
    model = MakesTensors().eval()
    teacher = load_program_teacher(export(model, tmp_path / "makes.pt2", (3, 8, 8)), None, None, None, None, None)
    x = torch.randn(3, 3, 8, 8)
    assert (teacher.model(x) - model(x)).abs().max() < 1e-5
    teacher.to("meta")  # stands in for a GPU: the recorded CPU device would clash with it
    assert teacher.model(x.to("meta")).device.type == "meta"


def test_without_batchnorm_the_batchnorm_recipes_are_refused(programs, tmp_path):
    assert not teacher_has_bn(programs["nobn"], None)
    result = kit.cli(*kit.compress_args({"path": programs["nobn"], "args": []}, tmp_path / "x", "deepinversion", 2))
    assert_one_line_error(result, "needs a teacher with BatchNorm layers")


def test_input_shape_must_fit_the_program(programs):
    assert_one_line_error(kit.cli("inspect", programs["net"], "--input-shape", "3x16x16"), "3 channels", "1x16x16")
    assert_one_line_error(kit.cli("inspect", programs["net"], "--input-shape", "1x32x32"), "32 height")
