"""--quantize int8: a static int8 ONNX student calibrated on held-out synthetic samples only,
measured against the fp32 one, gated when it is the deliverable, and never half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfkd_cli.export import export_onnx, onnx_predict
from dfkd_cli.quantize import quantize_int8

import kit

SHAPE = (1, 16, 16)


def test_int8_student_is_smaller_and_agrees_with_fp32(tmp_path, tiny_teacher):
    model = tiny_teacher["model"]
    x = torch.randn(64, *SHAPE)
    export_onnx(model, tmp_path / "fp32.onnx", SHAPE, x[:16])
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", x[:32])
    assert (tmp_path / "int8.onnx").stat().st_size < 0.5 * (tmp_path / "fp32.onnx").stat().st_size
    fp32 = onnx_predict(tmp_path / "fp32.onnx", x[32:].numpy()).argmax(1)
    int8 = onnx_predict(tmp_path / "int8.onnx", x[32:].numpy()).argmax(1)
    assert (fp32 == int8).mean() >= 0.9
    graph = (tmp_path / "int8.onnx").read_bytes()
    assert b"QuantizeLinear" in graph and b"DequantizeLinear" in graph  # QDQ format


def compress(tiny_teacher, tmp_path, *extra):
    settings = kit.train(holdout=64, optimizer="adam", lr=0.003)
    return kit.cli(*kit.compress_args(tiny_teacher, tmp_path / "run", "noise", 30, *settings, *extra))


@pytest.mark.slow
def test_compress_writes_an_int8_student_calibrated_on_synthetic_samples_only(tiny_teacher, tmp_path, monkeypatch):
    import dfkd_cli.quantize as quantize

    seen = []
    real_quantize = quantize.quantize_int8
    monkeypatch.setattr(quantize, "quantize_int8", lambda fp32, int8, x: seen.append(x) or real_quantize(fp32, int8, x))
    result = compress(tiny_teacher, tmp_path, "--quantize", "int8", "--eval-data", tiny_teacher["eval"],
                      "--min-agreement", "0.0")
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert (tmp_path / "run" / "student.int8.onnx").is_file()
    int8 = report["int8"]
    assert int8["synthetic"]["n"] == 32 and int8["eval_data"]["n"] == 256
    assert 0 <= int8["eval_data"]["int8_top1_agreement"] <= 1 and "int8_accuracy" in int8["eval_data"]
    assert int8["file_bytes"]["int8"] < int8["file_bytes"]["fp32"] and int8["latency_ms"]["int8"] > 0
    assert report["gate"]["metric"] == "int8_top1_agreement" and report["gate"]["measured_on"].startswith("int8")
    (calibration,) = seen
    eval_x = np.load(tiny_teacher["eval"])["x"].astype(np.float32) / 255
    eval_x = torch.from_numpy((eval_x - 0.5) / 0.5)[:, None]
    assert len(calibration) == 32  # the selection half of the 64 held-out synthetic samples
    assert not any(torch.allclose(c, e) for c in calibration[:8] for e in eval_x)
    assert "int8 ONNX" in (tmp_path / "run" / "report.md").read_text()


def test_a_bad_quantize_value_is_a_one_line_error(tiny_teacher, tmp_path):
    result = compress(tiny_teacher, tmp_path, "--quantize", "int4")
    assert result.exit_code == 2 and "--quantize must be none or int8" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_failed_quantization_leaves_no_finished_looking_run(tiny_teacher, tmp_path, monkeypatch):
    import dfkd_cli.quantize as quantize

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(quantize, "quantize_static", broken)
    result = compress(tiny_teacher, tmp_path, "--quantize", "int8")
    assert result.exit_code == 3 and "int8 quantization failed" in result.stderr
    assert not (tmp_path / "run").exists()
    failed = tmp_path / "run.failed"
    assert (failed / "student.safetensors").is_file()
    assert not (failed / "student.onnx").exists() and not (failed / "student.int8.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("with_eval", [False, True])
def test_min_agreement_gates_the_int8_student(tiny_teacher, tmp_path, with_eval):
    extra = ["--eval-data", tiny_teacher["eval"]] if with_eval else []
    result = compress(tiny_teacher, tmp_path, "--quantize", "int8", "--min-agreement", "1.0", *extra)
    report = json.loads(result.stdout)
    measured = report["int8"]["eval_data" if with_eval else "synthetic"]["int8_top1_agreement"]
    assert report["gate"]["measured"] == measured
    assert result.exit_code == (0 if measured >= 1.0 else 1)



@pytest.mark.slow
@pytest.mark.export  # `dfkd quantize` reads the run's student.onnx (compress --quantize exports it anyway)
def test_quantize_command_adds_int8_to_a_saved_run(tiny_teacher, tmp_path):
    made = compress(tiny_teacher, tmp_path, "--save-synthetic")
    assert made.exit_code == 0, (made.stderr, made.exception)
    result = kit.cli("quantize", tmp_path / "run", "--format", "json", "--min-agreement", "0.0", "--eval-data", tiny_teacher["eval"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (tmp_path / "run" / "student.int8.onnx").is_file()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["int8"]["synthetic"]["n"] == 32 and saved["int8"]["eval_data"]["n"] == 256
    assert saved["gate"]["metric"] == "int8_top1_agreement"
    human = kit.cli("quantize", tmp_path / "run")
    assert human.exit_code == 0 and "int8 agreement with the teacher" in human.stdout


@pytest.mark.slow
@pytest.mark.export  # so the refusal is for the missing set alone
def test_quantize_command_needs_a_saved_synthetic_set(tiny_teacher, tmp_path):
    assert compress(tiny_teacher, tmp_path).exit_code == 0
    result = kit.cli("quantize", tmp_path / "run")
    assert result.exit_code == 2 and "--save-synthetic" in result.stderr
    assert not (tmp_path / "run" / "student.int8.onnx").exists()
