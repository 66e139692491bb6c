"""The frozen teacher: a registered architecture with a user's weights, input shape and normalisation.

The number of classes and input channels are read from the checkpoint itself (its classifier and
first convolution), so ``dfkd`` needs only ``--arch`` next to the weights file.

Example:
    >>> teacher = load_teacher(Path("wrn40_2_cifar10.pt"), "wrn40_2")
    >>> teacher.num_classes, teacher.input_shape
    (10, (3, 32, 32))
    >>> student = build_student("wrn16_1", teacher)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd_cli import validate
from dfkd_cli.archs import (
    NORMALIZE_PRESETS,
    ArchSpec,
    arch_source,
    classifier_keys,
    classifier_module_name,
    create_model,
    format_shape,
    get_arch,
    list_archs,
    param_shapes,
    stem_keys,
)
from dfkd_cli.checkpoint import read_state_dict, sha256_file, with_module_versions
from dfkd_cli.errors import DfkdError
from dfkd_cli.zoo_lenet import remap_fast_datafree_keys

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Architectures checked for an exact key match when a checkpoint does not fit the chosen one.
_SUGGESTION_FAMILIES = ("cifar", "lenet")
_SUGGESTION_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
PROBE_INPUTS = 4  # random inputs a loaded teacher is run on before any work starts


@dataclass
class Teacher:
    """A frozen, eval-mode model plus what the recipes need to feed it.

    Example:
        >>> teacher.to("cuda").model(torch.zeros(1, *teacher.input_shape, device="cuda")).shape
        torch.Size([1, 10])
    """

    model: nn.Module
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    sha256: str
    path: str
    # Where the architecture came from, as student metadata records it (see archs.arch_source).
    source: dict[str, Any] = field(default_factory=dict)
    default_student: str | None = None
    shape_note: str = ""  # where the input shape came from when no flag gave it (shown in the plan)
    stats_note: str = ""  # where the normalisation came from when no flag gave it
    classifier: str | None = None  # the module whose input is the penultimate feature

    @property
    def bn_layers(self) -> list[str]:
        """Names of the BatchNorm1d/2d modules (their running statistics guide synthesis)."""
        return [name for name, module in self.model.named_modules() if isinstance(module, _BN_TYPES)]

    @property
    def has_bn(self) -> bool:
        return any(isinstance(module, _BN_TYPES) for module in self.model.modules())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def classifier_name(self) -> str:
        """Module whose input is the penultimate feature, e.g. "fc" (hook it to read features)."""
        if self.classifier is not None:
            return self.classifier
        if self.source.get("kind", "registry") in ("registry", "timm"):
            return classifier_module_name(self.arch)
        raise DfkdError(f"the classifier layer of {self.arch} is unknown, so its penultimate features cannot be "
                        "read; pick a recipe that uses only the teacher's logits (e.g. dafl or dfad)")

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self


def parse_input_shape(text: str, where: str = "--input-shape") -> tuple[int, int, int]:
    """"3x32x32" -> (3, 32, 32) (see :func:`dfkd_cli.validate.input_shape`).

    Example:
        >>> parse_input_shape("1x28x28")
        (1, 28, 28)
    """
    return validate.input_shape(text, where)


def _preset_values(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == 3 and channels == 1:  # e.g. ImageNet statistics for a grayscale teacher
        return (sum(values) / 3,)
    return values


def resolve_normalization(
    preset: str | None, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, arch_default: str,
    arch_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std): explicit values win over ``preset``, which wins over ``arch_default``.
    Explicit values are checked as :func:`dfkd_cli.validate.normalisation` checks every source (errors
    name ``--mean``/``--std``, or the file a :class:`~dfkd_cli.validate.SourcedValues` was read from).

    Example:
        >>> resolve_normalization(None, None, None, 1, "imagenet")
        ((0.449,), (0.226,))
    """
    if preset is None and arch_stats is not None:
        (preset_mean, preset_std), label = arch_stats, arch_default
    else:
        name = (preset or arch_default).lower()
        if name not in NORMALIZE_PRESETS:
            choices = ", ".join(NORMALIZE_PRESETS)
            raise DfkdError(f"unknown normalization preset {name!r}; use one of: {choices} (or pass --mean and --std)")
        (preset_mean, preset_std), label = NORMALIZE_PRESETS[name], f"preset {name}"
    return validate.normalisation(
        mean if mean is not None else _preset_values(preset_mean, channels),
        std if std is not None else _preset_values(preset_std, channels),
        channels,
        where_mean=None if mean is not None else f"{label} mean",
        where_std=None if std is not None else f"{label} std",
    )


def read_labels(path: Path, num_classes: int) -> list[str]:
    """Class names, one per line (trailing blank lines ignored): ``num_classes`` distinct names.

    Example:
        >>> read_labels(Path("cifar10_labels.txt"), 10)[:2]
        ['airplane', 'automobile']
    """
    path = Path(path)
    if path.is_dir():
        raise DfkdError(f"labels file '{path}' is a folder; pass a text file with one class name per line")
    if not path.is_file():
        raise DfkdError(f"labels file '{path}' not found; pass a text file with one class name per line")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise DfkdError(f"labels file '{path}' is not UTF-8 text; pass a text file with one class name per line") from None
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise DfkdError(f"labels file '{path}' has an empty line {names.index('') + 1}; put one class name per line")
    return validate.class_names(names, num_classes, f"labels file '{path}'")


def _read_dim(arch: str, state: dict[str, torch.Tensor], keys: dict[str, int]) -> int | None:
    """The size along the probed dimension of the first probed key present in ``state``."""
    expected = param_shapes(arch)
    for key, dim in keys.items():
        tensor = state.get(key)
        if tensor is not None and tensor.dim() == len(expected[key]):
            return int(tensor.shape[dim])
    return None


def _checkpoint_dims(arch: str, state: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(num_classes, in_chans) as found in the checkpoint, None where its keys are absent."""
    return _read_dim(arch, state, classifier_keys(arch)), _read_dim(arch, state, stem_keys(arch))


def fit_state_dict(arch: str, state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(num_classes, in_chans) read from the checkpoint's classifier and first convolution.

    Falls back to the architecture's defaults where the keys are absent (the key check reports it).

    Example:
        >>> fit_state_dict("resnet20", {"fc.weight": torch.zeros(100, 64), "conv1.weight": torch.zeros(16, 3, 3, 3)})
        (100, 3)
    """
    spec = get_arch(arch)
    if spec.family == "lenet":
        state = remap_fast_datafree_keys(state)
    num_classes, in_chans = _checkpoint_dims(spec.name, state)
    return num_classes or _default_num_classes(spec), in_chans or spec.default_input[0]


def _default_num_classes(spec: ArchSpec) -> int:
    return 1000 if spec.family in ("torchvision", "timm") else 10


def _resolve_input_shape(
    spec: ArchSpec, explicit: tuple[int, int, int] | None, ckpt_chans: int | None
) -> tuple[int, int, int]:
    if explicit is None:
        channels = ckpt_chans or spec.default_input[0]
        return (channels, spec.default_input[1], spec.default_input[2])
    if ckpt_chans is not None and explicit[0] != ckpt_chans:
        stem = next(iter(stem_keys(spec.name)))
        raise DfkdError(
            f"input shape {format_shape(explicit)} has {explicit[0]} channels but the checkpoint's "
            f"{stem} takes {ckpt_chans}; pass --input-shape {format_shape((ckpt_chans, *explicit[1:]))}"
        )
    return explicit


def _listing(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
    return f"{label}: {', '.join(items[:3])}{more}"


def _fit_problems(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, up to three of each, as text."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {format_shape(tuple(state[k].shape))} vs model {format_shape(expected[k])}"
        for k in expected if k in state and tuple(state[k].shape) != expected[k]
    ]
    return [
        _listing(label, items)
        for label, items in [("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)]
        if items
    ]


def _same_layout(candidate: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has exactly ``candidate``'s keys, with equal shapes outside head and stem."""
    expected = param_shapes(candidate)
    if get_arch(candidate).family == "lenet":
        state = remap_fast_datafree_keys(state)
    counters = {k for k in expected if k.endswith("num_batches_tracked")}
    if set(state) - counters != set(expected) - counters:
        return False
    free = set(classifier_keys(candidate)) | set(stem_keys(candidate))
    return all(tuple(state[k].shape) == shape for k, shape in expected.items() if k in state and k not in free)


def suggest_archs(state: dict[str, torch.Tensor], exclude: str = "") -> list[str]:
    """Registered zoo / LeNet / torchvision-ResNet architectures whose layout matches ``state``."""
    candidates = [n for n in list_archs() if get_arch(n).family in _SUGGESTION_FAMILIES]
    candidates += list(_SUGGESTION_TORCHVISION)
    return [name for name in candidates if name != exclude and _same_layout(name, state)]


def _check_fits(spec: ArchSpec, state: dict[str, torch.Tensor], num_classes: int, in_chans: int,
                path: Path) -> None:
    problems = _fit_problems(state, param_shapes(spec.name, num_classes, in_chans))
    if not problems:
        return
    matches = suggest_archs(state, exclude=spec.name)
    hint = (f"did you mean --arch {matches[0]}?" if matches
            else "check --arch (list them with `dfkd archs`)")
    raise DfkdError(f"checkpoint '{path}' does not fit {spec.name}: {'; '.join(problems)}; {hint}")


def _with_batch_counters(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the BatchNorm ``num_batches_tracked`` counters that older or converted files lack (and the
    module versions, see :func:`~dfkd_cli.checkpoint.with_module_versions`)."""
    filled = with_module_versions(model, state)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = torch.zeros_like(value)
    return filled


def _check_classes(spec: ArchSpec, num_classes: int, path: Path) -> None:
    """A teacher to distil is a classifier: at least two outputs."""
    if num_classes < validate.MIN_CLASSES:
        head = next(iter(classifier_keys(spec.name)))
        raise DfkdError(f"checkpoint '{path}' is a {num_classes}-output network ({head} has {num_classes} output row); "
                        f"dfkd distils classifiers with at least {validate.MIN_CLASSES} classes")


def _check_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor the model holds as floats is stored as float16/bfloat16/float32/float64 and finite
    (``load_state_dict`` would cast complex or integer values silently)."""
    floats = {key for key, value in model.state_dict().items() if value.is_floating_point()}
    for key, tensor in state.items():
        if key in floats:
            validate.weight(key, tensor, f"checkpoint '{path}'")


@torch.no_grad()
def probe_outputs(model: nn.Module, shape: tuple[int, ...], mean: Sequence[float], std: Sequence[float],
                  where: str) -> None:
    """Run ``model`` on a few random normalised inputs; refuse it when the outputs are non-finite or
    the same for every input (weights that overflow, zeroed or collapsed weights). A local random
    generator leaves the run's seeded ones untouched."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(PROBE_INPUTS, *shape, generator=generator)
    x = (pixels - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    was_training = model.training
    model.eval()
    try:
        outputs = model(x).float()
    finally:
        model.train(was_training)
    validate.distinct_finite_outputs(outputs, where, "check that the checkpoint holds the trained weights "
                                                    "of this --arch (and its --mean/--std)")


def load_teacher(
    path: Path,
    arch: str | None,
    input_shape: tuple[int, int, int] | None = None,
    normalize: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    labels: Path | None = None,
    trust_pickle: bool = False,
) -> Teacher:
    """Load the weights at ``path`` into ``arch``, frozen and in eval mode.

    Example:
        >>> teacher = load_teacher(Path("lenet5_mnist.pt"), "lenet5")
        >>> teacher.mean, teacher.has_bn
        ((0.1307,), False)

    A Hugging Face image folder or a ``.pt2`` program carries its own architecture (``arch`` must
    then be None); see :mod:`dfkd_cli.sources`.
    """
    from dfkd_cli.sources import load_other_teacher, refuse_arch, teacher_kind

    path = Path(path)
    kind = teacher_kind(path)
    refuse_arch(kind, path, arch)
    if kind != "checkpoint":
        return load_other_teacher(kind, path, input_shape, normalize, mean, std, labels, trust_pickle)
    if arch is None:
        raise DfkdError("no teacher architecture given; pass --arch NAME (list them with `dfkd archs`)")
    spec = get_arch(arch)
    state = read_state_dict(path, trust_pickle=trust_pickle)
    if spec.family == "lenet":
        state = remap_fast_datafree_keys(state)
    ckpt_classes, ckpt_chans = _checkpoint_dims(spec.name, state)
    num_classes = ckpt_classes or _default_num_classes(spec)
    shape = _resolve_input_shape(spec, input_shape, ckpt_chans)
    _check_fits(spec, state, num_classes, shape[0], path)
    _check_classes(spec, num_classes, path)
    mean_t, std_t = resolve_normalization(normalize, mean, std, shape[0], spec.default_normalize,
                                          spec.default_stats)
    class_names = read_labels(labels, num_classes) if labels is not None else [str(i) for i in range(num_classes)]

    model = create_model(spec.name, num_classes, shape)
    _check_weights(model, state, path)
    model.load_state_dict(_with_batch_counters(model, state), strict=True)
    model.eval().requires_grad_(False)
    probe_outputs(model, shape, mean_t, std_t, f"teacher '{path}'")
    return Teacher(
        model=model, arch=spec.name, num_classes=num_classes, input_shape=shape, mean=mean_t, std=std_t,
        class_names=class_names, sha256=sha256_file(path), path=str(path), source=arch_source(spec.name),
        default_student=spec.default_student, shape_note=_default_shape_note(spec), stats_note=_default_stats_note(spec, shape),
    )


def _default_shape_note(spec: ArchSpec) -> str:
    return (f"default for {spec.name}: {spec.default_input[1]}x{spec.default_input[2]} pixels, channels from the "
            "checkpoint; set --input-shape CxHxW if the teacher was trained on another size")


def _default_stats_note(spec: ArchSpec, shape: tuple[int, int, int]) -> str:
    stats = spec.default_stats or NORMALIZE_PRESETS[spec.default_normalize]
    averaged = f" averaged over its {len(stats[0])} channels for this 1-channel input" if shape[0] == 1 < len(stats[0]) else ""
    named = (f"its pretrained config's statistics (mean {list(stats[0])}, std {list(stats[1])})" if spec.default_stats
             else f"{spec.default_normalize} statistics")
    return (f"default for {spec.name}: {named}{averaged}; set --normalize or --mean/--std to the teacher's "
            "training normalisation")


def build_student(arch: str, teacher: Teacher) -> nn.Module:
    """A randomly initialised ``arch`` with the teacher's classes and input shape (on the CPU).

    Example:
        >>> build_student("resnet8", teacher)(torch.zeros(2, *teacher.input_shape)).shape
        torch.Size([2, 10])
    """
    from dfkd_cli.sources import build_model, student_source

    return build_model(student_source(arch, teacher), arch, teacher.num_classes, teacher.input_shape)
