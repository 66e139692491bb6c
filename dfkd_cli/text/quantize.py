"""int8 for a text student: onnxruntime dynamic quantization of ``student.onnx``.

Transformer students get dynamic quantization (int8 weights of every MatMul and Gemm; activations
quantized at run time from their own range), the kind onnxruntime recommends for transformer
models: it needs no calibration set, so it cannot be calibrated on a biased one. The int8 student
is measured against the fp32 one on the report half of the held-out synthetic texts (the teacher's
logits are in the batch) and on ``--eval-data``, in the report section image runs write, so
``--min-agreement`` gates it the same way.

Example:
    >>> section = quantize_text_and_measure(Path("runs/x"), tokenizer, 128, holdout, None)
    >>> section["synthetic"]["int8_top1_agreement"]
    0.98
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from dfkd_cli.atomic import replace, temporary_sibling
from dfkd_cli.batches import TextBatch
from dfkd_cli.errors import ExportError
from dfkd_cli.evaluate import file_size_bytes

FORMAT = "dynamic: int8 weights of MatMul and Gemm, activations quantized at run time"


def quantize_text_int8(fp32_path: Path, int8_path: Path) -> None:
    """Write the dynamic int8 quantization of ``fp32_path`` to ``int8_path``; raises
    :class:`ExportError` when onnxruntime cannot quantize the graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="dfkd-int8-") as tmp:
        staged = Path(tmp) / "student.int8.onnx"
        try:
            quantize_dynamic(str(fp32_path), str(staged), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        except Exception as error:  # onnxruntime raises many types; each means the same to the user
            raise ExportError(f"int8 quantization failed in onnxruntime ({type(error).__name__}: {error}); "
                              "run without --quantize or report this as a bug") from error
        with temporary_sibling(int8_path, ".onnx") as sibling:
            shutil.copyfile(staged, sibling)
            replace(sibling, int8_path)


def _agreements(predict: Callable[[Path, list[str]], torch.Tensor], fp32_path: Path, int8_path: Path,
                texts: list[str], teacher_classes: torch.Tensor, labels: torch.Tensor | None) -> dict[str, Any]:
    from dfkd_cli.quantize import agreement_section

    fp32, int8 = predict(fp32_path, texts).argmax(1), predict(int8_path, texts).argmax(1)
    return agreement_section(fp32, int8, teacher_classes, labels)


def quantize_text_and_measure(run_dir: Path, tokenizer: Any, max_length: int, report_half: TextBatch,
                              eval_set: tuple[TextBatch, torch.Tensor | None] | None) -> dict[str, Any]:
    """RUN/student.int8.onnx from RUN/student.onnx, measured beside it on ``report_half`` and on
    ``eval_set`` (the eval texts with the teacher's logits, and their labels if any)."""
    from dfkd_cli.text.onnx_predict import onnx_text_predict
    from dfkd_cli.text.publish import onnx_text_latency_ms

    def predict(path: Path, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(onnx_text_predict(path, tokenizer, texts, max_length))

    fp32, int8 = run_dir / "student.onnx", run_dir / "student.int8.onnx"
    quantize_text_int8(fp32, int8)
    synthetic = _agreements(predict, fp32, int8, report_half.texts, report_half.teacher_classes(), None)
    real = None
    if eval_set is not None:
        batch, labels = eval_set
        real = _agreements(predict, fp32, int8, batch.texts, batch.teacher_classes(), labels)
    return {"format": FORMAT, "calibration": "none (dynamic quantization)", "synthetic": synthetic, "eval_data": real,
            "file_bytes": {"fp32": file_size_bytes(fp32), "int8": file_size_bytes(int8)},
            "latency_ms": {"fp32": onnx_text_latency_ms(fp32, tokenizer), "int8": onnx_text_latency_ms(int8, tokenizer)}}
