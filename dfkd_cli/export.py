"""Write the student: safetensors with self-describing metadata, and ONNX behind a parity gate.

A ``student.safetensors`` written here carries everything needed to rebuild and use the network
(architecture name, classes, input shape, normalisation, provenance) as safetensors metadata, so
:func:`load_student` needs nothing but the file. :func:`export_onnx` only leaves a ``.onnx`` behind
when onnxruntime reproduces the PyTorch outputs at several batch sizes.

Example:
    >>> meta = StudentMeta("resnet8", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3,
    ...                    [str(i) for i in range(10)], "deepinversion", "resnet34", "ab12...", "0.1.0")
    >>> save_student(student, meta, run_dir / "student.safetensors")
    >>> parity = export_onnx(student, run_dir / "student.onnx", meta.input_shape, holdout_x)
    >>> parity.max_abs_diff < 1e-3
    True
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dfkd_cli.atomic import replace, temporary_sibling
from dfkd_cli import validate
from dfkd_cli.errors import DfkdError, ExportError, shown

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "OnnxParity",
    "StudentMeta",
    "export_onnx",
    "load_student",
    "onnx_predict",
    "onnx_session",
    "save_student",
]

METADATA_PREFIX = "dfkd."
PARITY_BATCH_SIZES = (1, 2, 7)
MIN_OPSET = 18
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its error messages
# Loggers the ONNX exporter and its optimiser chat on; quietened for the duration of an export.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


@dataclass
class StudentMeta:
    """Everything needed to rebuild and use a student, stored as safetensors metadata.

    Example:
        >>> meta = StudentMeta("resnet8", 2, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
        ...                    ["cat", "dog"], "deepinversion", "resnet34", "ab12", "0.1.0")
        >>> StudentMeta.from_metadata(meta.to_metadata()) == meta
        True
    """

    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    recipe: str
    teacher_arch: str
    teacher_sha256: str
    dfkd_version: str
    # Where the student's architecture came from (see dfkd_cli.archs.arch_source); files written
    # before it was recorded lack it and name a registered architecture.
    arch_source: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        """Flat ``str -> str`` mapping (lists JSON-encoded), keys prefixed ``dfkd.``, plus ``format: pt``."""
        metadata = {"format": "pt"}
        for key, value in asdict(self).items():
            if not isinstance(value, str):
                value = json.dumps(list(value) if isinstance(value, tuple) else value)
            metadata[METADATA_PREFIX + key] = value
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> StudentMeta:
        """Inverse of :meth:`to_metadata`, every value checked as a flag would be (a normalisation per
        channel with every std above 0, a CxHxW shape, one distinct name per class); :class:`DfkdError`
        when the metadata is not a dfkd student's or a value is malformed."""
        metadata = metadata or {}
        if METADATA_PREFIX + "arch" not in metadata:
            raise DfkdError("not a dfkd student file (no dfkd metadata); use the student.safetensors a dfkd run writes")
        values: dict[str, Any] = {}
        for item in fields(cls):
            key = METADATA_PREFIX + item.name
            if key not in metadata and item.default_factory is not MISSING:
                continue
            if key not in metadata:
                raise DfkdError(f"dfkd student metadata lacks '{key}'; the file is damaged, re-export it with dfkd")
            values[item.name] = _decode_field(item.name, metadata[key])
        where = {name: f"dfkd student metadata '{METADATA_PREFIX}{name}'" for name in values}
        values["num_classes"] = validate.num_classes(values["num_classes"], where["num_classes"], _REEXPORT)
        values["input_shape"] = validate.input_shape(values["input_shape"], where["input_shape"])
        values["mean"], values["std"] = validate.normalisation(values["mean"], values["std"], values["input_shape"][0],
                                                               where["mean"], where["std"], _REEXPORT)
        values["class_names"] = validate.class_names(values["class_names"], values["num_classes"],
                                                     where["class_names"], _REEXPORT)
        for name in _STRING_FIELDS:
            validate.text(values[name], where[name], fix=_REEXPORT)
        if not isinstance(values.get("arch_source", {}), dict):
            raise DfkdError(f"{where['arch_source']} is not a JSON object; {_REEXPORT}")
        return cls(**values)


_STRING_FIELDS = ("arch", "recipe", "teacher_arch", "teacher_sha256", "dfkd_version")
_REEXPORT = "the file is damaged, re-export it with dfkd"


def _decode_field(name: str, text: str) -> Any:
    """The JSON value of a metadata field (strings are stored as they are); types are checked by the caller."""
    if name in _STRING_FIELDS:
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise DfkdError(
            f"dfkd student metadata '{METADATA_PREFIX}{name}' is malformed ({shown(text)}); {_REEXPORT}"
        ) from error


def save_student(model: nn.Module, meta: StudentMeta, path: Path) -> None:
    """Write ``model``'s weights and ``meta`` to a safetensors file atomically (temp file + rename).

    Example:
        >>> save_student(student, meta, Path("runs/x/student.safetensors"))
    """
    from safetensors.torch import save_file

    path = Path(path)
    # Tied weights (one tensor under two names) cannot both be stored; clone makes each key own its storage.
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}
    with _temporary_sibling(path, suffix=".safetensors") as tmp_path:
        save_file(state, str(tmp_path), metadata=meta.to_metadata())
        replace(tmp_path, path)


def load_student(path: Path) -> tuple[nn.Module, StudentMeta]:
    """Rebuild a student saved by :func:`save_student`: architecture from metadata, strict weights, eval mode.

    Example:
        >>> model, meta = load_student(Path("runs/x/student.safetensors"))
        >>> meta.class_names[:2]
        ['airplane', 'automobile']
    """
    from safetensors import SafetensorError, safe_open

    from dfkd_cli.checkpoint import with_module_versions
    from dfkd_cli.sources import build_model

    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"student file '{path}' not found; check the path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise DfkdError(f"student file '{path}' is not a readable safetensors file ({error}); re-export it with dfkd") from error
    try:
        meta = StudentMeta.from_metadata(metadata)
    except DfkdError as error:
        raise DfkdError(f"'{path}': {error.message}") from error
    model = build_model(meta.arch_source, meta.arch, meta.num_classes, meta.input_shape)
    try:
        model.load_state_dict(with_module_versions(model, state), strict=True)  # safetensors record none
    except RuntimeError as error:
        # The first line only says "Error(s) in loading state_dict"; the second names the key.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        summary = lines[min(1, len(lines) - 1)][:200]
        raise DfkdError(
            f"student file '{path}' does not fit architecture '{meta.arch}' ({summary}); re-export it with this dfkd version"
        ) from error
    return model.eval(), meta


@dataclass
class OnnxParity:
    """How closely the exported ONNX graph (onnxruntime, CPU) reproduces the PyTorch model."""

    batch_sizes: list[int]
    max_abs_diff: float
    top1_agreement: float
    opset: int
    max_abs_logit: float  # the scale the difference is judged against

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the run report."""
        return asdict(self)


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session for the model at ``path``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: keep onnxruntime's warnings off the caller's terminal
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_predict(model: Path | onnxruntime.InferenceSession, x: np.ndarray) -> np.ndarray:
    """Logits from an ONNX model (a path or an open :func:`onnx_session`) for a float32 batch ``x``.

    Example:
        >>> onnx_predict(Path("student.onnx"), np.zeros((2, 3, 32, 32), np.float32)).shape
        (2, 10)
    """
    session = onnx_session(model) if isinstance(model, (str, os.PathLike)) else model
    input_name = session.get_inputs()[0].name
    return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def export_onnx(
    model: nn.Module,
    path: Path,
    input_shape: tuple[int, int, int],
    check_inputs: torch.Tensor,
    atol: float = 1e-3,
    opset: int = MIN_OPSET,
    role: str = "student",
) -> OnnxParity:
    """Export ``model`` to ONNX with a dynamic batch dimension and keep the file only if it matches PyTorch.

    The model is copied to the CPU in eval mode (the caller's module is left as it is) and exported with
    the ``torch.export``-based exporter. onnxruntime then runs rows of ``check_inputs`` (held-out inputs,
    repeated when fewer than needed) at batch sizes 1, 2 and 7. The file is written to a temp path and
    renamed to ``path`` only when the max |difference| is within ``atol`` (relative to the largest |logit|
    when that exceeds 1, as float32 rounding scales with magnitude) and top-1 agreement is 1.0;
    otherwise :class:`ExportError` is raised and no file is left. Nothing is printed. A broken model
    (non-finite or enormous weights; or, when the export or parity fails, non-finite or enormous
    outputs) is refused with that diagnosis: for the ``role`` "student" a training failure with its
    fix (lower train.lr), not an exporter bug.

    Example:
        >>> parity = export_onnx(student, Path("student.onnx"), (3, 32, 32), holdout_x[:16])
        >>> parity.batch_sizes, parity.top1_agreement
        ([1, 2, 7], 1.0)
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is below {MIN_OPSET}, the lowest the dynamo ONNX exporter supports")
    check_inputs = _check_rows(check_inputs, input_shape)
    path = Path(path)
    model = copy.deepcopy(model).to("cpu").eval()
    refuse_broken_model(model, None, role)  # diverged weights: refused before the exporter runs
    try:
        with _temporary_sibling(path, suffix=".onnx") as tmp_path:
            written_opset = _run_exporter(model, tmp_path, input_shape, opset)
            max_abs_diff, top1_agreement, scale = _measure_parity(model, tmp_path, check_inputs)
            parity = OnnxParity(list(PARITY_BATCH_SIZES), max_abs_diff, top1_agreement, written_opset, scale)
            limit = atol * max(1.0, scale)  # absolute for logits up to 1, relative beyond
            if not parity.max_abs_diff <= limit or parity.top1_agreement < 1.0:
                raise ExportError(
                    f"ONNX parity check failed: max |diff| {parity.max_abs_diff:.3g} (limit {limit:.3g} for logits up to "
                    f"{scale:.3g}), top-1 agreement {parity.top1_agreement:.4f} (need 1.0) at batch sizes "
                    f"{parity.batch_sizes}; report this as a bug"
                )
            replace(tmp_path, path)
    except ExportError:
        refuse_broken_model(model, check_inputs, role)  # huge outputs: a diverged model, not the exporter, is to blame
        raise
    return parity


def refuse_broken_model(model: nn.Module, rows: torch.Tensor | None, role: str = "student") -> None:
    """Raise :class:`ExportError` naming the failure when ``model`` is broken: its weights, and with
    ``rows`` its outputs (see :func:`dfkd_cli.validate.broken_model`); for a student, a training failure."""
    problem = validate.broken_weights(model) if rows is None else validate.broken_model(model, rows)
    if problem is None:
        return
    fix = ("training failed (not the ONNX export): lower train.lr, e.g. -s train.lr=0.01, and run again"
           if role == "student" else f"check the {role}'s weights")
    raise ExportError(f"the {role} cannot be exported: {problem}; {fix}")


def _check_rows(check_inputs: torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """``sum(PARITY_BATCH_SIZES)`` float32 CPU rows of ``check_inputs``, cycling when there are fewer."""
    if check_inputs.ndim != 4 or tuple(check_inputs.shape[1:]) != tuple(input_shape) or len(check_inputs) == 0:
        raise ValueError(f"check_inputs must be [N>=1, {', '.join(map(str, input_shape))}], got {list(check_inputs.shape)}")
    needed = sum(PARITY_BATCH_SIZES)
    index = torch.arange(needed) % len(check_inputs)
    return check_inputs.detach().to("cpu", torch.float32)[index]


def _run_exporter(model: nn.Module, path: Path, input_shape: tuple[int, int, int], opset: int) -> int:
    """Export to ``path`` with a dynamic batch; returns the opset actually written."""
    example = torch.zeros(2, *input_shape)  # batch >= 2, else torch.export specialises the batch to 1
    batch = torch.export.Dim("batch")
    try:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                external_data=False,  # one self-contained file that can be renamed atomically
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; all mean the same to the user
        raise ExportError(f"ONNX export failed ({root_cause(error)}); the PyTorch student was saved, report this as a bug") from error
    written_opset, batch_dim = _onnx_signature(path)
    if not isinstance(batch_dim, str):
        raise ExportError(
            f"ONNX export fixed the batch size to {batch_dim} (the model's forward depends on the batch size); "
            "the PyTorch student was saved, report this as a bug"
        )
    return written_opset


def root_cause(error: BaseException) -> str:
    """``Type: first line`` of the innermost exception in the chain, without terminal colour codes."""
    while error.__cause__ is not None:
        error = error.__cause__
    first_line = _ANSI_ESCAPE.sub("", (str(error).strip().splitlines() or [""])[0])
    return f"{type(error).__name__}: {first_line}".rstrip(": ")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's progress lines, warnings and log records off stdout/stderr."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        chatter = io.StringIO()  # the exporter prints progress to stdout and graph dumps to stderr
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@torch.inference_mode()
def _measure_parity(model: nn.Module, path: Path, rows: torch.Tensor) -> tuple[float, float, float]:
    """Max |ONNX - PyTorch|, top-1 agreement and max |PyTorch logit| over ``rows`` split into batches
    of PARITY_BATCH_SIZES."""
    try:
        session = onnx_session(path)
    except Exception as error:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load the exported ONNX model ({root_cause(error)}); report this as a bug") from error
    max_abs_diff, agreeing, start, scale = 0.0, 0, 0, 0.0
    for batch_size in PARITY_BATCH_SIZES:
        batch = rows[start : start + batch_size]
        start += batch_size
        expected = model(batch).numpy()
        try:
            actual = onnx_predict(session, batch.numpy())
        except Exception as error:  # onnxruntime raises its own exception types
            raise ExportError(
                f"the exported ONNX model fails at batch size {batch_size} ({root_cause(error)}); report this as a bug"
            ) from error
        if actual.shape != expected.shape:
            raise ExportError(
                f"ONNX output shape {list(actual.shape)} != PyTorch {list(expected.shape)} at batch size {batch_size}; report this as a bug"
            )
        difference = np.abs(actual - expected)
        # NaN compares False against atol, so a non-finite output must count as an infinite difference.
        max_abs_diff = max(max_abs_diff, float(difference.max()) if np.isfinite(difference).all() else float("inf"))
        agreeing += int((actual.argmax(1) == expected.argmax(1)).sum())
        scale = max(scale, float(np.abs(expected).max()))
    return max_abs_diff, agreeing / start, scale


def _onnx_signature(path: Path) -> tuple[int, str | int]:
    """The model's default-domain opset and its input's batch dimension (a name when dynamic, else a number)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    opset = next(int(entry.version) for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return opset, dim.dim_param if dim.HasField("dim_param") else int(dim.dim_value)


# One helper for every atomic write (umask permissions, temp file removed on failure); the text
# exporter imports it under this name too.
_temporary_sibling = temporary_sibling
