"""The CUDA code paths: autocast precisions, loss scaling, peak CUDA memory and NCCL with 2 GPUs.

Skipped where no GPU is visible (CI never has one); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dfkd_cli.precision import resolve_precision

import kit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SMALL = [*kit.train(eval_every=6, steps_per_round=4), *kit.generator()]


def _compress(teacher, out, recipe: str, *extra: str):
    return kit.cli(*kit.compress_args(teacher, out, recipe, 12, *SMALL, "--eval-data", teacher["eval"], *extra, device="cuda"))


def test_auto_precision_on_a_gpu_is_bf16_or_fp16():
    device = torch.device("cuda")
    assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.export
@pytest.mark.parametrize("recipe", ["dfad", "fast", "deepinversion"])
@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_compress_on_cuda_reports_cuda_memory_and_exports(recipe, precision, tiny_teacher, tmp_path):
    extra = ["-s", "synth.iterations=4"] if recipe != "dfad" else []
    result = _compress(tiny_teacher, tmp_path / "run", recipe, "--precision", precision, *extra)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    run = report["run"]
    assert run["precision"] == resolve_precision(precision, torch.device("cuda"))
    assert all(stage["cuda_allocated"] > 0 for stage in run["peak_memory_mb"].values())
    assert (run["loss_scale"] is not None) == (run["precision"] == "fp16")
    assert report["onnx_parity"]["top1_agreement"] == 1.0
    assert (tmp_path / "run" / "student.safetensors").is_file()


@pytest.mark.subprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")
def test_two_gpus_with_nccl_end_with_identical_students(tiny_teacher, tmp_path):
    args = kit.compress_args(tiny_teacher, tmp_path / "run", "dfad", 12, *SMALL, "--nproc", "2", device="cuda")
    result = subprocess.run([sys.executable, "-m", "dfkd_cli", *map(str, args)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CI": "true"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run"]["processes"] == {"count": 2, "identical_students": True}
