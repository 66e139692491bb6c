"""Hugging Face image classifier folders as teachers and students, through the CLI: tiny ViT and
ResNet models built here (nothing downloaded), their processor configs, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kit
from dfkd_cli.export import load_student
from dfkd_cli.hf_image import config_has_bn
from dfkd_cli.hf_student import shrink_config
from dfkd_cli.text.export import quiet_transformers

LABELS = {0: "cat", 1: "dog", 2: "bird"}
STATS = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.25, 0.2, 0.3]}
SMALL_RUN = (*kit.train(holdout=8, batch_size=8, eval_every=1), *kit.synth(batch_size=8))


def _labelled(config_class: type, **values: object) -> object:
    return config_class(num_labels=3, id2label=LABELS, label2id={name: i for i, name in LABELS.items()}, **values)


def _processor(folder: Path, **values: object) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(values), encoding="utf-8")


def _vit_config() -> object:
    from transformers import ViTConfig

    return _labelled(ViTConfig, image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny classifiers with processor configs at 32x32: ``vit`` (RGB, STATS) and ``resnet``
    (one channel); and a ViT config alone (``vit_config``, a student's shape)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTForImageClassification

    quiet_transformers()  # no "Writing model shards" bars
    root = tmp_path_factory.mktemp("hf-image")
    torch.manual_seed(0)
    ViTForImageClassification(_vit_config()).save_pretrained(root / "vit")
    resnet = ResNetForImageClassification(_labelled(ResNetConfig, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    num_channels=1))
    resnet.save_pretrained(root / "resnet")
    size = {"do_resize": True, "size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255}
    _processor(root / "vit", **size, do_normalize=True, **STATS)
    _processor(root / "resnet", **size, do_normalize=True, image_mean=[0.5], image_std=[0.25])
    _vit_config().save_pretrained(root / "vit_config")
    return {"vit": root / "vit", "resnet": root / "resnet", "vit_config": root / "vit_config"}


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _inspect(folder: Path, *extra: object) -> dict:
    return kit.report_of(kit.cli("inspect", folder, "--format", "json", *extra))


def _refused(result: object, *words: str) -> str:
    """The one-line error of a refused command (exit 2, no traceback) after checking it names ``words``."""
    assert result.exit_code == 2, (result.stdout, result.exception)
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_inspect_reads_classes_shape_and_normalisation_from_the_folder(folders):
    info = _inspect(folders["vit"])
    assert info["arch"] == "hf:vit" and info["source"]["kind"] == "hf-image"
    assert info["class_names"] == ["cat", "dog", "bird"] and info["num_classes"] == 3
    assert info["input_shape"] == [3, 32, 32]
    assert info["mean"] == pytest.approx(STATS["image_mean"]) and info["std"] == pytest.approx(STATS["image_std"])
    assert info["has_bn"] is False and "deepinversion" not in info["recipes"] and "dfad" in info["recipes"]
    assert info["default_student"] == "hf:small"
    resnet = _inspect(folders["resnet"])
    assert resnet["has_bn"] is True and "deepinversion" in resnet["recipes"] and resnet["input_shape"] == [1, 32, 32]


def test_processor_crop_and_rescale_are_read_as_the_model_sees_them(folders, tmp_path):
    folder = _copy(folders["resnet"], tmp_path)  # a ResNet takes any size: 24x20 after a crop
    _processor(folder, size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 24, "width": 20},
               do_rescale=False, image_mean=[127.5], image_std=[51.0])
    info = _inspect(folder)
    assert info["input_shape"] == [1, 24, 20]
    assert info["mean"] == pytest.approx([0.5]) and info["std"] == pytest.approx([0.2])  # x/255: pixels in [0, 1]
    assert _inspect(folder, "--input-shape", "1x16x16", "--normalize", "mnist")["input_shape"] == [1, 16, 16]


def test_folder_without_processor_config_uses_stated_defaults(folders, tmp_path):
    folder = _copy(folders["vit"], tmp_path)
    (folder / "preprocessor_config.json").unlink()
    plan = kit.report_of(kit.cli("compress", folder, "--recipe", "noise", "--steps", 1, "--out", tmp_path / "run",
                                 "--dry-run", *SMALL_RUN, *kit.CPU_JSON))
    assert plan["input_shape"] == [3, 32, 32]  # config.json image_size
    assert plan["input_shape_from"].startswith("no preprocessor_config.json: 32x32 pixels from config.json image_size")
    assert plan["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert plan["normalisation_from"].startswith("no preprocessor_config.json: ImageNet statistics")
    assert not (tmp_path / "run").exists()


def test_batchnorm_recipe_on_a_vit_is_refused_with_the_reason(folders, tmp_path):
    out = tmp_path / "run"
    result = kit.cli("compress", folders["vit"], "--recipe", "deepinversion", "--steps", 1, "--out", out, *kit.CPU_JSON)
    _refused(result, "deepinversion", "BatchNorm", "hf:vit")
    assert not out.exists()


def test_auto_map_config_is_refused(folders, tmp_path):
    folder = _copy(folders["vit"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForImageClassification": "m.Net"}}))
    _refused(kit.cli("inspect", folder), "auto_map", "custom code")
    _refused(kit.cli("compress", folder, "--steps", 1, "--out", tmp_path / "run", *kit.CPU_JSON), "auto_map")
    assert not (tmp_path / "run").exists()


def test_pickled_weights_need_trust_pickle(folders, tmp_path):
    folder = _copy(folders["resnet"], tmp_path)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    _refused(kit.cli("inspect", folder), "pickled", "--trust-pickle")
    assert _inspect(folder, "--trust-pickle")["params"] == _inspect(folders["resnet"])["params"]


def test_weights_missing_from_the_folder_are_refused(folders, tmp_path):
    from safetensors.torch import save_file

    folder = _copy(folders["vit"], tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["classifier.weight"]  # transformers would fill it at random
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _refused(kit.cli("inspect", folder), "lacks weights", "classifier.weight")


def test_wrong_input_size_arch_and_student_are_refused(folders, tmp_path):
    _refused(kit.cli("inspect", folders["vit"], "--input-shape", "3x64x64"), "cannot run on 3x64x64")
    _refused(kit.cli("inspect", folders["vit"], "--input-shape", "1x32x32"), "num_channels", "3x32x32")
    _refused(kit.cli("inspect", folders["vit"], "--arch", "resnet8"), "leave out --arch")
    out = tmp_path / "run"
    _refused(kit.cli("compress", folders["vit"], "--student", "hf:big", "--recipe", "noise", "--out", out, *kit.CPU_JSON),
             "hf:small")
    checkpoint = tmp_path / "resnet8.pt"
    torch.save(kit.random_teacher("resnet8", 3, (3, 32, 32)).state_dict(), checkpoint)
    _refused(kit.cli("compress", checkpoint, "--arch", "resnet8", "--student", "hf:small", "--recipe", "noise",
                     "--out", out, *kit.CPU_JSON), "Hugging Face image teacher", "resnet8 is not one")
    assert not out.exists()


def test_small_student_config_is_halved_and_batchnorm_is_read_from_configs(folders):
    config = json.loads((folders["vit"] / "config.json").read_text())
    small = shrink_config(config)
    assert (small["num_hidden_layers"], small["hidden_size"], small["intermediate_size"]) == (1, 16, 32)
    assert small["hidden_size"] % small["num_attention_heads"] == 0
    assert shrink_config({**config, "hidden_size": 36, "num_attention_heads": 4})["num_attention_heads"] == 2  # 18 / 2
    assert config_has_bn(json.loads((folders["resnet"] / "config.json").read_text())) is True
    assert config_has_bn(config) is False


@pytest.mark.slow
@pytest.mark.export
def test_vit_teacher_compresses_exports_a_hf_student_and_evaluates(folders, tmp_path):
    from transformers import AutoModelForImageClassification

    out = tmp_path / "run"
    report = kit.report_of(kit.cli("compress", folders["vit"], "--recipe", "noise", "--steps", 1, "--out", out,
                                   *SMALL_RUN, *kit.CPU_JSON))
    assert report["student"]["arch"] == "hf:small" and report["teacher"]["arch"] == "hf:vit"
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["onnx_parity"]["top1_agreement"] == 1.0 and (out / "student.onnx").is_file()
    student, meta = load_student(out / "student.safetensors")
    assert meta.arch_source["kind"] == "hf-image" and meta.class_names == ["cat", "dog", "bird"]
    assert meta.mean == pytest.approx(STATS["image_mean"]) and meta.input_shape == (3, 32, 32)
    hf = AutoModelForImageClassification.from_pretrained(out / "student_hf", local_files_only=True).eval()
    assert hf.config.num_hidden_layers == 1 and hf.config.id2label == LABELS
    processor = json.loads((out / "student_hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32} and processor["image_mean"] == pytest.approx(STATS["image_mean"])
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).logits, student(x), atol=1e-6)
    assert "student_hf" in json.loads((out / ".dfkd-run").read_text())["entries"]

    eval_npz = tmp_path / "eval.npz"
    pixels = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(eval_npz, x=pixels, y=np.arange(12) % 3)
    evaluated = kit.report_of(kit.cli("eval", out / "student.safetensors", "--teacher", folders["vit"],
                                      "--eval-data", eval_npz, "--onnx", out / "student.onnx", "--format", "json"))
    teacher = AutoModelForImageClassification.from_pretrained(folders["vit"], local_files_only=True).eval()
    normalised = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - torch.tensor(STATS["image_mean"]).view(1, 3, 1, 1)) \
        / torch.tensor(STATS["image_std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        agree = (teacher(pixel_values=normalised).logits.argmax(1) == hf(pixel_values=normalised).logits.argmax(1))
    assert evaluated["eval_data"]["top1_agreement"] == pytest.approx(float(agree.float().mean()))
    assert evaluated["teacher"]["arch"] == "hf:vit" and evaluated["warnings"] == []


@pytest.mark.slow
def test_resnet_teacher_runs_a_batchnorm_recipe_into_a_config_folder_student(folders, tmp_path):
    out = tmp_path / "run"
    report = kit.report_of(kit.cli("compress", folders["resnet"], "--recipe", "deepinversion", "--steps", 1,
                                   "--student", folders["vit_config"], "--out", out, *kit.train(holdout=8, batch_size=8),
                                   *kit.overrides("synth.batch_size=8", "synth.iterations=2"), *kit.CPU_JSON))
    assert report["teacher"]["has_bn"] is True
    student, meta = load_student(out / "student.safetensors")
    assert meta.arch == str(folders["vit_config"]) and meta.arch_source["config"]["model_type"] == "vit"
    assert type(student.hf).__name__ == "ViTForImageClassification" and student.hf.config.num_channels == 1
    assert (out / "student_hf" / "model.safetensors").is_file()
