"""Write the text student: a Hugging Face folder, a self-describing safetensors file, and ONNX behind a parity gate.

Reading a student back is :func:`dfkd_cli.text.load.load_text_student`.

A text run leaves three things behind:

- ``student/``: ``save_pretrained`` output (config, ``model.safetensors``, tokenizer), loadable by
  ``AutoModelForSequenceClassification.from_pretrained`` and ``AutoTokenizer.from_pretrained``;
- ``student.safetensors``: the weights with ``dfkd.*`` metadata (``dfkd.family`` = ``text``, the
  model config as JSON in ``dfkd.config``, and the run's class names, recipe, provenance...), so the
  network can be rebuilt from this one file (the tokenizer comes from the sibling ``student/``);
- ``student.onnx`` (optional): inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
  the model takes them), output ``logits``, dynamic batch and sequence axes; only kept when
  onnxruntime reproduces the PyTorch logits on real texts at several batch sizes and lengths.

Example:
    >>> sizes = save_text_student(model, tokenizer, {"class_names": ["neg", "pos"], "max_length": 128}, run_dir)
    >>> model, tokenizer, meta = load_text_student(run_dir / "student.safetensors")
    >>> parity = export_text_onnx(model, tokenizer, run_dir / "student.onnx", holdout_texts)
    >>> logits = onnx_text_predict(run_dir / "student.onnx", tokenizer, ["a fine film"], max_length=128)

Running the ONNX student is :mod:`dfkd_cli.text.onnx_predict` (``onnx_text_predict`` is re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfkd_cli.atomic import replace, temporary_folder
from dfkd_cli.errors import ExportError
from dfkd_cli.export import (
    METADATA_PREFIX,
    MIN_OPSET,
    _onnx_signature,
    _quiet_exporter,
    root_cause,
    _temporary_sibling,
    onnx_session,
)
from dfkd_cli.text.onnx_predict import encode, onnx_text_predict, session_inputs

__all__ = [
    "STUDENT_DIR",
    "STUDENT_FILE",
    "TEXT_PARITY_BATCH_SIZES",
    "export_text_onnx",
    "onnx_text_predict",
    "quiet_transformers",
    "save_text_student",
]

STUDENT_DIR = "student"
STUDENT_FILE = "student.safetensors"
FAMILY = "text"
TEXT_PARITY_BATCH_SIZES = (1, 3, 8)
PARITY_MAX_TEXTS = 256  # check texts tokenised to pick short and long ones; more adds time, not coverage
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def quiet_transformers() -> None:
    """Keep transformers' progress bars ("Loading weights", "Writing model shards") and warnings off the terminal.

    Process-wide and idempotent: call it before any transformers call whose output would reach the user.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:  # the hub client draws its own bars (downloads, uploads) and is not always installed separately
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        pass


# --------------------------------------------------------------------------------------------- save


def save_text_student(model: nn.Module, tokenizer: Any, meta: dict[str, Any], run_dir: Path) -> dict[str, int]:
    """Write ``run_dir/student/`` (Hugging Face folder) and ``run_dir/student.safetensors`` (weights + metadata).

    ``meta`` (class_names, recipe, teacher, teacher_sha256, version, max_length, ...) is stored as
    ``dfkd.<key>`` = JSON of the value, next to ``dfkd.family`` = ``text`` and ``dfkd.config`` (the
    model config as JSON). Both outputs are written to temporary siblings and renamed into place, so
    an interrupted save never leaves a half-written student. Returns the sizes in bytes.

    Example:
        >>> save_text_student(student, tokenizer, {"class_names": ["negative", "positive"]}, Path("runs/x"))
        {'student_dir': 17893114, 'student.safetensors': 17599384}
    """
    from safetensors.torch import save_file

    quiet_transformers()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = run_dir / STUDENT_DIR
    file = run_dir / STUDENT_FILE
    metadata = _text_metadata(model, meta)

    # Contiguous CPU copies: every key owns its storage, so weights shared between modules (which
    # safetensors cannot store twice, and save_pretrained refuses unless declared tied) save as two tensors.
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}

    tmp_folder = temporary_folder(run_dir, f".{STUDENT_DIR}.tmp-")  # umask permissions, unlike mkdtemp's 0700
    try:
        kwargs: dict[str, Any] = {"state_dict": dict(state)}  # a copy: save_pretrained pops what it writes
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(tmp_folder), **kwargs)
            tokenizer.save_pretrained(str(tmp_folder))
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        elif folder.exists() or folder.is_symlink():
            folder.unlink()
        replace(tmp_folder, folder)
    finally:
        shutil.rmtree(tmp_folder, ignore_errors=True)

    with _temporary_sibling(file, suffix=".safetensors") as tmp_path:
        save_file(state, str(tmp_path), metadata=metadata)
        replace(tmp_path, file)

    folder_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"student_dir": folder_bytes, STUDENT_FILE: file.stat().st_size}


def _text_metadata(model: nn.Module, meta: dict[str, Any]) -> dict[str, str]:
    """``format: pt``, ``dfkd.family``, ``dfkd.config`` and ``dfkd.<key>`` = JSON for every key of ``meta``."""
    metadata = {"format": "pt", METADATA_PREFIX + "family": FAMILY, METADATA_PREFIX + "config": model.config.to_json_string()}
    for key, value in meta.items():
        if key in ("family", "config"):
            raise ValueError(f"meta key '{key}' is reserved for the text exporter")
        metadata[METADATA_PREFIX + key] = json.dumps(value, default=str)
    return metadata


# --------------------------------------------------------------------------------------------- ONNX


class _LogitsOnly(nn.Module):
    """``model(...).logits`` with the inputs as named tensors (the exporter names graph inputs after them)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **extra).logits


def _model_input_names(model: nn.Module) -> tuple[str, ...]:
    """``input_ids``, ``attention_mask`` and ``token_type_ids`` when the model's forward takes it."""
    parameters = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in parameters and int(getattr(model.config, "type_vocab_size", 2) or 0) > 0:
        names.append("token_type_ids")
    return tuple(names)


def export_text_onnx(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    check_texts: list[str],
    max_length: int = 128,
    atol: float = 1e-3,
) -> dict[str, Any]:
    """Export a sequence classifier to ONNX (dynamic batch and sequence axes) and keep it only if it matches PyTorch.

    The model is copied to the CPU in eval mode and exported with the ``torch.export``-based exporter
    (``dynamo=True``). onnxruntime then runs ``check_texts`` at batch sizes 1, 3 and 8 as short texts,
    long texts and batches mixing both (so padding and the attention mask matter), plus a text longer
    than ``max_length`` (truncation); at most the first ``PARITY_MAX_TEXTS`` texts are used.
    ``max_length`` is capped at the positions the model has (``max_position_embeddings``, less
    RoBERTa's padding offset) and is returned as ``max_length``. The file is written to a temp
    sibling and renamed to ``path`` only when max |diff| <= ``atol`` (relative to the largest |logit|
    when that exceeds 1) and top-1 agreement is 1.0; otherwise :class:`ExportError` is raised and no
    file is left. Nothing is printed.

    Example:
        >>> export_text_onnx(student, tokenizer, Path("student.onnx"), holdout_texts)["top1_agreement"]
        1.0
    """
    texts = [str(text) for text in check_texts if str(text).strip()][:PARITY_MAX_TEXTS]
    if not texts:
        raise ValueError("check_texts must hold at least one non-empty text")
    quiet_transformers()
    path = Path(path)
    model = copy.deepcopy(model).to("cpu").eval()
    max_length = _cap_length(model, tokenizer, max_length)
    names = _model_input_names(model)
    batches = _parity_batches(tokenizer, texts, max_length)
    with _temporary_sibling(path, suffix=".onnx") as tmp_path:
        opset = _run_text_exporter(model, tokenizer, tmp_path, names, texts, max_length)
        max_abs_diff, top1_agreement, scale, lengths = _measure_text_parity(model, tmp_path, tokenizer, batches, max_length)
        limit = atol * max(1.0, scale)  # absolute for logits up to 1, relative beyond
        sizes = sorted({len(batch) for _, batch in batches})
        if not max_abs_diff <= limit or top1_agreement < 1.0:
            raise ExportError(
                f"ONNX parity check failed: max |diff| {max_abs_diff:.3g} (limit {limit:.3g} for logits up to {scale:.3g}), "
                f"top-1 agreement {top1_agreement:.4f} (need 1.0) at batch sizes {sizes} and lengths {lengths}; "
                "the PyTorch student was saved, report this as a bug"
            )
        replace(tmp_path, path)
    return {
        "batch_sizes": sizes,
        "lengths": lengths,
        "max_abs_diff": max_abs_diff,
        "top1_agreement": top1_agreement,
        "opset": opset,
        "inputs": list(names),
        "max_length": max_length,
        "max_abs_logit": scale,
    }


def _cap_length(model: nn.Module, tokenizer: Any, max_length: int) -> int:
    """``max_length`` capped at the positions the model has (and the tokenizer's own limit, when it sets one)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (room for the special tokens), got {max_length}")
    limit = int(max_length)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 1:
        limit = min(limit, positions)
    for name, module in model.named_modules():
        # RoBERTa-style position ids start after the padding index, so fewer positions are usable.
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            limit = min(limit, module.num_embeddings - module.padding_idx - 1)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 1 < tokenizer_limit < 1_000_000:  # unset limits are ~1e30
        limit = min(limit, tokenizer_limit)
    return max(2, limit)


def _parity_batches(tokenizer: Any, texts: list[str], max_length: int) -> list[tuple[str, list[str]]]:
    """``(kind, texts)`` batches at every TEXT_PARITY_BATCH_SIZES: short, long, and mixed (short + long + over-long)."""
    lengths = [len(tokenizer(text, truncation=False)["input_ids"]) for text in texts]
    by_length = [text for _, text in sorted(zip(lengths, texts), key=lambda pair: pair[0])]
    # Longer than max_length, so truncation is exercised however short the check texts are.
    overlong = " ".join(by_length[::-1][:32])
    for _ in range(16):  # bounded: a text of characters the tokenizer drops never grows
        if len(tokenizer(overlong, truncation=False)["input_ids"]) > max_length:
            break
        overlong = f"{overlong} {overlong}"

    def take(pool: list[str], count: int) -> list[str]:
        return [pool[i % len(pool)] for i in range(count)]

    half = max(1, len(by_length) // 2)
    short, long = by_length[:half], by_length[::-1][:half]
    batches: list[tuple[str, list[str]]] = []
    for size in TEXT_PARITY_BATCH_SIZES:
        batches.append(("short", take(short, size)))
        batches.append(("long", take(long, size)))
        if size == 1:
            batches.append(("overlong", [overlong]))
        else:
            mixed = [overlong] + [text for pair in zip(take(short, size), take(long, size)) for text in pair]
            batches.append(("mixed", mixed[:size]))
    return batches


def _run_text_exporter(model: nn.Module, tokenizer: Any, path: Path, names: tuple[str, ...], texts: list[str], max_length: int) -> int:
    """Export to ``path`` with dynamic batch and sequence axes; returns the opset actually written."""
    # Two rows of different lengths (so the example is padded and the mask is real); batch 2 and a length
    # of at least 3 that differs from it, as torch.export specialises sizes 0 and 1 and may unify equal sizes.
    example_texts = [min(texts, key=len), max(texts, key=len)]
    encoded = encode(tokenizer, example_texts, max_length)
    ids = torch.from_numpy(encoded["input_ids"])
    example = tuple(torch.from_numpy(encoded[name]) if name in encoded else torch.zeros_like(ids) for name in names)
    if example[0].shape[1] < 3:
        example = tuple(torch.cat([t, t[:, -1:].expand(-1, 3 - t.shape[1])], dim=1) for t in example)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapper = _LogitsOnly(model).eval()
    try:
        with _quiet_exporter(), _quiet_loggers("transformers"):
            torch.onnx.export(
                wrapper,
                example,
                str(path),
                dynamo=True,
                opset_version=MIN_OPSET,
                input_names=list(names),
                output_names=["logits"],
                dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
                external_data=False,  # one self-contained file that can be renamed atomically
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; all mean the same to the user
        raise ExportError(f"ONNX export failed ({root_cause(error)}); the PyTorch student was saved, report this as a bug") from error
    opset, _ = _onnx_signature(path)
    fixed = {name: dims for name, dims in _onnx_input_dims(path).items() if not all(isinstance(d, str) for d in dims[:2])}
    if fixed:
        name, dims = next(iter(fixed.items()))
        raise ExportError(f"ONNX export fixed the shape of '{name}' to {dims} instead of dynamic batch and sequence axes; "
                          "the PyTorch student was saved, report this as a bug")
    return opset


def _onnx_input_dims(path: Path) -> dict[str, list[str | int]]:
    """Each graph input's dimensions: a name when symbolic, else a number."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        value.name: [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in value.type.tensor_type.shape.dim]
        for value in proto.graph.input
    }


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the named loggers to ERROR for the duration (transformers logs notes while being traced)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@torch.inference_mode()
def _measure_text_parity(
    model: nn.Module, path: Path, tokenizer: Any, batches: list[tuple[str, list[str]]], max_length: int
) -> tuple[float, float, float, list[int]]:
    """Max |ONNX - PyTorch|, top-1 agreement, max |PyTorch logit| and the padded lengths seen, over ``batches``."""
    try:
        session = onnx_session(path)
    except Exception as error:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime cannot load the exported ONNX model ({root_cause(error)}); report this as a bug") from error
    wanted = [value.name for value in session.get_inputs()]
    max_abs_diff, agreeing, rows, scale, lengths = 0.0, 0, 0, 0.0, set()
    for kind, texts in batches:
        encoded = encode(tokenizer, texts, max_length)
        inputs = session_inputs(encoded, wanted)
        lengths.add(int(encoded["input_ids"].shape[1]))
        expected = model(**{name: torch.from_numpy(value) for name, value in inputs.items()}).logits.float().numpy()
        try:
            actual = session.run(None, inputs)[0]
        except Exception as error:  # onnxruntime raises its own exception types
            raise ExportError(
                f"the exported ONNX model fails on {kind} texts at batch size {len(texts)}, length "
                f"{encoded['input_ids'].shape[1]} ({root_cause(error)}); report this as a bug"
            ) from error
        if actual.shape != expected.shape:
            raise ExportError(f"ONNX output shape {list(actual.shape)} != PyTorch {list(expected.shape)} on {kind} texts at "
                              f"batch size {len(texts)}; report this as a bug")
        difference = np.abs(actual - expected)
        # NaN compares False against atol, so a non-finite output must count as an infinite difference.
        max_abs_diff = max(max_abs_diff, float(difference.max()) if np.isfinite(difference).all() else float("inf"))
        agreeing += int((actual.argmax(1) == expected.argmax(1)).sum())
        rows += len(texts)
        scale = max(scale, float(np.abs(expected).max()))
    return max_abs_diff, agreeing / rows, scale, sorted(lengths)
