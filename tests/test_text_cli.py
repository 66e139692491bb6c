"""``dfkd compress`` / ``dfkd eval`` on a Hugging Face text teacher, end to end through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from dfkd_cli.cli import app
from dfkd_cli.measure import DEPLOYMENT_SKIPPED

import kit

runner = CliRunner()
FAST = ["--steps", "6", "-s", "train.eval_every=3", "-s", "train.holdout=32", "-s", "train.steps_per_round=2",
        "--device", "cpu", "--format", "json"]
GENERATE = ["-s", "synth.max_new_tokens=4", "-s", "synth.batch_size=4"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def rl_run(text_files):
    """One promptdfd-rl run, exported to ONNX whichever of its tests comes first."""
    out = text_files["root"] / "runs" / "rl"
    with kit.deployment_checks(True):
        result = run("compress", text_files["bert"], "--recipe", "promptdfd-rl", "--generator", text_files["gpt2"],
                     "--prompter", text_files["gpt2"], "--eval-data", text_files["dev"], "--out", out, *FAST, *GENERATE,
                     "-s", "synth.prompt_length=3")
    assert result.exit_code == 0, (result.stderr, result.exception)
    return out, json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.export
def test_rl_run_writes_a_loadable_student_folder_safetensors_and_onnx(rl_run, text_files) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, report = rl_run
    assert {"student", "student.safetensors", "student.onnx", "report.json", "report.md", "config.toml"} <= {p.name for p in out.iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(out / "student", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "student", local_files_only=True)
    assert model.config.num_hidden_layers == 1 and model.config.id2label == {0: "negative", 1: "positive"}
    assert tokenizer("a good film")["input_ids"][0] == tokenizer.cls_token_id
    with safe_open(str(out / "student.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["dfkd.recipe"]) == "promptdfd-rl" and meta["dfkd.family"] in ('"text"', "text")
    assert report["onnx_parity"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["onnx_parity"]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_rl_report_measures_agreement_accuracy_and_shows_texts_per_class(rl_run) -> None:
    out, report = rl_run
    assert report["family"] == "text" and report["run"]["steps"] == 6 and report["run"]["precision"] in ("fp32", "bf16")
    assert 0.0 <= report["synthetic_holdout"]["top1_agreement"] <= 1.0 and report["synthetic_holdout"]["n"] == 16
    real = report["eval_data"]
    assert real["n"] == 60 and real["teacher_accuracy"] > 0.9 and "student_accuracy" in real
    samples = report["samples"]
    assert set(samples) == {"negative", "positive"} and sum(map(len, samples.values())) > 0
    text = next(t for texts in samples.values() for t in texts)
    assert text.split()[0] in ["The", "It", "To", "There", "What", "This", "All", "If", "We"]
    assert text in (out / "report.md").read_text()
    assert report["student"]["params"] < report["teacher"]["params"]


@pytest.mark.slow
@pytest.mark.export
def test_eval_measures_the_student_folder_and_its_onnx_on_a_tsv(rl_run, text_files) -> None:
    out, report = rl_run
    result = run("eval", out / "student", "--teacher", text_files["bert"], "--eval-data", text_files["dev"],
                 "--onnx", out / "student.onnx", "--format", "json", "--min-agreement", "0")
    assert result.exit_code == 0, (result.stderr, result.exception)
    evaluated = json.loads(result.stdout)["eval_data"]
    assert evaluated["n"] == 60
    assert evaluated["student_accuracy"] == pytest.approx(report["eval_data"]["student_accuracy"])
    assert evaluated["onnx_top1_agreement"] == pytest.approx(evaluated["top1_agreement"], abs=1 / 60)
    failing = run("eval", out / "student", "--eval-data", text_files["dev"], "--min-agreement", "1.0", "--teacher",
                  text_files["bert"], "--format", "quiet")
    assert failing.exit_code in (0, 1)  # 1 exactly when the student disagrees anywhere
    assert (failing.exit_code == 1) == (evaluated["top1_agreement"] < 1.0)


@pytest.mark.parametrize("recipe", ["random-text", "unlabeled-text", "promptdfd-manual"])
def test_each_text_recipe_runs_through_the_cli(recipe, text_files, tmp_path) -> None:
    extra = {"unlabeled-text": ["--prior", text_files["corpus"]],
             "promptdfd-manual": ["--generator", text_files["gpt2"], *GENERATE]}.get(recipe, [])
    result = run("compress", text_files["bert"], "--recipe", recipe, "--out", tmp_path / "r", *FAST, *extra)
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert report["run"]["recipe"] == recipe and (tmp_path / "r" / "student.safetensors").is_file()
    assert report["onnx_parity"] is None and DEPLOYMENT_SKIPPED in report["warnings"]  # not an export test: said so
    assert report["student"]["latency_ms"] == {"torch": None, "onnx": None} and not (tmp_path / "r" / "student.onnx").exists()
    if recipe == "promptdfd-manual":
        texts = [t for texts in report["samples"].values() for t in texts]
        assert texts and all(any(w in t for w in ("news", "document", "review", "sentence")) for t in texts)


def test_a_seed_repeats_a_cpu_run_exactly(text_files, tmp_path) -> None:
    outs = []
    for name in ("a", "b"):
        result = run("compress", text_files["bert"], "--recipe", "random-text", "--out", tmp_path / name, "--seed", "3", *FAST)
        assert result.exit_code == 0, result.stderr
        with safe_open(str(tmp_path / name / "student.safetensors"), "np") as handle:
            outs.append({k: handle.get_tensor(k) for k in handle.keys()})
    assert outs[0].keys() == outs[1].keys() and all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_student_from_a_config_folder_and_auto_recipe(text_files, tmp_path) -> None:
    folder = tmp_path / "mini"
    folder.mkdir()
    config = json.loads((text_files["bert"] / "config.json").read_text())
    config.update(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32)
    (folder / "config.json").write_text(json.dumps(config))
    result = run("compress", text_files["bert"], "--student", folder, "--prior", text_files["corpus"], "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert report["run"]["recipe"] == "unlabeled-text"  # auto: a corpus and no language model
    assert report["student"]["params"] < 0.6 * report["teacher"]["params"]


def _pickle_only(text_files, root: Path) -> Path:
    folder = root / "pickled"
    shutil.copytree(text_files["bert"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


def _remote_code(text_files, root: Path) -> Path:
    folder = root / "remote"
    shutil.copytree(text_files["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD = {
    "missing generator": (lambda f, r: [f["bert"], "--recipe", "promptdfd-manual"], "needs --generator"),
    "prompter not used": (lambda f, r: [f["bert"], "--recipe", "promptdfd-manual", "--generator", f["gpt2"],
                                         "--prompter", f["gpt2"]], "does not use --prompter"),
    "prior not used": (lambda f, r: [f["bert"], "--recipe", "random-text", "--prior", f["corpus"]], "does not use --prior"),
    "missing prior": (lambda f, r: [f["bert"], "--recipe", "unlabeled-text"], "needs --prior"),
    "image flag": (lambda f, r: [f["bert"], "--arch", "resnet18"], "--arch is for image teachers"),
    "image recipe": (lambda f, r: [f["bert"], "--recipe", "dfad"], "is for image teachers"),
    "too many layers": (lambda f, r: [f["bert"], "--student", "bert-9"], "has 2 layers"),
    "bad student": (lambda f, r: [f["bert"], "--student", "tiny"], "bert-N"),
    "no config": (lambda f, r: [f["root"]], "no config.json"),
    "pickled weights": (lambda f, r: [_pickle_only(f, r)], "--trust-pickle"),
    "remote code": (lambda f, r: [_remote_code(f, r)], "never runs code"),
    "generator is not a LM folder": (lambda f, r: [f["bert"], "--recipe", "promptdfd-manual", "--generator", f["dev"]], "--generator"),
    "eval column": (lambda f, r: [f["bert"], "--eval-data", f["dev"], "--text-column", "text"], "sentence"),
    "bad template": (lambda f, r: [f["bert"], "--recipe", "promptdfd-manual", "--generator", f["gpt2"],
                                    "-s", 'synth.templates=["no slot"]'], "[Category]"),
    "bad reward": (lambda f, r: [f["bert"], "--recipe", "promptdfd-rl", "-s", "synth.reward=max"], "adversarial"),
    "alpha above one": (lambda f, r: [f["bert"], "--recipe", "random-text", "-s", "train.alpha=2"], "train.alpha"),
    "no holdout": (lambda f, r: [f["bert"], "--recipe", "random-text", "-s", "train.holdout=0"], "train.holdout"),
    "image-only setting": (lambda f, r: [f["bert"], "--recipe", "random-text", "-s", "train.mixup=1.0"],
                           "train.mixup = 1.0 applies to image students only"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_text_input_is_one_line_exit_2_and_writes_nothing(case, text_files, tmp_path, monkeypatch) -> None:
    make_args, expected = BAD[case]
    args = make_args(text_files, tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run("compress", *args, "--out", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2, (case, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_text_flags_are_refused_for_image_teachers(tiny_teacher, tmp_path) -> None:
    result = run("compress", tiny_teacher["path"], *tiny_teacher["args"], "--generator", tmp_path, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--generator is for text teachers" in result.stderr


def test_inspect_shows_a_text_teacher(text_files) -> None:
    result = run("inspect", text_files["bert"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["class_names"] == ["negative", "positive"] and info["layers"] == 2
    assert info["default_student"] == "bert-1" and "promptdfd-rl" in info["recipes"] and "dfad" not in info["recipes"]


@pytest.mark.slow
def test_config_toml_repeats_a_text_run(rl_run, text_files, tmp_path) -> None:
    out, report = rl_run
    result = run("compress", "--config", out / "config.toml", "--out", tmp_path / "again", "--format", "json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    again = json.loads(result.stdout)
    assert again["run"]["recipe"] == "promptdfd-rl" and again["run"]["steps"] == report["run"]["steps"]
    assert again["run"]["config"]["synth"] == report["run"]["config"]["synth"]
    assert again["synthetic_holdout"]["top1_agreement"] == report["synthetic_holdout"]["top1_agreement"]


@pytest.mark.slow
@pytest.mark.export
def test_a_distilbert_teacher_gets_a_bert_n_student_and_onnx_without_token_type_ids(text_files, tmp_path) -> None:
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    folder = tmp_path / "distilbert"
    tokenizer = AutoTokenizer.from_pretrained(text_files["bert"])
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, num_labels=2, id2label={0: "negative", 1: "positive"})
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    result = run("compress", folder, "--recipe", "random-text", "--student", "bert-1", "--out", tmp_path / "r",
                 "--precision", "fp32", *FAST)
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert report["run"]["precision"] == "fp32" and report["student"]["layers"] == 1 and report["onnx_parity"]["inputs"] == ["input_ids", "attention_mask"]


def test_fp16_text_run_scales_the_student_and_prompter_losses(text_files, tmp_path) -> None:
    result = run("compress", text_files["bert"], "--recipe", "promptdfd-rl", "--generator", text_files["gpt2"],
                 "--prompter", text_files["gpt2"], "--out", tmp_path / "r", "--precision", "fp16", *FAST, *GENERATE,
                 "-s", "synth.prompt_length=2")
    assert result.exit_code == 0, (result.stderr, result.exception)
    run_info = json.loads(result.stdout)["run"]
    assert run_info["precision"] == "fp16"
    assert run_info["loss_scale"]["student"] >= 1.0 and run_info["loss_scale"]["prompter"] >= 1.0
