"""int8 ONNX without real data: onnxruntime static quantization calibrated on synthetic samples.

Static int8 needs a calibration set, which is what a data-free user lacks; the held-out synthetic
samples are one. ``compress --quantize int8`` quantizes ``student.onnx`` into ``student.int8.onnx``
(QDQ format, per-channel int8 weights, uint8 activations with MinMax ranges), calibrated on the
selection half of the held-out synthetic samples, and measures the int8 student on the other half
(and on ``--eval-data`` when given). Eval data never calibrates.

Example:
    >>> quantize_int8(Path("student.onnx"), Path("student.int8.onnx"), x_calibration)
    >>> int8_report(Path("student.onnx"), Path("student.int8.onnx"), teacher, x_report, eval_data)["synthetic"]
    {'n': 256, 'fp32_top1_agreement': 0.98, 'int8_top1_agreement': 0.977}
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from dfkd_cli.atomic import replace, temporary_sibling
from dfkd_cli.errors import ExportError
from dfkd_cli.evaluate import file_size_bytes, onnx_latency_ms, predict
from dfkd_cli.eval_data import EvalData
from dfkd_cli.export import onnx_predict, onnx_session

QUANTIZE_CHOICES = ("none", "int8")
CALIBRATION_BATCH = 16


class _SyntheticReader(CalibrationDataReader):
    """Feeds the calibration samples to onnxruntime in batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch_size: int) -> None:
        self._batches = iter([{input_name: x[i : i + batch_size]} for i in range(0, len(x), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: torch.Tensor) -> None:
    """Write the static int8 quantization of ``fp32_path`` to ``int8_path``, calibrated on ``calibration``
    (normalised inputs); raises :class:`ExportError` when onnxruntime cannot quantize the graph."""
    if len(calibration) == 0:
        raise ExportError("int8 quantization needs calibration samples; raise train.holdout")
    x = np.ascontiguousarray(calibration.detach().cpu().numpy(), dtype=np.float32)
    input_name = onnx_session(fp32_path).get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="dfkd-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        staged = Path(tmp) / "student.int8.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(staged), _SyntheticReader(x, input_name, CALIBRATION_BATCH),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        except Exception as error:  # onnxruntime raises many types; each means the same to the user
            raise ExportError(f"int8 quantization failed in onnxruntime ({type(error).__name__}: {error}); "
                              "run without --quantize or report this as a bug") from error
        with temporary_sibling(int8_path, ".onnx") as sibling:  # the temporary folder may be on another disk
            shutil.copyfile(staged, sibling)
            replace(sibling, int8_path)


def _onnx_classes(path: Path, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(onnx_predict(path, x.cpu().numpy())).argmax(1)


def _agreements(fp32_path: Path, int8_path: Path, teacher_classes: torch.Tensor, x: torch.Tensor,
                labels: torch.Tensor | None) -> dict[str, Any]:
    return agreement_section(_onnx_classes(fp32_path, x), _onnx_classes(int8_path, x), teacher_classes, labels)


def agreement_section(fp32: torch.Tensor, int8: torch.Tensor, teacher_classes: torch.Tensor,
                      labels: torch.Tensor | None) -> dict[str, Any]:
    """One part of the report's int8 section: the fp32 and int8 students' classes against the
    teacher's (and the labels when there are any)."""
    part: dict[str, Any] = {"n": len(fp32),
                            "fp32_top1_agreement": float((fp32 == teacher_classes).float().mean()),
                            "int8_top1_agreement": float((int8 == teacher_classes).float().mean()),
                            "int8_vs_fp32_top1": float((int8 == fp32).float().mean())}
    if labels is not None:
        part["fp32_accuracy"] = float((fp32 == labels).float().mean())
        part["int8_accuracy"] = float((int8 == labels).float().mean())
    return part


def int8_report(fp32_path: Path, int8_path: Path, teacher_model: torch.nn.Module, input_shape: tuple[int, int, int],
                x_report: torch.Tensor, eval_data: EvalData | None) -> dict[str, Any]:
    """Agreement of the fp32 and int8 ONNX students with the teacher on the synthetic report half and
    on eval data, file sizes and onnxruntime CPU latency (batch 1)."""
    synthetic = _agreements(fp32_path, int8_path, predict(teacher_model, x_report).argmax(1), x_report, None)
    real = None
    if eval_data is not None:
        real = _agreements(fp32_path, int8_path, predict(teacher_model, eval_data.x).argmax(1), eval_data.x, eval_data.y)
    return {"format": "QDQ, per-channel int8 weights, uint8 activations (MinMax)",
            "calibration": "held-out synthetic samples (selection half)",
            "synthetic": synthetic, "eval_data": real,
            "file_bytes": {"fp32": file_size_bytes(fp32_path), "int8": file_size_bytes(int8_path)},
            "latency_ms": {"fp32": onnx_latency_ms(fp32_path, input_shape),
                           "int8": onnx_latency_ms(int8_path, input_shape)}}


def quantize_and_measure(run_dir: Path, teacher_model: torch.nn.Module, input_shape: tuple[int, int, int],
                         holdout: torch.Tensor, eval_data: EvalData | None) -> dict[str, Any]:
    """RUN/student.int8.onnx from RUN/student.onnx, calibrated on the selection half of ``holdout``
    and measured on the report half (and ``eval_data``); returns the report's int8 section."""
    half = len(holdout) // 2
    fp32, int8 = run_dir / "student.onnx", run_dir / "student.int8.onnx"
    quantize_int8(fp32, int8, holdout[:half].cpu())
    return int8_report(fp32, int8, teacher_model, input_shape, holdout[half:].cpu(), eval_data)


def quantize_run(run_dir: Path, eval_data_path: Path | None = None, min_agreement: float | None = None,
                 trust_pickle: bool = False) -> dict[str, Any]:
    """``dfkd quantize RUN``: int8 for a finished run made with ``--save-synthetic``, calibrated on
    its saved held-out samples; adds the int8 section (and the gate) to RUN's report."""
    from dfkd_cli.errors import DfkdError
    from dfkd_cli.eval_data import load_eval_data
    from dfkd_cli.export import load_student
    from dfkd_cli.measure import check_fraction, gate_result
    from dfkd_cli.report import write_report
    from dfkd_cli.rundir import updating_run
    from dfkd_cli.sources import needs_arch
    from dfkd_cli.synthetic_set import load_synthetic_set
    from dfkd_cli.teacher import load_teacher

    check_fraction(min_agreement, "--min-agreement")
    run_dir = Path(run_dir)
    needed = ["student.onnx", "student.safetensors", "report.json", "synthetic/manifest.json"]
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        hint = " (make the run with --save-synthetic, or use compress --quantize int8)" if "synthetic/manifest.json" in missing else ""
        raise DfkdError(f"'{run_dir}' is not a finished dfkd run with a saved synthetic set: it lacks {', '.join(missing)}{hint}")
    with updating_run(run_dir):  # locked like compress --out; a signal leaves the files whole
        _, meta = load_student(run_dir / "student.safetensors")
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        teacher_path = Path(report["teacher"]["path"])
        arch = meta.teacher_arch if needs_arch(teacher_path) else None  # folders and programs carry theirs
        teacher = load_teacher(teacher_path, arch, meta.input_shape, mean=list(meta.mean), std=list(meta.std),
                               trust_pickle=trust_pickle)
        holdout = load_synthetic_set(run_dir / "synthetic", teacher).holdout
        eval_data = None
        if eval_data_path is not None:
            eval_data = load_eval_data(eval_data_path, meta.input_shape, meta.mean, meta.std, list(meta.class_names))
        report["int8"] = quantize_and_measure(run_dir, teacher.model, teacher.input_shape, holdout, eval_data)
        report["gate"] = gate_result(min_agreement, report)
        try:
            write_report(run_dir, report)
        except ValueError as error:  # a report another dfkd version wrote, or one edited by hand
            raise DfkdError(f"'{run_dir / 'report.json'}' does not follow this dfkd's report schema ({error}); "
                            "make the run again with this version") from None
    return report
