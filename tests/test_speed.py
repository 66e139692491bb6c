"""The hot loop's reporting and switches: throughput, peak memory, --precision."""

from __future__ import annotations

import json

import pytest

from dfkd_cli.measure import DEPLOYMENT_SKIPPED
from dfkd_cli.precision import cpu_has_native_bf16

import kit

STEPS = 12
FEW = 4  # one round: enough to see a precision at work (half precision is emulated, so slow, on most CPUs)
SMALL = [*kit.train(eval_every=6, steps_per_round=4), *kit.generator()]


def _compress(teacher, tmp_path, *extra: str, recipe: str = "dfad", steps: int = STEPS):
    return kit.cli(*kit.compress_args(teacher, tmp_path / "run", recipe, steps, *SMALL, *extra))


def test_the_report_has_throughput_and_peak_memory_per_stage(tiny_teacher, tmp_path):
    result = _compress(tiny_teacher, tmp_path)
    assert result.exit_code == 0, result.stderr
    run = json.loads(result.stdout)["run"]
    meter = run["throughput"]
    assert meter["student_samples"] == STEPS * 16 and meter["synthetic_samples"] == STEPS * 16  # dfad: every batch fresh
    assert meter["student_samples_per_s"] > 0 and meter["synthetic_samples_per_s"] > 0
    assert set(run["peak_memory_mb"]) == {"load", "plan", "distill", "export", "evaluate"}
    assert all(stage["rss"] > 50 and stage["cuda_allocated"] is None for stage in run["peak_memory_mb"].values())
    assert run["precision"] == "fp32"  # auto on a CPU
    assert "synthetic samples/s" in (tmp_path / "run" / "report.md").read_text()


def test_outside_export_tests_a_run_skips_export_and_latency_and_says_so(tiny_teacher, tmp_path):
    """The suite's internal switch (tests/conftest.py): no ONNX file and no latency numbers, and the
    report says why instead of showing made-up ones."""
    report = kit.report_of(_compress(tiny_teacher, tmp_path, steps=FEW))
    assert DEPLOYMENT_SKIPPED in report["warnings"] and report["onnx_parity"] is None
    assert report["teacher"]["latency_ms"] == report["student"]["latency_ms"] == {"torch": None, "onnx": None}
    assert report["student"]["file_bytes"]["onnx"] is None and not (tmp_path / "run" / "student.onnx").exists()
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "not exported" in markdown and DEPLOYMENT_SKIPPED in markdown


def test_bf16_autocast_runs_on_the_cpu_and_is_recorded(tiny_teacher, tmp_path):
    result = _compress(tiny_teacher, tmp_path, "--precision", "bf16", steps=FEW)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["run"]["precision"] == "bf16"
    assert ("no native bf16" in result.stderr) == (not cpu_has_native_bf16())  # said only where it is slow


@pytest.mark.parametrize("extra, message", [(["--precision", "fp8"], "must be one of"),
                                            (["--precision", "fp16", "-s", "train.update=lra"], "lra's inner gradient")])
def test_unsupported_precisions_are_refused(extra, message, tiny_teacher, tmp_path):
    result = _compress(tiny_teacher, tmp_path, *extra)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_fp16_with_loss_scaling_runs_on_the_cpu_and_is_recorded(tiny_teacher, tmp_path):
    result = _compress(tiny_teacher, tmp_path, "--precision", "fp16", steps=FEW)
    assert result.exit_code == 0, result.stderr
    run = json.loads(result.stdout)["run"]
    assert run["precision"] == "fp16" and run["channels_last"] is True and "CPUs emulate fp16" in result.stderr
    assert run["loss_scale"]["student"] >= 1.0 and run["loss_scale"]["synthesizer"] >= 1.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pool_recipes_publish_under_half_precision(precision, tiny_teacher, tmp_path):
    """Generators under autocast make half-precision samples; the pool keeps them in fp32, so the
    held-out selection, the sample grid and the export read them outside autocast."""
    result = _compress(tiny_teacher, tmp_path, "-s", "synth.iterations=2", "--precision", precision, recipe="fast", steps=FEW)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["run"]["precision"] == precision
    assert (tmp_path / "run" / "samples.png").is_file()
