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
from typer.testing import CliRunner

from dfkd_cli.cli import app
from dfkd_cli.precision import resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SMALL = ["--student", "resnet8", "--seed", "0", "--device", "cuda", "--format", "json", "--steps", "12",
         "-s", "train.batch_size=16", "-s", "train.holdout=32", "-s", "train.eval_every=6", "-s", "synth.batch_size=16",
         "-s", "synth.ngf=8", "-s", "synth.latent_dim=16", "-s", "train.steps_per_round=4"]


def _compress(teacher, out, *extra: str):
    return CliRunner().invoke(app, ["compress", str(teacher["path"]), *teacher["args"], "--out", str(out), *SMALL,
                                    "--eval-data", str(teacher["eval"]), *extra])


def test_auto_precision_on_a_gpu_is_bf16_or_fp16():
    device = torch.device("cuda")
    assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.parametrize("recipe", ["dfad", "fast", "deepinversion"])
@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_compress_on_cuda_reports_cuda_memory_and_exports(recipe, precision, tiny_teacher, tmp_path):
    extra = ["-s", "synth.iterations=4"] if recipe != "dfad" else []
    result = _compress(tiny_teacher, tmp_path / "run", "--recipe", recipe, "--precision", precision, *extra)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    run = report["run"]
    assert run["precision"] == resolve_precision(precision, torch.device("cuda"))
    assert all(stage["cuda_allocated"] > 0 for stage in run["peak_memory_mb"].values())
    assert (run["loss_scale"] is not None) == (run["precision"] == "fp16")
    assert report["onnx_parity"]["top1_agreement"] == 1.0
    assert (tmp_path / "run" / "student.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")
def test_two_gpus_with_nccl_end_with_identical_students(tiny_teacher, tmp_path):
    args = ["compress", str(tiny_teacher["path"]), *tiny_teacher["args"], "--out", str(tmp_path / "run"), *SMALL,
            "--recipe", "dfad", "--nproc", "2"]
    result = subprocess.run([sys.executable, "-m", "dfkd_cli", *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CI": "true"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run"]["processes"] == {"count": 2, "identical_students": True}
