"""What every Hugging Face folder dfkd loads must pass: a readable config, no remote code, no unwanted pickles.

Shared by the text teacher and language models (:mod:`dfkd_cli.text.models`) and the student loader
(:mod:`dfkd_cli.text.load`). Every refusal is a one-line :class:`DfkdError`; everything loads with
``local_files_only=True`` and ``trust_remote_code=False``.

Example:
    >>> config = check_folder(Path("bert-sst2"), "teacher", "pass a Hugging Face model folder")
    >>> tokenizer = load_tokenizer(Path("bert-sst2"), "teacher")
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from dfkd_cli.errors import DfkdError
from dfkd_cli.export import root_cause

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # and any other *.bin (shards)
TOKENIZER_CONFIG = "tokenizer_config.json"
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)  # what from_pretrained raises on a bad folder


def read_json(path: Path, what: str) -> Any:
    """``path`` parsed as JSON; a one-line error naming ``what`` when it is unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DfkdError(f"{what} '{path}' is not readable JSON ({root_cause(error)}); fix or re-save the model") from error


def read_model_config(folder: Path, what: str, hint: str) -> dict[str, Any]:
    """``folder/config.json`` as a dict with a ``model_type``; ``hint`` follows the error when it is missing."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DfkdError(f"{what} '{folder}' has no config.json; {hint}")
    config = read_json(path, f"{what} config")
    if not isinstance(config, dict) or "model_type" not in config:
        raise DfkdError(f"{what} config '{path}' has no model_type; it is not a transformers config, re-save the model "
                        "with save_pretrained()")
    return config


def refuse_remote_code(config: Any, what: str) -> None:
    """Refuse a config (model or tokenizer) that names custom code in ``auto_map``."""
    if isinstance(config, dict) and config.get("auto_map"):
        raise DfkdError(f"{what} needs custom code (auto_map in its config); dfkd never runs code shipped with a model: "
                        "use a model class built into transformers")


def refuse_remote_tokenizer(folder: Path, what: str) -> None:
    """Refuse a folder whose ``tokenizer_config.json`` names custom code."""
    path = Path(folder) / TOKENIZER_CONFIG
    if path.is_file():
        refuse_remote_code(read_json(path, "tokenizer config"), f"{what} tokenizer '{folder}'")


def has_weights(folder: Path) -> bool:
    """Whether the folder holds weights of any kind dfkd knows (safetensors or pickles)."""
    return _has_safe_weights(folder) or _has_pickle_weights(folder)


def check_weights(folder: Path, what: str, trust_pickle: bool = False, offer_flag: bool = True) -> None:
    """Refuse a folder without safetensors weights: none at all, or pickles only (unless ``trust_pickle``).

    ``offer_flag`` says whether the user can pass ``--trust-pickle`` for this input; when not, the
    error only says how to convert the pickles.
    """
    if _has_safe_weights(folder):
        return
    if not _has_pickle_weights(folder):
        raise DfkdError(f"{what} '{folder}' has no weights (model.safetensors); save the model with save_pretrained()")
    if trust_pickle:
        return
    remedy = (", or pass --trust-pickle if you trust the file" if offer_flag
              else " (load the model in a trusted Python and call model.save_pretrained(folder))")
    raise DfkdError(f"{what} '{folder}' has only pickled weights (pytorch_model.bin), which can run code when loaded; "
                    f"convert them to model.safetensors{remedy}")


def check_folder(folder: Path, what: str, hint: str, trust_pickle: bool = False, offer_flag: bool = True) -> dict[str, Any]:
    """The folder's config.json, after refusing what dfkd does not load (remote code, unwanted pickles)."""
    config = read_model_config(folder, what, hint)
    refuse_remote_code(config, f"{what} '{folder}'")
    refuse_remote_tokenizer(folder, what)
    check_weights(folder, what, trust_pickle, offer_flag)
    return config


def load_pretrained(loader: Any, folder: Path, what: str, part: str,
                    hint: str = "re-save it with save_pretrained()", **kwargs: Any) -> Any:
    """``loader.from_pretrained(folder)``, local files only and no remote code, quietly; a one-line error on failure."""
    from dfkd_cli.text.export import quiet_transformers

    quiet_transformers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **kwargs)
    except LOAD_ERRORS as error:
        raise DfkdError(f"{what} '{folder}': cannot load the {part} ({root_cause(error)}); {hint}") from error


def load_tokenizer(folder: Path, what: str) -> Any:
    """The folder's tokenizer (``AutoTokenizer``), locally; a one-line error on failure."""
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, folder, what, "tokenizer",
                           "save the tokenizer into the folder with tokenizer.save_pretrained()")


def _has_safe_weights(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in SAFE_WEIGHTS)


def _has_pickle_weights(folder: Path) -> bool:
    folder = Path(folder)
    return any((folder / name).is_file() for name in PICKLE_WEIGHTS) or any(p.is_file() for p in folder.glob("*.bin"))
