"""Read a text student back: from its ``student/`` folder, its run folder or its ``student.safetensors``.

Local files only: no code shipped with a model runs and no pickle is ever loaded (the folder checks
are :mod:`dfkd_cli.text.folders`, shared with the teacher). What is read is what
:func:`dfkd_cli.text.export.save_text_student` writes.

Example:
    >>> model, tokenizer, meta = load_text_student(Path("runs/x/student.safetensors"))
    >>> meta["class_names"]
    ['negative', 'positive']
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from dfkd_cli.errors import DfkdError
from dfkd_cli.export import METADATA_PREFIX, root_cause
from dfkd_cli.text.export import FAMILY, STUDENT_DIR, STUDENT_FILE, quiet_transformers
from dfkd_cli.text.folders import (
    check_folder,
    load_pretrained,
    load_tokenizer,
    refuse_remote_code,
    refuse_remote_tokenizer,
)

__all__ = ["load_text_student"]

_NO_CONFIG_HINT = ("pass the student/ folder a dfkd text run writes (or a folder written by save_pretrained()), "
                   "its run folder or its student.safetensors")


def load_text_student(path: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A text student (eval mode), its tokenizer and its dfkd metadata, from local files only.

    ``path`` may be the ``student/`` folder (or any Hugging Face classifier folder), a run folder
    that holds ``student/``, or a ``student.safetensors``; in the last case the model is rebuilt from
    the file's ``dfkd.config`` and the tokenizer is read from the sibling ``student/`` folder. No code
    shipped with a model runs and no pickle is ever loaded. ``meta`` holds the decoded ``dfkd.*``
    metadata without ``config`` (``family``, ``class_names``, ``recipe``, ``max_length``...); for a
    folder it comes from the sibling ``student.safetensors`` when there is one, and ``class_names``
    falls back to the config's ``id2label``.

    Example:
        >>> model, tokenizer, meta = load_text_student(Path("runs/x"))
        >>> meta["class_names"]
        ['negative', 'positive']
    """
    quiet_transformers()
    path = Path(path)
    if not path.exists():
        raise DfkdError(f"student '{path}' not found; pass a text run folder, its student/ folder or its student.safetensors")
    if path.is_file():
        if path.suffix != ".safetensors":
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
                raise DfkdError(f"student '{path}' is a pickle, which can run code when loaded; dfkd refuses pickles: "
                                "convert it to safetensors (model.save_pretrained(folder) in a trusted Python)")
            raise DfkdError(f"student '{path}' is not a .safetensors file; pass a text run folder, its student/ folder "
                            "or its student.safetensors")
        return _load_from_safetensors(path)
    folder = path
    if not (folder / "config.json").is_file() and (folder / STUDENT_DIR / "config.json").is_file():
        folder = folder / STUDENT_DIR
    return _load_from_folder(folder)


def _load_from_folder(folder: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import AutoModelForSequenceClassification

    check_folder(folder, "student", _NO_CONFIG_HINT, offer_flag=False)  # pickles are refused, there is no flag
    model, info = load_pretrained(AutoModelForSequenceClassification, folder, "student", "classifier",
                                  "re-save it with save_pretrained() or re-run dfkd",
                                  use_safetensors=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise DfkdError(f"student '{folder}' lacks weights for {len(missing)} parameter(s) (e.g. '{missing[0]}'); "
                        "the folder is incomplete or holds another model, re-save it with save_pretrained()")
    tokenizer = load_tokenizer(folder, "student")
    sibling = folder.parent / STUDENT_FILE
    metadata = _read_header(sibling) if folder.name == STUDENT_DIR and sibling.is_file() else {}
    if metadata.get(METADATA_PREFIX + "family") != FAMILY:
        metadata = {}
    return model.eval(), tokenizer, _decode_meta(metadata, model.config)


def _load_from_safetensors(path: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise DfkdError(f"student file '{path}' is not a readable safetensors file ({root_cause(error)}); "
                        "re-export it with dfkd") from error
    family = metadata.get(METADATA_PREFIX + "family")
    if family != FAMILY:
        if METADATA_PREFIX + "arch" in metadata:
            raise DfkdError(f"student file '{path}' is an image student, not a text one; load it with the image commands")
        raise DfkdError(f"student file '{path}' is not a dfkd text student (no dfkd.family=text metadata); "
                        "use the student.safetensors a dfkd text run writes, or its student/ folder")
    try:
        config_dict = json.loads(metadata[METADATA_PREFIX + "config"])
        model_type = config_dict.pop("model_type")
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise DfkdError(f"student file '{path}' has no usable dfkd.config metadata; the file is damaged, "
                        "re-export it with dfkd") from error
    refuse_remote_code(config_dict, f"student file '{path}'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.for_model(model_type, **config_dict)
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as error:
        raise DfkdError(f"student file '{path}': cannot rebuild a '{model_type}' classifier ({root_cause(error)}); "
                        "this transformers version may not know the architecture, upgrade transformers") from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        summary = lines[min(1, len(lines) - 1)][:200]
        raise DfkdError(f"student file '{path}' does not fit its own config ({summary}); re-export it with dfkd") from error
    folder = path.parent / STUDENT_DIR
    if not folder.is_dir():
        raise DfkdError(f"student file '{path}' needs its tokenizer from the sibling folder '{folder}', which is missing; "
                        "keep the student/ folder of the run next to student.safetensors")
    refuse_remote_tokenizer(folder, "student")
    tokenizer = load_tokenizer(folder, "student tokenizer folder")
    return model.eval(), tokenizer, _decode_meta(metadata, model.config)


def _read_header(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (header only, tensors are not read); empty when unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def _decode_meta(metadata: dict[str, str], config: Any) -> dict[str, Any]:
    """``dfkd.<key>`` -> ``key``: JSON-decoded (raw text when not JSON); ``class_names`` from id2label if absent."""
    meta: dict[str, Any] = {}
    for key, text in metadata.items():
        if not key.startswith(METADATA_PREFIX) or key == METADATA_PREFIX + "config":
            continue
        name = key[len(METADATA_PREFIX) :]
        if name == "family":
            meta[name] = text
            continue
        try:
            meta[name] = json.loads(text)
        except ValueError:
            meta[name] = text
    if not isinstance(meta.get("class_names"), list):
        count = int(config.num_labels)
        id2label = getattr(config, "id2label", None) or {}
        meta["class_names"] = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(count)]
    return meta
