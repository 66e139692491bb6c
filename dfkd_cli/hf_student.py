"""Hugging Face image students: where ``--student`` finds one, and the ``student_hf/`` folder a run writes.

``--student`` names a Hugging Face image student in two ways:

- ``hf:small`` (the default for a Hugging Face image teacher): the teacher's own config made
  shallower and narrower: every depth (``num_hidden_layers``, ``depths``) and every width
  (``hidden_size``, ``intermediate_size``, ``hidden_sizes``, ``embedding_size``, ``embed_dim``...)
  halved, attention heads reduced where the width no longer divides among them;
- a folder holding a ``config.json`` of a built-in image classifier (any teacher): that
  architecture, randomly initialised (weights in the folder are not read).

Either way the student gets the teacher's classes, channels and image size, and its config is
recorded in ``student.safetensors`` (``arch_source``), so ``dfkd eval`` rebuilds it from the file
alone. A run also writes ``student_hf/`` (``config.json``, ``model.safetensors`` and a
``preprocessor_config.json`` with the teacher's input size and normalisation) that
``AutoModelForImageClassification.from_pretrained`` loads.

Example:
    >>> hf_student_source("hf:small", teacher)["config"]["num_hidden_layers"]
    6
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from dfkd_cli.atomic import atomic_write, replace, temporary_folder
from dfkd_cli.errors import DfkdError
from dfkd_cli.hf_image import (
    PROCESSOR_CONFIG,
    SMALL_STUDENT,
    HFImageClassifier,
    image_classifier_names,
    meta_model,
    sized_config,
)

if TYPE_CHECKING:
    from dfkd_cli.teacher import Teacher

STUDENT_HF_DIR = "student_hf"
_DEPTH_KEYS = ("num_hidden_layers", "depths")
_WIDTH_KEYS = ("hidden_size", "intermediate_size", "hidden_sizes", "embedding_size", "embed_dim", "embed_dims",
               "pooler_output_size", "hidden_dim", "neck_hidden_sizes")
_HEAD_KEYS = ("num_attention_heads", "num_heads")


def hf_student_source(name: str, teacher: Teacher) -> dict[str, Any] | None:
    """``{"kind": "hf-image", "config": ...}`` for a Hugging Face student ``name``; None for any
    other name (a registered architecture)."""
    if name == SMALL_STUDENT:
        if teacher.source.get("kind") != "hf-image":
            raise DfkdError(f"--student {SMALL_STUDENT} is a smaller copy of a Hugging Face image teacher's config and "
                            f"{teacher.arch} is not one; pass a registered student (`dfkd archs`) or a folder with a "
                            "config.json")
        return _source(_small_config(teacher), teacher)
    if name.startswith("hf:"):
        raise DfkdError(f"--student {name}: the Hugging Face student names are {SMALL_STUDENT} (the teacher's config, "
                        "halved) or a folder with a config.json")
    folder = Path(name)
    if not folder.is_dir():
        return None
    return _source(_folder_config(folder), teacher)


def _source(config: dict[str, Any], teacher: Teacher) -> dict[str, Any]:
    return {"kind": "hf-image",
            "config": sized_config(config, teacher.num_classes, teacher.input_shape, teacher.class_names)}


def _folder_config(folder: Path) -> dict[str, Any]:
    """The image classifier config in ``folder`` (checked: readable, no ``auto_map``, a built-in type)."""
    from dfkd_cli.text.folders import read_model_config, refuse_remote_code

    where = f"--student '{folder}'"
    config = read_model_config(folder, "--student", "pass a folder with the config.json of an image classifier "
                                                    f"or a registered student (`dfkd archs`), or {SMALL_STUDENT}")
    refuse_remote_code(config, where)
    if config["model_type"] not in image_classifier_names():
        raise DfkdError(f"{where} is a {config['model_type']!r} config, not an image classifier; pass the config.json "
                        "of a transformers image classification model")
    return config


def shrink_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every known depth and width halved (at least 1) and the attention heads
    cut to the largest count that still divides the new width."""
    small = dict(config)
    for key in (*_DEPTH_KEYS, *_WIDTH_KEYS):
        value = small.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            small[key] = max(1, value // 2)
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            small[key] = [max(1, v // 2) for v in value]
    width = small.get("hidden_size", small.get("embed_dim"))
    for key in _HEAD_KEYS:
        heads = small.get(key)
        if isinstance(heads, int) and isinstance(width, int):
            small[key] = math.gcd(heads, width)
    return small


def _small_config(teacher: Teacher) -> dict[str, Any]:
    """The teacher's config halved, refused when that does not give a smaller model."""
    config = teacher.source["config"]
    small = shrink_config(config)
    where = f"{SMALL_STUDENT} of {teacher.arch}"
    try:
        params = sum(p.numel() for p in meta_model(small, where).parameters())
    except DfkdError as error:
        raise DfkdError(f"--student {error.message}; pass --student FOLDER with a smaller config.json") from error
    if small == config or params >= teacher.num_params:
        raise DfkdError(f"--student {SMALL_STUDENT}: dfkd does not know how to shrink a {teacher.arch} config; pass "
                        "--student FOLDER with a smaller config.json")
    return small


def write_hf_student(run_dir: Path, student: nn.Module, teacher: Teacher) -> None:
    """``run_dir/student_hf/`` for a Hugging Face student (nothing for any other): the
    ``save_pretrained`` folder plus a ``preprocessor_config.json`` with the teacher's input size
    and normalisation. Written to a temporary folder and renamed into place."""
    from dfkd_cli.text.export import quiet_transformers

    if not isinstance(student, HFImageClassifier):
        return
    quiet_transformers()
    model = student.hf
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}
    folder = Path(run_dir) / STUDENT_HF_DIR
    staging = temporary_folder(Path(run_dir), f".{STUDENT_HF_DIR}.tmp-")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(staging), state_dict=state)  # safetensors (transformers 5 writes nothing else)
        atomic_write(staging / PROCESSOR_CONFIG, json.dumps(processor_config(teacher), indent=2) + "\n")
        replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def processor_config(teacher: Teacher) -> dict[str, Any]:
    """A plain resize-rescale-normalise image processor at the teacher's input size and statistics."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True, "size": {"height": teacher.input_shape[1], "width": teacher.input_shape[2]},
        "resample": 2,  # bilinear
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(teacher.mean), "image_std": list(teacher.std),
    }
