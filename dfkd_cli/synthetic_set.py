"""The synthetic set as an artefact: ``--save-synthetic`` writes it, ``--from-synthetic`` trains on it.

A set is a folder: ``train-NNNNN.npz`` shards (``x``: float16 inputs in the teacher's normalised
input space, ``probs``: float16 teacher softmax), ``holdout.npz`` (held-out samples, never trained
on: half selected the student, half were reported) and ``manifest.json`` (recipe, teacher sha256,
input shape, normalisation, classes, counts). Pool recipes save their pool; recipes that make
every batch fresh save a uniform sample of the batches the student trained on.

Example:
    >>> save_synthetic_set(Path("runs/x/synthetic"), pool, holdout, teacher, "cmi")
    >>> data = load_synthetic_set(Path("runs/x/synthetic"), teacher)
    >>> data.train.shape, data.manifest["recipe"]
    (torch.Size([50000, 3, 32, 32]), 'cmi')
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_cli import __version__
from dfkd_cli import validate
from dfkd_cli.errors import DfkdError
from dfkd_cli.evaluate import predict
from dfkd_cli.eval_data import read_npz
from dfkd_cli.teacher import Teacher

FORMAT = 1
SHARD_SAMPLES = 8192
# Fresh-batch recipes keep at most this much of the training stream in memory (float32) for saving.
RECORD_BYTES = 2**30


@dataclass
class SyntheticSet:
    train: torch.Tensor
    holdout: torch.Tensor
    manifest: dict[str, Any]


def record_capacity(input_shape: tuple[int, int, int], limit: int = 50_000) -> int:
    """How many training samples a fresh-batch recipe keeps for ``--save-synthetic``."""
    return max(1, min(limit, RECORD_BYTES // (4 * int(np.prod(input_shape)))))


def _write_npz(path: Path, x: torch.Tensor, probs: torch.Tensor) -> None:
    np.savez(path, x=x.cpu().numpy().astype(np.float16), probs=probs.cpu().numpy().astype(np.float16))


def save_synthetic_set(folder: Path, train: torch.Tensor, holdout: torch.Tensor, teacher: Teacher, recipe: str,
                       sampling: str) -> dict[str, Any]:
    """Write the set into ``folder`` (created); returns the manifest."""
    folder.mkdir(parents=True)
    shards = []
    for index, start in enumerate(range(0, len(train), SHARD_SAMPLES)):
        chunk = train[start : start + SHARD_SAMPLES].cpu()
        name = f"train-{index:05d}.npz"
        _write_npz(folder / name, chunk, F.softmax(predict(teacher.model, chunk), dim=1))
        shards.append(name)
    _write_npz(folder / "holdout.npz", holdout.cpu(), F.softmax(predict(teacher.model, holdout.cpu()), dim=1))
    manifest = {"format": FORMAT, "dfkd_version": __version__, "recipe": recipe, "sampling": sampling,
                "teacher_sha256": teacher.sha256, "teacher_arch": teacher.arch,
                "input_shape": list(teacher.input_shape), "mean": list(teacher.mean), "std": list(teacher.std),
                "num_classes": teacher.num_classes, "class_names": teacher.class_names,
                "space": "normalised teacher inputs", "dtype": "float16",
                "train_samples": len(train), "holdout_samples": len(holdout), "shards": shards}
    manifest_path(folder).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def manifest_path(folder: Path) -> Path:
    """Where a synthetic set folder (image or text) keeps its manifest."""
    return Path(folder) / "manifest.json"


def manifest_json(folder: Path) -> Any:
    """The parsed ``manifest.json`` of a synthetic set folder (image or text); one-line errors when
    the folder or the file is missing or the file is not JSON."""
    path = manifest_path(folder)
    if not Path(folder).is_dir():
        raise DfkdError(f"synthetic set '{folder}' not found; pass the synthetic/ folder of a run made with --save-synthetic")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DfkdError(f"'{folder}' has no manifest.json; pass the synthetic/ folder of a run made with --save-synthetic") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DfkdError(f"'{path}' is not valid JSON; the synthetic set is damaged") from None


def read_manifest(folder: Path) -> dict[str, Any]:
    """The set's manifest; a one-line error when ``folder`` is not a synthetic set."""
    path, manifest = manifest_path(folder), manifest_json(folder)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DfkdError(f"'{path}' is not a dfkd synthetic set of format {FORMAT}")
    where = f"synthetic set manifest '{path}' key"
    for key in ("recipe", "teacher_sha256"):
        validate.text(manifest.get(key), f"{where} '{key}'", fix=_DAMAGED)
    if not isinstance(manifest.get("shards"), list):
        raise validate.fail(f"{where} 'shards'", "a list of shard file names", manifest.get("shards"), _DAMAGED)
    return manifest


_DAMAGED = "the synthetic set is damaged or was edited: save it again with --save-synthetic"


def _check_manifest(manifest: dict[str, Any], folder: Path, teacher: Teacher) -> None:
    """The manifest's shape, normalisation and classes are well-formed and the teacher's own."""
    where = f"synthetic set manifest '{manifest_path(folder)}' key"
    shape = validate.input_shape(manifest.get("input_shape"), f"{where} 'input_shape'")
    if list(shape) != list(teacher.input_shape):
        raise DfkdError(f"synthetic set '{folder}' holds {list(shape)} inputs but the teacher "
                        f"takes {list(teacher.input_shape)}; pass the same --input-shape as when it was made")
    mean, std = validate.normalisation(manifest.get("mean"), manifest.get("std"), shape[0], f"{where} 'mean'",
                                       f"{where} 'std'", _DAMAGED)
    if (mean, std) != (tuple(teacher.mean), tuple(teacher.std)):
        raise DfkdError(f"synthetic set '{folder}' holds inputs normalised with mean {list(mean)}, std {list(std)} but "
                        f"the teacher now uses {list(teacher.mean)}, {list(teacher.std)}; pass the same --mean/--std "
                        "(or --normalize) as when it was made")
    classes = validate.num_classes(manifest.get("num_classes"), f"{where} 'num_classes'", _DAMAGED)
    validate.class_names(manifest.get("class_names"), classes, f"{where} 'class_names'", _DAMAGED)
    if classes != teacher.num_classes:
        raise DfkdError(f"synthetic set '{folder}' was made for {classes} classes but the teacher has "
                        f"{teacher.num_classes}; {_DAMAGED}")


def load_synthetic_set(folder: Path, teacher: Teacher) -> SyntheticSet:
    """Load a set made for ``teacher``; a set made for another teacher or input is refused."""
    manifest = read_manifest(folder)
    if manifest.get("teacher_sha256") != teacher.sha256:
        raise DfkdError(f"synthetic set '{folder}' was made for another teacher (sha256 "
                        f"{str(manifest.get('teacher_sha256'))[:12]}, this one {teacher.sha256[:12]}); "
                        "synthesize again for this teacher")
    _check_manifest(manifest, folder, teacher)
    shape = teacher.input_shape
    shards = [_read_x(Path(folder) / _shard_name(name, folder), shape) for name in manifest["shards"]]
    train = torch.cat(shards) if shards else torch.empty(0, *shape)
    if len(train) == 0:
        raise DfkdError(f"synthetic set '{folder}' holds no training samples")
    return SyntheticSet(train, _read_x(Path(folder) / "holdout.npz", shape), manifest)


def _shard_name(name: Any, folder: Path) -> str:
    """A shard's file name from the manifest, which must name a file in the set's own folder."""
    if not isinstance(name, str) or not re.fullmatch(r"train-\d{5}\.npz", name):
        raise DfkdError(f"synthetic set '{folder}' lists a shard {name!r} that is not a train-NNNNN.npz file "
                        "of its folder; the manifest is damaged or was edited")
    return name


def _read_x(path: Path, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A shard's (or the holdout's) inputs: finite floats ``[N, *input_shape]``."""
    if not path.is_file():
        raise DfkdError(f"synthetic set file '{path}' is missing; save the set again")
    arrays, found = read_npz(path, "synthetic set file", ("x",))
    x = arrays.get("x")
    if x is None or not np.issubdtype(x.dtype, np.floating) or tuple(x.shape[1:]) != tuple(input_shape):
        got = f"{x.dtype} {list(x.shape)}" if x is not None else f"no array 'x' (found: {', '.join(found) or 'nothing'})"
        raise DfkdError(f"synthetic set file '{path}' must hold float inputs 'x' of shape [N, "
                        f"{', '.join(map(str, input_shape))}], got {got}; {_DAMAGED}")
    tensor = torch.from_numpy(x.astype(np.float32))
    if not bool(torch.isfinite(tensor).all()):
        raise DfkdError(f"synthetic set file '{path}' holds NaN or infinite inputs; {_DAMAGED}")
    return tensor
