"""timm's models by name (``timm:NAME``): the registry seam, listing, errors, and a timm teacher and
student end to end (timm's own tiny ``test_*`` models keep each run to seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import timm.models._builder
import torch
from torch import nn

import kit
from dfkd_cli import archs_timm
from dfkd_cli.archs import arch_has_bn, arch_source, classifier_keys, create_model, get_arch, list_archs, param_shapes, stem_keys
from dfkd_cli.errors import DfkdError

TEACHER, STUDENT = "test_resnet", "test_efficientnet"  # timm's smallest BatchNorm CNNs (373k and 100k parameters)


@pytest.fixture
def fresh_spec_cache():
    """Specs are cached per name: clear the cache around a test that changes what timm answers."""
    archs_timm._cached_spec.cache_clear()
    yield
    archs_timm._cached_spec.cache_clear()


def test_timm_names_resolve_to_specs_from_the_pretrained_config() -> None:
    spec = get_arch("TIMM:test_resnet")
    assert (spec.name, spec.family, spec.default_input) == ("timm:test_resnet", "timm", (3, 160, 160))
    assert spec.default_stats == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) and spec.default_normalize == "timm:test_resnet"
    assert arch_source("timm:test_resnet") == {"kind": "timm", "name": "timm:test_resnet"}
    # A pretrained tag picks the config the defaults come from; the architecture stays the same.
    assert get_arch("timm:resnet34").default_stats[0] == (0.485, 0.456, 0.406)
    assert get_arch("timm:resnet34.ra4_e3600_r224_in1k").default_stats[0] == (0.5, 0.5, 0.5)
    tagged = get_arch("timm:resnet18.a3_in1k")
    assert (tagged.name, tagged.default_input) == ("timm:resnet18.a3_in1k", (3, 160, 160))
    assert get_arch("timm:resnet18").default_input == (3, 224, 224)
    assert get_arch("timm:resnet10t").default_input == (3, 176, 176)  # its config's size, not a guess
    assert list(param_shapes("timm:resnet18.a3_in1k")) == list(param_shapes("timm:resnet18"))


def test_timm_parameter_names_and_meta_probes() -> None:
    expected = timm.create_model(TEACHER, pretrained=False, num_classes=3).state_dict()
    assert param_shapes(f"timm:{TEACHER}", 3, 3) == {k: tuple(v.shape) for k, v in expected.items()}
    assert classifier_keys(f"timm:{TEACHER}") == {"fc.weight": 0, "fc.bias": 0}
    assert stem_keys(f"timm:{TEACHER}") == {"conv1.0.weight": 1}
    assert arch_has_bn(f"timm:{TEACHER}") and not arch_has_bn("timm:test_vit")
    gray = create_model(f"timm:{TEACHER}", 5, (1, 32, 32))
    assert gray(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_list_archs_globs_timm_only_when_asked() -> None:
    assert list_archs("timm:resnet1*") == sorted(f"timm:{n}" for n in timm.list_models("resnet1*"))
    assert "timm:resnet10t" in list_archs("timm:resnet1*")
    assert list_archs("timm:resnet18.tv*") == ["timm:resnet18.tv_in1k"]  # a dot matches pretrained tags
    assert len(list_archs("timm:*")) == len(timm.list_models())
    assert not [n for n in list_archs() if n.startswith("timm:")]


def test_builtin_names_never_import_timm(monkeypatch, fresh_spec_cache) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails, as without timm installed
    assert "resnet18" in list_archs() and get_arch("wrn40_2").name == "wrn40_2"
    with pytest.raises(DfkdError, match=r"^timm is not installed; install it with pip install 'timm>=1.0,<2'"):
        get_arch("timm:resnet18")
    with pytest.raises(DfkdError, match=r"unknown architecture 'nosuchnet'; \(list"):  # the timm hint is left out
        get_arch("nosuchnet")


def test_unknown_timm_names_suggest_close_matches() -> None:
    with pytest.raises(DfkdError, match=r"unknown timm model 'resnet10'; did you mean: timm:resnet10t, "):
        get_arch("timm:resnet10")
    with pytest.raises(DfkdError, match=r"no pretrained tag 'bogus'; its tags: a1_in1k, .*tv_in1k"):
        get_arch("timm:resnet18.bogus")
    with pytest.raises(DfkdError, match=r"unknown architecture 'resnet10t'; did you mean: timm:resnet10t, "):
        get_arch("resnet10t")  # a timm model named without the prefix


def test_default_students_are_smaller_timm_models_of_the_family() -> None:
    assert all(timm.is_model(student) for _, student in archs_timm._STUDENT_RULES)
    pairs = {"resnet50d": "timm:resnet18", "resnet18": "timm:resnet10t", "mobilenetv3_large_100": "timm:mobilenetv3_small_050",
             "vit_base_patch16_224": "timm:vit_tiny_patch16_224", "convnext_tiny": "timm:convnext_atto"}
    for teacher, student in pairs.items():
        assert get_arch(f"timm:{teacher}").default_student == student
    for smallest in ("resnet10t", "mobilenetv3_small_050", "convnext_atto", "vit_base_patch16_384", TEACHER):
        assert get_arch(f"timm:{smallest}").default_student is None


def test_a_model_without_pretrained_config_says_what_it_assumed(monkeypatch, fresh_spec_cache) -> None:
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    spec = get_arch("timm:resnet10t")
    assert spec.default_input == (3, 224, 224) and spec.default_stats is None and spec.default_normalize == "imagenet"
    assert spec.description.endswith("input 3x224x224 assumed; ImageNet mean/std assumed; timm has no pretrained config for it)")


def test_timm_models_are_built_without_pretrained_weights(monkeypatch) -> None:
    def no_downloads(*args: object, **kwargs: object) -> None:
        raise AssertionError("timm was asked to load pretrained weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_downloads)
    assert create_model(f"timm:{TEACHER}", 3, (3, 32, 32)).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


# --- end to end: a state dict saved from timm itself, through the CLI ---------------------------


def _calibrated_timm_teacher(path: Path) -> Path:
    """A state dict straight from ``timm.create_model`` (timm's parameter names), its BatchNorm
    statistics set from one random batch so its outputs depend on its input (see kit.random_teacher)."""
    torch.manual_seed(0)
    model = timm.create_model(TEACHER, pretrained=False, num_classes=3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    torch.save(model.eval().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory) -> dict:
    path = _calibrated_timm_teacher(tmp_path_factory.mktemp("timm") / "test_resnet.pth")
    return {"path": path, "args": ["--arch", f"timm:{TEACHER}", "--input-shape", "3x32x32"]}


def test_unknown_timm_arch_on_the_command_line_is_one_line(timm_teacher, tmp_path) -> None:
    result = kit.cli("compress", timm_teacher["path"], "--arch", "timm:test_resnt", "--out", tmp_path / "run")
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: unknown timm model 'test_resnt'; did you mean: timm:test_resnet")
    assert line.endswith("(list them with `dfkd archs 'timm:*'`)")
    assert not (tmp_path / "run").exists()


def test_timm_state_dict_loads_as_a_teacher(timm_teacher) -> None:
    result = kit.cli("inspect", timm_teacher["path"], *timm_teacher["args"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["arch"] == f"timm:{TEACHER}" and info["num_classes"] == 3 and info["input_shape"] == [3, 32, 32]
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]  # test_resnet's pretrained config
    assert info["has_bn"] and info["params"] == 372979


def test_archs_command_lists_timm_models(tmp_path) -> None:
    rows = json.loads(kit.cli("archs", "timm:resnet18*", "--format", "json").stdout)
    assert rows == [{"name": "timm:resnet18", "family": "timm", "default_student": "timm:resnet10t"},
                    {"name": "timm:resnet18d", "family": "timm", "default_student": "timm:resnet10t"}]
    assert "timm:resnet10t" in kit.cli("archs", "timm:resnet1*").stdout
    empty = kit.cli("archs", "timm:nothing-like-this*")
    assert empty.exit_code == 2 and "try `dfkd archs 'timm:*'`" in empty.stderr


@pytest.mark.slow
@pytest.mark.export  # the ONNX export and its parity check are what it is about
def test_timm_teacher_and_student_compress_export_and_eval(timm_teacher, tmp_path) -> None:
    out = tmp_path / "run"
    args = kit.compress_args(timm_teacher, out, "noise", 1, *kit.train(holdout=8, batch_size=8), student=f"timm:{STUDENT}")
    report = kit.report_of(kit.cli(*args))
    assert report["teacher"]["arch"] == f"timm:{TEACHER}" and report["teacher"]["num_classes"] == 3
    assert report["student"]["arch"] == f"timm:{STUDENT}" and (out / "student.onnx").is_file()
    parity = report["onnx_parity"]  # the export gate: 1e-3 absolute for logits up to 1, relative beyond
    assert parity["max_abs_diff"] <= 1e-3 * max(1.0, parity["max_abs_logit"]) and parity["top1_agreement"] == 1.0
    # No --arch: eval rebuilds the student and the teacher from the names the student file records.
    evaluated = kit.report_of(kit.cli("eval", out / "student.safetensors", "--teacher", timm_teacher["path"],
                                      "--format", "json"))
    assert evaluated["teacher"]["arch"] == f"timm:{TEACHER}" and evaluated["student"]["arch"] == f"timm:{STUDENT}"
    timm_student = timm.create_model(STUDENT, pretrained=False, num_classes=3)
    assert evaluated["student"]["params"] == sum(p.numel() for p in timm_student.parameters())
