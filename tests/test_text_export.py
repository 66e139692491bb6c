"""The text student's outputs: Hugging Face folder, self-describing safetensors, and ONNX behind a parity gate."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dfkd_cli.errors import DfkdError, ExportError
from dfkd_cli.text import export as text_export
from dfkd_cli.text.export import (
    export_text_onnx,
    onnx_text_predict,
    quiet_transformers,
    save_text_student,
)
from dfkd_cli.text.load import load_text_student
from textkit import toy_corpus

META = {
    "class_names": ["negative", "positive"],
    "recipe": "text-kd",
    "teacher": "bert-toy",
    "teacher_sha256": "ab" * 32,
    "version": "0.1.0",
    "max_length": 32,
}
# Short, long and much-longer-than-max_length texts, so padding, the mask and truncation all matter.
LONG = "the movie was really very good and the plot was superb and the acting was lovely and happy " * 6
TEXTS = ["good", "bad", "the film was awful", "a really great story about music", LONG,
         "this sports news was boring and sad", "lovely", "it is the latest review of the plot and it was terrible"]


@pytest.fixture(scope="module")
def bert(bert_teacher_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny trained BERT teacher (as the student), its tokenizer, and a run folder it was saved to."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    folder = bert_teacher_folder
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    run_dir = tmp_path_factory.mktemp("run")
    sizes = save_text_student(model, tokenizer, META, run_dir)
    return {"folder": folder, "model": model, "tokenizer": tokenizer, "run": run_dir, "sizes": sizes}


@pytest.fixture(scope="module")
def onnx_export(bert: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("onnx") / "student.onnx"
    check_texts = [text for text, _ in toy_corpus(12, seed=7)]
    parity = export_text_onnx(bert["model"], bert["tokenizer"], path, check_texts, max_length=META["max_length"])
    return {"path": path, "parity": parity}


def logits(model, tokenizer, texts: list[str], max_length: int = 64) -> torch.Tensor:
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return model(**encoded).logits


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message, message
    return message


# ------------------------------------------------------------------------------------------ save / load


def test_save_writes_hf_folder_and_file_with_sizes(bert: dict) -> None:
    run = bert["run"]
    folder, file = run / "student", run / "student.safetensors"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")), "no pickles"
    assert bert["sizes"]["student.safetensors"] == file.stat().st_size
    assert bert["sizes"]["student_dir"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert sorted(p.name for p in run.iterdir()) == ["student", "student.safetensors"], "no temp files left"


def test_hf_folder_reloads_with_plain_transformers_and_identical_logits(bert: dict) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = bert["run"] / "student"
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert torch.equal(logits(model, tokenizer, TEXTS), logits(bert["model"], bert["tokenizer"], TEXTS))


@pytest.mark.parametrize("where", ["run", "run/student", "run/student.safetensors"])
def test_load_text_student_from_each_form(bert: dict, where: str) -> None:
    path = bert["run"] / where.removeprefix("run").lstrip("/")
    model, tokenizer, meta = load_text_student(path)
    assert not model.training
    assert torch.equal(logits(model, tokenizer, TEXTS), logits(bert["model"], bert["tokenizer"], TEXTS))
    assert meta == {**META, "family": "text"}


def test_safetensors_metadata_round_trip(bert: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(bert["run"] / "student.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    assert metadata["dfkd.family"] == "text"
    config = json.loads(metadata["dfkd.config"])
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 2
    assert {int(k): v for k, v in config["id2label"].items()} == {0: "negative", 1: "positive"}
    for key, value in META.items():
        assert json.loads(metadata[f"dfkd.{key}"]) == value
    assert keys == set(bert["model"].state_dict())


def test_rebuild_from_safetensors_alone_with_sibling_tokenizer(bert: dict, tmp_path: Path) -> None:
    # Only tokenizer files next to the file: the weights and config must come from student.safetensors.
    shutil.copy(bert["run"] / "student.safetensors", tmp_path / "student.safetensors")
    (tmp_path / "student").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bert["run"] / "student" / name).is_file():
            shutil.copy(bert["run"] / "student" / name, tmp_path / "student" / name)
    assert not (tmp_path / "student" / "model.safetensors").exists()
    model, tokenizer, meta = load_text_student(tmp_path / "student.safetensors")
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert torch.equal(logits(model, tokenizer, TEXTS), logits(bert["model"], bert["tokenizer"], TEXTS))
    assert meta["class_names"] == META["class_names"] and meta["max_length"] == META["max_length"]


def test_safetensors_without_sibling_tokenizer_is_refused(bert: dict, tmp_path: Path) -> None:
    shutil.copy(bert["run"] / "student.safetensors", tmp_path / "student.safetensors")
    with pytest.raises(DfkdError) as error:
        load_text_student(tmp_path / "student.safetensors")
    assert "student/" in one_line(error)


def test_plain_hf_folder_takes_class_names_from_id2label(bert: dict) -> None:
    _, _, meta = load_text_student(bert["folder"])
    assert meta == {"class_names": ["negative", "positive"]}


def test_shared_weights_are_saved_and_reload(bert: dict, tmp_path: Path) -> None:
    model = copy.deepcopy(bert["model"])
    layers = model.bert.encoder.layer
    layers[1].attention.self.query.weight = layers[0].attention.self.query.weight  # one tensor, two names
    save_text_student(model, bert["tokenizer"], META, tmp_path)
    expected = logits(model, bert["tokenizer"], TEXTS)
    for path in (tmp_path / "student", tmp_path / "student.safetensors"):
        reloaded, tokenizer, _ = load_text_student(path)
        assert torch.equal(logits(reloaded, tokenizer, TEXTS), expected)


def test_save_and_load_are_quiet(bert: dict, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    import transformers

    transformers.utils.logging.enable_progress_bar()  # as a fresh process has it: the functions must quieten it
    transformers.utils.logging.set_verbosity_warning()
    capfd.readouterr()
    save_text_student(bert["model"], bert["tokenizer"], META, tmp_path)
    load_text_student(tmp_path)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_save_replaces_an_earlier_student(bert: dict, tmp_path: Path) -> None:
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "stale.txt").write_text("old")
    save_text_student(bert["model"], bert["tokenizer"], META, tmp_path)
    assert not (tmp_path / "student" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------ refusals


def write_config(folder: Path, **extra: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForSequenceClassification"], **extra}))


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DfkdError) as error:
        load_text_student(tmp_path / "nope")
    assert "not found" in one_line(error)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(DfkdError) as error:
        load_text_student(tmp_path)
    assert "config.json" in one_line(error)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(DfkdError) as error:
        load_text_student(tmp_path)
    message = one_line(error)
    assert "pickle" in message and "safetensors" in message


def test_pickle_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "student.pt").write_bytes(b"\x80\x04")
    with pytest.raises(DfkdError) as error:
        load_text_student(tmp_path / "student.pt")
    assert "pickle" in one_line(error)


def test_remote_code_config_is_refused(bert: dict, tmp_path: Path) -> None:
    folder = tmp_path / "student"
    shutil.copytree(bert["run"] / "student", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DfkdError) as error:
        load_text_student(folder)
    assert "auto_map" in one_line(error)


def test_non_dfkd_safetensors_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "student.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DfkdError) as error:
        load_text_student(tmp_path / "student.safetensors")
    assert "text student" in one_line(error)


# ------------------------------------------------------------------------------------------ ONNX


def test_onnx_parity_report(onnx_export: dict) -> None:
    parity = onnx_export["parity"]
    assert onnx_export["path"].is_file()
    assert parity["batch_sizes"] == [1, 3, 8]
    assert parity["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert parity["max_abs_diff"] <= 1e-3 and parity["top1_agreement"] == 1.0
    assert parity["opset"] >= 18
    lengths = parity["lengths"]
    assert len(lengths) >= 3 and max(lengths) == META["max_length"], "short, long and truncated lengths"
    assert not list(onnx_export["path"].parent.glob(".*")), "no temp file left"


def test_onnx_graph_inputs_are_named_int64_with_symbolic_batch_and_sequence(onnx_export: dict) -> None:
    import onnx

    graph = onnx.load(str(onnx_export["path"])).graph
    assert [value.name for value in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for value in graph.input:
        tensor = value.type.tensor_type
        assert tensor.elem_type == onnx.TensorProto.INT64
        dims = tensor.shape.dim
        assert len(dims) == 2 and all(d.HasField("dim_param") for d in dims), value
    batch_names = {value.type.tensor_type.shape.dim[0].dim_param for value in graph.input}
    sequence_names = {value.type.tensor_type.shape.dim[1].dim_param for value in graph.input}
    assert len(batch_names) == 1 and len(sequence_names) == 1 and batch_names != sequence_names
    assert [value.name for value in graph.output] == ["logits"]
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param in batch_names and out_dims[1].dim_value == 2


def test_onnx_predict_matches_pytorch_on_padded_mixed_batches(bert: dict, onnx_export: dict) -> None:
    texts = TEXTS * 2
    actual = onnx_text_predict(onnx_export["path"], bert["tokenizer"], texts, max_length=META["max_length"], batch_size=3)
    # PyTorch one text at a time: no padding at all, so the ONNX batches' padding must not change anything.
    expected = np.concatenate([logits(bert["model"], bert["tokenizer"], [t], META["max_length"]).numpy() for t in texts])
    assert actual.shape == (len(texts), 2) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    assert (actual.argmax(1) == expected.argmax(1)).all()
    session = text_export.onnx_session(onnx_export["path"])
    assert onnx_text_predict(session, bert["tokenizer"], [], max_length=16).shape[0] == 0


def test_failed_parity_raises_and_leaves_no_file(bert: dict, onnx_export: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The "exported" graph is the original model's, while PyTorch runs a changed one: parity must fail.
    def fake_exporter(model, tokenizer, path, names, texts, max_length):
        shutil.copy(onnx_export["path"], path)
        return 18

    monkeypatch.setattr(text_export, "_run_text_exporter", fake_exporter)
    changed = copy.deepcopy(bert["model"])
    with torch.no_grad():
        changed.classifier.bias += torch.tensor([5.0, -5.0])
    target = tmp_path / "student.onnx"
    with pytest.raises(ExportError) as error:
        export_text_onnx(changed, bert["tokenizer"], target, TEXTS, max_length=META["max_length"])
    assert "parity" in one_line(error)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_distilbert_exports_without_token_type_ids_quietly(bert: dict, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(bert["tokenizer"]), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              max_position_embeddings=40, num_labels=3, initializer_range=0.5)
    model = DistilBertForSequenceClassification(config).eval()
    capfd.readouterr()
    parity = export_text_onnx(model, bert["tokenizer"], tmp_path / "d.onnx", TEXTS, max_length=128)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert parity["inputs"] == ["input_ids", "attention_mask"]
    assert max(parity["lengths"]) == 40, "max_length is capped at the model's positions"
    logits_onnx = onnx_text_predict(tmp_path / "d.onnx", bert["tokenizer"], TEXTS, max_length=40)
    expected = np.concatenate([logits(model, bert["tokenizer"], [t], 40).numpy() for t in TEXTS])
    np.testing.assert_allclose(logits_onnx, expected, atol=1e-4)
