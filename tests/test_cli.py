"""The dfkd command line end to end, on a tiny teacher trained inside the test session."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfkd_cli.cli import app

import kit
from dfkd_cli.marker import seal

runner = CliRunner()
FAST_DI = ["-s", "synth.iterations=30", "-s", "synth.batch_size=64", "-s", "synth.flip=false", "-s", "synth.jitter=0",
           "-s", "synth.loss.bn=0.1", "-s", "synth.lr=0.1",
           "-s", "train.batch_size=64", "-s", "train.steps_per_round=20", "-s", "train.eval_every=20",
           "-s", "train.holdout=128", "-s", "train.flip=false", "-s", "train.crop_pad=1"]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def compress_args(tiny_teacher, out: Path, *extra: str) -> list[str]:
    return ["compress", tiny_teacher["path"], *tiny_teacher["args"], "--student", "resnet8", "--out", out,
            "--seed", "0", "--device", "cpu", "--format", "json", *extra]


@pytest.fixture(scope="module")
def di_run(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "di"
    with kit.deployment_checks(True):  # shared by export tests and others, whichever runs first
        result = run(*compress_args(tiny_teacher, out, "--recipe", "deepinversion", "--steps", "120",
                                    "--eval-data", tiny_teacher["eval"], *FAST_DI))
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.export
def test_compress_writes_every_artefact(di_run):
    out, report = di_run
    for name in ("student.safetensors", "student.onnx", "report.json", "report.md", "samples.png", "config.toml"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".di.partial-*")), "staging folder left behind"
    assert json.loads((out / "report.json").read_text()) == report


@pytest.mark.slow
@pytest.mark.export
def test_report_measures_agreement_accuracy_sizes_and_time(di_run):
    _, report = di_run
    assert report["schema_version"] == 1
    assert report["synthetic_holdout"]["n"] == 64  # the reported half of 128 held-out samples
    assert report["eval_data"]["teacher_accuracy"] > 0.95
    assert report["eval_data"]["top1_agreement"] > 0.6, "student learned little from DeepInversion (chance: 0.25)"
    assert set(report["eval_data"]["per_class"]) == {"0", "1", "2", "3"}
    assert report["onnx_parity"]["batch_sizes"] == [1, 2, 7] and report["onnx_parity"]["max_abs_diff"] < 1e-3
    assert report["student"]["file_bytes"]["onnx"] > 0 and report["student"]["latency_ms"]["onnx"] > 0
    assert report["teacher"]["has_bn"] and report["teacher"]["num_classes"] == 4
    wall = report["run"]["wall_clock_s"]
    assert wall["total"] >= wall["distill"] > 0
    assert report["run"]["steps"] == 120 and report["run"]["versions"]["torch"] == torch.__version__
    assert "Agreement" in (di_run[0] / "report.md").read_text() or "agreement" in (di_run[0] / "report.md").read_text()


@pytest.mark.slow
def test_student_file_is_self_describing(di_run, tiny_teacher):
    out, _ = di_run
    from safetensors import safe_open

    with safe_open(str(out / "student.safetensors"), "pt") as handle:
        meta = handle.metadata()
    text = json.dumps(meta)
    teacher_sha = hashlib.sha256(tiny_teacher["path"].read_bytes()).hexdigest()
    for expected in ("resnet8", "deepinversion", teacher_sha, "0.5"):
        assert expected in text


@pytest.mark.slow
def test_config_repeats_the_run_exactly(di_run, tmp_path):
    out, _ = di_run
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["run"]["seed"] == 0 and config["synth"]["iterations"] == 30 and config["train"]["steps"] == 120
    again = tmp_path / "again"
    result = run("compress", "--config", out / "config.toml", "--out", again, "--format", "quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    first, second = load_file(out / "student.safetensors"), load_file(again / "student.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first), "a seeded CPU run did not repeat"


@pytest.mark.slow
@pytest.mark.export
def test_eval_gate_passes_and_fails(di_run, tiny_teacher):
    out, report = di_run
    measured = report["eval_data"]["top1_agreement"]
    ok = run("eval", out / "student.safetensors", "--teacher", tiny_teacher["path"], "--eval-data", tiny_teacher["eval"],
             "--onnx", out / "student.onnx", "--min-agreement", f"{measured - 0.01:.4f}", "--format", "json")
    assert ok.exit_code == 0, ok.stderr
    evaluated = json.loads(ok.stdout)
    assert evaluated["eval_data"]["top1_agreement"] == pytest.approx(measured)
    assert evaluated["eval_data"]["onnx_top1_agreement"] == pytest.approx(measured, abs=0.01)
    assert evaluated["gate"]["passed"] and evaluated["warnings"] == []
    failed = run("eval", out / "student.safetensors", "--teacher", tiny_teacher["path"], "--eval-data", tiny_teacher["eval"],
                 "--min-agreement", "1.01" if measured == 1.0 else f"{min(measured + 0.01, 1.0):.4f}")
    assert failed.exit_code == 1
    assert "below --min-agreement" in failed.stderr


@pytest.mark.slow
def test_eval_without_teacher_reports_accuracy(di_run, tiny_teacher):
    out, report = di_run
    result = run("eval", out / "student.safetensors", "--eval-data", tiny_teacher["eval"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["eval_data"]["student_accuracy"] == pytest.approx(report["eval_data"]["student_accuracy"])


@pytest.mark.slow
def test_deepinversion_beats_the_noise_baseline(di_run, tiny_teacher, tmp_path):
    _, di_report = di_run
    result = run(*compress_args(tiny_teacher, tmp_path / "noise", "--recipe", "noise", "--steps", "120",
                                "--eval-data", tiny_teacher["eval"], "-s", "train.batch_size=64", "-s", "train.holdout=128"))
    assert result.exit_code == 0, result.stderr
    noise_agreement = json.loads(result.stdout)["eval_data"]["top1_agreement"]
    assert di_report["eval_data"]["top1_agreement"] > noise_agreement + 0.1


def test_compress_gate_failure_exits_1_but_keeps_artefacts(tiny_teacher, tmp_path):
    out = tmp_path / "gated"
    result = run(*compress_args(tiny_teacher, out, "--recipe", "noise", "--steps", "2", "--min-agreement", "1.0",
                                "-s", "train.holdout=8"))
    report = json.loads(result.stdout)
    if report["gate"]["measured"] < 1.0:
        assert result.exit_code == 1 and "below --min-agreement" in result.stderr
    assert (out / "report.json").is_file()


def test_recipes_list_show_cp_validate(tmp_path):
    listed = run("recipes", "--format", "json")
    assert listed.exit_code == 0
    names = {row["name"]: row for row in json.loads(listed.stdout)}
    assert {"noise", "deepinversion"} <= set(names) and names["deepinversion"]["description"]
    shown = run("recipes", "show", "deepinversion")
    assert shown.exit_code == 0 and "[synth.loss]" in shown.stdout
    copy = tmp_path / "mine.toml"
    assert run("recipes", "cp", "deepinversion", copy).exit_code == 0
    assert run("recipes", "validate", copy).exit_code == 0
    copy.write_text(copy.read_text().replace("lr = 0.05", "lr = \"fast\""))
    invalid = run("recipes", "validate", copy)
    assert invalid.exit_code == 2 and "'synth.lr' must be float" in invalid.stderr


def test_archs_lists_with_glob():
    result = run("archs", "wrn*", "--format", "json")
    assert [row["name"] for row in json.loads(result.stdout)] == ["wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2"]
    assert run("archs", "nothing-like-this*").exit_code == 2


def test_inspect_shows_what_dfkd_sees(tiny_teacher):
    result = run("inspect", tiny_teacher["path"], "--arch", "resnet8", "--input-shape", "1x16x16", "--format", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["num_classes"] == 4 and info["input_shape"] == [1, 16, 16]
    assert len(info["bn_layers"]) == 9  # stem, 2 per block, 2 downsample
    auto = info["auto"]
    assert "deepinversion" in info["recipes"] and auto["recipe"] in info["recipes"] and set(auto["race"]) < set(info["recipes"])
    assert auto["recipe"] == "dfq" and auto["device"] == "cpu" and "MNIST resnet8" in auto["evidence"]  # 1x16x16 with BatchNorm
    assert info["recipes_needing_prior"] == ["avkd", "prior-kd"] and not set(auto["race"]) & {"avkd", "prior-kd", "noise"}
    human = run("inspect", tiny_teacher["path"], "--arch", "resnet8", "--input-shape", "1x16x16")
    assert "BatchNorm" in human.stdout and "deepinversion" in human.stdout
    assert "--recipe auto: dfq (policy rule 'BatchNorm, small grayscale inputs" in human.stdout
    assert "with --prior images only: avkd, prior-kd" in human.stdout


@pytest.mark.subprocess
def test_installed_entry_point_runs_as_a_subprocess(tiny_teacher, tmp_path):
    dfkd = Path(sys.executable).parent / "dfkd"
    out = tmp_path / "sub"
    env = {**os.environ, "CI": "true"}
    proc = subprocess.run([str(dfkd), *[str(a) for a in compress_args(tiny_teacher, out, "--recipe", "noise", "--steps", "5",
                                                                          "-s", "train.holdout=16")]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["run"]["steps"] == 5  # stdout holds the JSON document only
    assert "[distill]" in proc.stderr  # plain progress lines in CI, on stderr
    module = subprocess.run([sys.executable, "-m", "dfkd_cli", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout.startswith("dfkd ")


def test_time_budget_stops_the_run_and_overwrite_replaces_the_folder(tiny_teacher, tmp_path):
    out = tmp_path / "budget"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    seal(out)  # a run folder dfkd wrote: --overwrite may replace it (any other folder is refused)
    result = run(*compress_args(tiny_teacher, out, "--recipe", "deepinversion", "--steps", "1000", "--time-budget", "3s",
                                "--overwrite", "-s", "synth.iterations=100000", "-s", "synth.batch_size=16",
                                "-s", "train.holdout=16"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert 1 <= report["run"]["steps"] < 1000
    assert report["run"]["wall_clock_s"]["distill"] < 30
    assert not (out / "old.txt").exists() and (out / "report.json").is_file()


def test_class_names_from_labels_reach_report_and_student(tiny_teacher, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("top-left\ntop-right\nbottom-left\nbottom-right\n")
    out = tmp_path / "named"
    result = run(*compress_args(tiny_teacher, out, "--recipe", "noise", "--steps", "2", "--labels", labels,
                                "--eval-data", tiny_teacher["eval"], "-s", "train.holdout=8"))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["eval_data"]["per_class"]) == {"top-left", "top-right", "bottom-left", "bottom-right"}
    evaluated = run("eval", out / "student.safetensors", "--eval-data", tiny_teacher["eval"], "--format", "json")
    assert evaluated.exit_code == 0, evaluated.stderr
    from dfkd_cli.export import load_student

    assert load_student(out / "student.safetensors")[1].class_names == ["top-left", "top-right", "bottom-left", "bottom-right"]


@pytest.mark.slow
def test_eval_reads_an_image_folder_like_the_npz(di_run, tiny_teacher, tmp_path):
    from PIL import Image

    data = np.load(tiny_teacher["eval"])
    for i, (image, label) in enumerate(zip(data["x"][:64], data["y"][:64])):
        folder = tmp_path / "eval" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    npz = tmp_path / "first64.npz"
    np.savez(npz, x=data["x"][:64], y=data["y"][:64])
    out, _ = di_run
    reports = []
    for source in (tmp_path / "eval", npz):
        result = run("eval", out / "student.safetensors", "--teacher", tiny_teacher["path"], "--eval-data", source,
                     "--format", "json")
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(result.stdout)["eval_data"])
    folder_report, npz_report = reports
    assert folder_report["n"] == npz_report["n"] == 64
    assert folder_report["top1_agreement"] == pytest.approx(npz_report["top1_agreement"])
    assert folder_report["student_accuracy"] == pytest.approx(npz_report["student_accuracy"])


@pytest.mark.export
def test_failed_onnx_parity_exits_3_and_keeps_only_the_pytorch_student(tiny_teacher, tmp_path, monkeypatch):
    from dfkd_cli import export

    real_predict = export.onnx_predict
    monkeypatch.setattr(export, "onnx_predict", lambda model, x: np.roll(real_predict(model, x), 1, axis=1))
    out = tmp_path / "broken"
    result = run(*compress_args(tiny_teacher, out, "--recipe", "noise", "--steps", "2", "-s", "train.holdout=8"))
    assert result.exit_code == 3, result.stderr
    assert "ONNX parity check failed" in result.stderr and "broken.failed" in result.stderr
    assert not out.exists(), "a failed run must not leave a folder that looks finished"
    kept = sorted(p.name for p in (tmp_path / "broken.failed").iterdir())
    assert "student.safetensors" in kept and "student.onnx" not in kept and "report.json" not in kept
    assert [p.name for p in tmp_path.iterdir()] == ["broken.failed"]
