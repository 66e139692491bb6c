"""Run an exported text student: ONNX logits for a list of texts, with the tokenizer saved beside it.

Example:
    >>> onnx_text_predict(Path("runs/x/student.onnx"), tokenizer, ["a fine film", "dull"], 128).shape
    (2, 2)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfkd_cli.errors import DfkdError
from dfkd_cli.export import onnx_session

if TYPE_CHECKING:
    import onnxruntime


def encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """The tokenizer's padded, truncated int64 arrays for ``texts``."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {name: np.asarray(value, dtype=np.int64) for name, value in encoded.items()}


def session_inputs(encoded: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
    """The session's inputs from a tokenizer's output; ``token_type_ids`` zeros when the tokenizer gives none."""
    inputs = {}
    for name in wanted:
        if name in encoded:
            inputs[name] = encoded[name]
        elif name == "token_type_ids":
            inputs[name] = np.zeros_like(encoded["input_ids"])
        elif name == "attention_mask":
            inputs[name] = np.ones_like(encoded["input_ids"])
        else:
            raise DfkdError(f"the ONNX model wants input '{name}', which the tokenizer does not produce; "
                            "use the tokenizer saved with the student")
    return inputs


def onnx_text_predict(
    path_or_session: Path | onnxruntime.InferenceSession,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Logits ``[len(texts), num_classes]`` (float32) from an exported text student, in the order of ``texts``.

    Texts are batched by token length (less padding), truncated to ``max_length`` tokens.

    Example:
        >>> onnx_text_predict(Path("runs/x/student.onnx"), tokenizer, ["a fine film", "dull"], 128).shape
        (2, 2)
    """
    session = onnx_session(path_or_session) if isinstance(path_or_session, (str, os.PathLike)) else path_or_session
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    texts = [str(text) for text in texts]
    wanted = [value.name for value in session.get_inputs()]
    if not texts:
        classes = session.get_outputs()[0].shape[-1]
        return np.zeros((0, classes if isinstance(classes, int) else 0), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: list[np.ndarray] = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        outputs.append(session.run(None, session_inputs(encode(tokenizer, chunk, max_length), wanted))[0])
    sorted_logits = np.concatenate(outputs, axis=0).astype(np.float32, copy=False)
    logits = np.empty_like(sorted_logits)
    logits[np.asarray(order)] = sorted_logits
    return logits
