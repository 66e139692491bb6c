"""A text run's synthetic set as an artefact: ``--save-synthetic`` writes it, ``--from-synthetic`` trains on it.

A set is a folder: ``train.jsonl`` and ``holdout.jsonl`` (one ``{"text": ..., "logits": [...]}``
object per line: a synthesized text with the teacher's float32 logits for it) and
``manifest.json`` (``family = "text"``, recipe, teacher sha256, classes, counts). The held-out
texts were never trained on: half selected the student, half were reported. Loading reads JSON
only, checks every row, and refuses a set made for another teacher.

Example:
    >>> save_text_set(Path("runs/x/synthetic"), pool_batch, holdout, teacher, "promptdfd-rl")
    >>> train, holdout, manifest = load_text_set(Path("runs/x/synthetic"), teacher)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dfkd_cli import __version__
from dfkd_cli.batches import TextBatch
from dfkd_cli.errors import DfkdError
from dfkd_cli.synthetic_set import manifest_json, manifest_path
from dfkd_cli.text.models import TextTeacher

FORMAT = 1
_DAMAGED = "the synthetic set is damaged or was edited: save it again with --save-synthetic"


def _write_rows(path: Path, batch: TextBatch) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for text, logits in zip(batch.texts, batch.logits.tolist()):
            handle.write(json.dumps({"text": text, "logits": logits}, ensure_ascii=False) + "\n")


def save_text_set(folder: Path, train: TextBatch, holdout: TextBatch, teacher: TextTeacher, recipe: str) -> dict[str, Any]:
    """Write the set into ``folder`` (created); returns the manifest."""
    folder.mkdir(parents=True)
    _write_rows(folder / "train.jsonl", train)
    _write_rows(folder / "holdout.jsonl", holdout)
    manifest = {"format": FORMAT, "family": "text", "dfkd_version": __version__, "recipe": recipe,
                "teacher_sha256": teacher.sha256, "teacher_arch": teacher.kind, "num_classes": teacher.num_classes,
                "class_names": teacher.class_names, "train_samples": len(train), "holdout_samples": len(holdout)}
    manifest_path(folder).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def is_text_set(folder: Path) -> bool:
    """Whether ``folder`` holds a text synthetic set (its manifest says ``family = "text"``)."""
    try:
        return json.loads(manifest_path(folder).read_text(encoding="utf-8")).get("family") == "text"
    except (OSError, ValueError, AttributeError):
        return False


def text_set_recipe(folder: Path) -> str:
    """The recipe that made the set (``--from-synthetic`` repeats its training settings)."""
    return str(_manifest(folder)["recipe"])


def _manifest(folder: Path) -> dict[str, Any]:
    path, manifest = manifest_path(folder), manifest_json(folder)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("family") != "text":
        raise DfkdError(f"'{path}' is not a dfkd text synthetic set of format {FORMAT}; pass the synthetic/ folder "
                        "of a text run made with --save-synthetic")
    if not isinstance(manifest.get("recipe"), str) or not isinstance(manifest.get("teacher_sha256"), str):
        raise DfkdError(f"'{path}' lacks its recipe or teacher_sha256; {_DAMAGED}")
    return manifest


def _read_rows(path: Path, classes: int) -> TextBatch:
    """Every row of a .jsonl file: a text and ``classes`` finite logits; one-line errors name the line."""
    if not path.is_file():
        raise DfkdError(f"synthetic set file '{path}' is missing; save the set again")
    texts, logits = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DfkdError(f"'{path}' line {number} is not JSON; {_DAMAGED}") from None
        values = row.get("logits") if isinstance(row, dict) else None
        if (not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(values, list)
                or len(values) != classes or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise DfkdError(f"'{path}' line {number} must be {{\"text\": str, \"logits\": [{classes} finite numbers]}}; {_DAMAGED}")
        texts.append(row["text"])
        logits.append(values)
    return TextBatch(texts, torch.tensor(logits, dtype=torch.float32).reshape(len(texts), classes))


def load_text_set(folder: Path, teacher: TextTeacher) -> tuple[TextBatch, TextBatch, dict[str, Any]]:
    """The training texts, held-out texts and manifest of a set made for ``teacher``."""
    manifest = _manifest(folder)
    if manifest["teacher_sha256"] != teacher.sha256:
        raise DfkdError(f"synthetic set '{folder}' was made for another teacher (sha256 {manifest['teacher_sha256'][:12]}, "
                        f"this one {teacher.sha256[:12]}); synthesize again for this teacher")
    if manifest.get("num_classes") != teacher.num_classes:
        raise DfkdError(f"synthetic set '{folder}' was made for {manifest.get('num_classes')} classes but the teacher has "
                        f"{teacher.num_classes}; {_DAMAGED}")
    train = _read_rows(Path(folder) / "train.jsonl", teacher.num_classes)
    holdout = _read_rows(Path(folder) / "holdout.jsonl", teacher.num_classes)
    if len(train) == 0 or len(holdout) < 2:
        raise DfkdError(f"synthetic set '{folder}' holds {len(train)} training and {len(holdout)} held-out texts; "
                        f"it needs at least 1 and 2; {_DAMAGED}")
    return train, holdout, manifest
