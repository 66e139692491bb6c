"""Where an image teacher comes from, and the one place that tells the kinds apart.

A teacher is one of:

- ``checkpoint``: a weights file (.safetensors, .pt, .pth) for a registered architecture named by
  ``--arch`` (dfkd's zoo, torchvision, or ``timm:NAME``);
- ``hf-image``: a Hugging Face image classifier folder (``config.json`` naming an
  ``...ForImageClassification`` model, weights beside it); the architecture is its config;
- ``program``: a ``torch.export`` program (``.pt2``); the architecture is the program itself.

Everything after loading sees a :class:`dfkd_cli.teacher.Teacher`, whatever the kind: the kind only
decides how the model, its defaults (input shape, normalisation, default student) and where each
came from are read.

Example:
    >>> teacher_kind(Path("vit-folder"))
    'hf-image'
    >>> teacher_kind(Path("net.pt2"))
    'program'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfkd_cli.errors import DfkdError

if TYPE_CHECKING:
    from torch import nn

    from dfkd_cli.teacher import Teacher

PROGRAM_SUFFIX = ".pt2"
KINDS = ("checkpoint", "hf-image", "program")


def hf_config(folder: Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict; None when there is none or it is not a JSON object."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def is_image_classifier_config(config: dict[str, Any]) -> bool:
    """Whether a Hugging Face config names an image classification model."""
    architectures = config.get("architectures") or []
    return any(isinstance(name, str) and name.endswith("ForImageClassification") for name in architectures)


def teacher_kind(path: Path) -> str:
    """``program`` for a ``.pt2`` file, ``hf-image`` for a folder whose config names an image
    classifier, ``checkpoint`` for anything else (text folders are told apart by the CLI first)."""
    path = Path(path)
    if path.suffix.lower() == PROGRAM_SUFFIX:
        return "program"
    if path.is_dir():
        config = hf_config(path)
        if config is not None and is_image_classifier_config(config):
            return "hf-image"
    return "checkpoint"


def refuse_arch(kind: str, path: Path, arch: str | None) -> None:
    """``--arch`` names a registered architecture; a folder or a program carries its own."""
    if arch is None or kind == "checkpoint":
        return
    what = "its config.json" if kind == "hf-image" else "the program itself"
    raise DfkdError(f"--arch {arch}: '{path}' is a {kind} teacher whose architecture is {what}; leave out --arch")


def needs_arch(path: Path) -> bool:
    """Whether a teacher at ``path`` needs ``--arch`` (only weights files do)."""
    return teacher_kind(path) == "checkpoint"


def teacher_has_bn(path: Path, arch: str | None) -> bool:
    """Whether the teacher has BatchNorm layers, answered before it is loaded where that is cheap
    (the race picks its entrants with it)."""
    kind = teacher_kind(path)
    if kind == "hf-image":
        from dfkd_cli.hf_image import config_has_bn

        return config_has_bn(hf_config(path) or {})
    if kind == "program":
        from dfkd_cli.program import program_has_bn

        return program_has_bn(path)
    from dfkd_cli.archs import arch_has_bn

    if arch is None:
        raise DfkdError("no teacher architecture given; pass --arch NAME (list them with `dfkd archs`)")
    return arch_has_bn(arch)


def load_other_teacher(kind: str, path: Path, input_shape: tuple[int, int, int] | None, normalize: str | None,
                       mean: list[float] | None, std: list[float] | None, labels: Path | None,
                       trust_pickle: bool) -> Teacher:
    """Load a teacher of a kind other than ``checkpoint`` (see :func:`dfkd_cli.teacher.load_teacher`)."""
    if kind == "hf-image":
        from dfkd_cli.hf_image import load_hf_image_teacher

        return load_hf_image_teacher(path, input_shape, normalize, mean, std, labels, trust_pickle)
    if kind == "program":
        from dfkd_cli.program import load_program_teacher

        return load_program_teacher(path, input_shape, normalize, mean, std, labels)
    raise ValueError(f"unknown teacher kind {kind!r}")


def build_model(source: dict[str, Any], arch: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A randomly initialised model of the architecture ``source`` records (``arch`` names a
    registered one where the source is the registry, timm, or absent: files from older versions)."""
    if source.get("kind") == "hf-image":
        from dfkd_cli.hf_image import model_from_config

        return model_from_config(source["config"], num_classes, input_shape)
    from dfkd_cli.archs import create_model

    return create_model(arch, num_classes, input_shape)


def student_source(name: str, teacher: Teacher) -> dict[str, Any]:
    """Where the student ``name`` (``--student``) comes from, as its metadata records it: a
    Hugging Face image config for ``hf:small`` or a folder with a config.json (see
    :mod:`dfkd_cli.hf_student`), else a registered architecture."""
    from dfkd_cli.archs import arch_source
    from dfkd_cli.hf_student import hf_student_source

    return hf_student_source(name, teacher) or arch_source(name)
