"""Architecture registry: model factories registered by name, like timm's ``create_model``.

Every torchvision classification model is registered under its torchvision name, next to the
CIFAR-style zoo and LeNet-5 from :mod:`dfkd_cli.zoo`. Parameter names match the published
checkpoints of each family, so users' weights load without renaming.

Example:
    >>> from dfkd_cli.archs import create_model, list_archs
    >>> list_archs("wrn*")
    ['wrn16_1', 'wrn16_2', 'wrn40_1', 'wrn40_2']
    >>> model = create_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from dfkd_cli.errors import DfkdError

NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # The std used by the CIFAR-10 teachers of the DFKD literature (CMI, Fast-Datafree, ...).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
}


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    Example:
        >>> spec = get_arch("resnet20")
        >>> spec.factory(10, 3)  # num_classes, in_chans -> randomly initialised nn.Module
    """

    name: str
    family: str
    default_input: tuple[int, int, int]
    default_normalize: str
    default_student: str | None
    factory: Callable[[int, int], nn.Module]
    description: str
    # The architecture's own (mean, std), e.g. from timm's pretrained config; when set it is the
    # default and ``default_normalize`` only names it in messages.
    default_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


_REGISTRY: dict[str, ArchSpec] = {}
_BUILTINS_LOADED = False


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry (a name can be registered once) and return it.

    Example:
        >>> register_arch(ArchSpec("tiny", "cifar", (3, 32, 32), "cifar10", None, make_tiny, "my net"))
    """
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_builtins() -> None:
    """Register the zoo and torchvision on first use (keeps ``import dfkd_cli.archs`` cheap)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import dfkd_cli.zoo  # noqa: F401  (registers the CIFAR zoo and LeNet-5 on import)

    _register_torchvision()


def list_archs(pattern: str = "*") -> list[str]:
    """Registered names matching the glob ``pattern``, sorted.

    Example:
        >>> list_archs("resnet*")[:3]
        ['resnet101', 'resnet110', 'resnet152']
    """
    if pattern.strip().lower().startswith("timm:"):  # timm's models are listed only when asked for
        from dfkd_cli.archs_timm import list_timm_archs

        return list_timm_archs(pattern)
    _ensure_builtins()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern.lower()))


def normalize_arch_name(name: str) -> str:
    """Lower case with ``-``, ``.`` and spaces turned into ``_`` ("WRN-16-1" -> "wrn_16_1")."""
    text = name.strip().lower()
    for char in "-. ":
        text = text.replace(char, "_")
    return text


def get_arch(name: str) -> ArchSpec:
    """The spec registered as ``name``; tolerant of case and separators ("WRN-16-1" -> wrn16_1).

    Example:
        >>> get_arch("lenet5-half").name
        'lenet5_half'
    """
    if name.strip().lower().startswith("timm:"):
        from dfkd_cli.archs_timm import timm_spec

        return timm_spec(name)
    _ensure_builtins()
    key = normalize_arch_name(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    squashed = [n for n in _REGISTRY if n.replace("_", "") == key.replace("_", "")]
    if len(squashed) == 1:
        return _REGISTRY[squashed[0]]
    from dfkd_cli.archs_timm import timm_alternative

    close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.6)
    close = ([alternative] if (alternative := timm_alternative(name)) else []) + close[:3 - bool(alternative)]
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    raise DfkdError(f"unknown architecture {name!r}; {hint}(list them with `dfkd archs`)")


def default_student(name: str) -> str:
    """The registered default student of ``name``.

    Example:
        >>> default_student("wrn40_2")
        'wrn16_1'
    """
    spec = get_arch(name)
    if spec.default_student is None:
        raise DfkdError(f"no default student for {spec.name}; pass --student NAME")
    return spec.default_student


def arch_source(name: str) -> dict[str, str]:
    """Where a registered architecture comes from, as the student metadata and report record it.

    Example:
        >>> arch_source("resnet20")
        {'kind': 'registry', 'name': 'resnet20'}
    """
    spec = get_arch(name)
    return {"kind": "timm" if spec.family == "timm" else "registry", "name": spec.name}


def format_shape(shape: tuple[int, ...]) -> str:
    """(3, 32, 32) -> "3x32x32"."""
    return "x".join(str(d) for d in shape)


def create_model(name: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """Build ``name`` on the CPU with random weights and check it accepts ``input_shape``.

    Example:
        >>> model = create_model("lenet5", num_classes=10, input_shape=(1, 32, 32))
        >>> model(torch.zeros(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """
    spec = get_arch(name)
    if num_classes < 1:
        raise DfkdError(f"number of classes must be at least 1, got {num_classes}; check the checkpoint")
    model = spec.factory(num_classes, input_shape[0])
    reason = _forward_problem(model, input_shape, num_classes)
    if reason is not None:
        raise DfkdError(
            f"architecture {spec.name} cannot take input shape {format_shape(input_shape)}: {reason}; "
            f"pass --input-shape CxHxW (default for {spec.name}: {format_shape(spec.default_input)})"
        )
    return model


def arch_has_bn(name: str) -> bool:
    """Whether architecture ``name`` has BatchNorm layers (built on the meta device: no memory)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build_on_meta(name).modules())


def _forward_problem(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> str | None:
    """Why one zero sample of ``input_shape`` does not give [1, num_classes] logits, or None."""
    was_training = model.training
    model.eval()  # train-mode BatchNorm refuses a batch of one 1x1 map
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        if "allocate" in lines[0]:  # torch's allocator message is long and names C++ sources
            return "one sample of this shape does not fit in memory"
        return lines[0][:160]
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"output is {got}, expected (1, {num_classes})"
    return None


# --- probing parameter names (cheap: built on the meta device) ---------------------------------


@functools.cache
def param_shapes(name: str, num_classes: int = 7, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Shapes of ``name``'s state dict (parameters and buffers), built without allocating.

    Example:
        >>> param_shapes("lenet5")["conv1.weight"]
        (6, 1, 5, 5)
    """
    try:
        model = build_on_meta(name, num_classes, in_chans)
    except NotImplementedError:  # a factory that reads values from the tensors it allocates: build for real
        model = get_arch(name).factory(num_classes, in_chans)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


class _WeightsOnMeta(TorchFunctionMode):
    """Tensors made by the allocating factories (weights, buffers) go to the meta device; those made by
    ``arange`` or ``tensor`` stay on the CPU: RegNet computes its widths with them, so it cannot be
    built under ``torch.device("meta")``."""

    ALLOCATORS = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = {**(kwargs or {}), "device": "meta"} if func in self.ALLOCATORS else (kwargs or {})
        return func(*args, **kwargs)


def build_on_meta(name: str, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """``name`` as :func:`create_model` builds it, its tensors holding shapes and no data: no memory and
    no initialisation (regnet_y_128gf in 0.3 s instead of 14 s).

    Example:
        >>> build_on_meta("regnet_y_128gf", 10).fc.weight.shape
        torch.Size([10, 7392])
    """
    with _WeightsOnMeta():
        model = get_arch(name).factory(num_classes, in_chans)
    return model.to("meta")  # the few tensors made from arange (Swin V2's position tables)


def _differing_keys(name: str, a: tuple[int, int], b: tuple[int, int]) -> dict[str, int]:
    """Keys whose shape differs between two (num_classes, in_chans) builds, with the dimension."""
    shapes_a, shapes_b = param_shapes(name, *a), param_shapes(name, *b)
    out: dict[str, int] = {}
    for key, shape in shapes_a.items():
        other = shapes_b.get(key)
        if other is not None and other != shape and len(other) == len(shape):
            out[key] = next(i for i, (x, y) in enumerate(zip(shape, other, strict=True)) if x != y)
    return out


@functools.cache
def classifier_keys(name: str) -> dict[str, int]:
    """State-dict keys of the classifier with the dimension that holds ``num_classes``.

    Example:
        >>> classifier_keys("resnet20")
        {'fc.weight': 0, 'fc.bias': 0}
    """
    return _differing_keys(name, (7, 3), (11, 3))


@functools.cache
def stem_keys(name: str) -> dict[str, int]:
    """State-dict keys of the first convolution with the dimension that holds ``in_chans``."""
    return _differing_keys(name, (7, 1), (7, 3))


def classifier_module_name(name: str) -> str:
    """Module whose input is the penultimate feature (hook it to read features), e.g. "fc"."""
    weight = next(key for key in classifier_keys(name) if key.endswith("weight"))
    return weight.rsplit(".", 1)[0]


# --- torchvision ----------------------------------------------------------------------------

_TORCHVISION_STUDENTS = {
    "resnet18": "mobilenet_v2", "resnet34": "resnet18", "resnet50": "resnet18",
    "resnet101": "resnet18", "resnet152": "resnet18", "resnext50_32x4d": "resnet18",
    "resnext101_32x8d": "resnet18", "resnext101_64x4d": "resnet18",
    "wide_resnet50_2": "resnet18", "wide_resnet101_2": "resnet18",
    "vgg11": "resnet18", "vgg13": "vgg11", "vgg16": "vgg11", "vgg19": "vgg11",
    "vgg11_bn": "resnet18", "vgg13_bn": "vgg11_bn", "vgg16_bn": "vgg11_bn", "vgg19_bn": "vgg11_bn",
    "densenet121": "mobilenet_v2", "densenet161": "densenet121", "densenet169": "densenet121",
    "densenet201": "densenet121", "mobilenet_v2": "mobilenet_v3_small",
    "mobilenet_v3_large": "mobilenet_v3_small", "efficientnet_b0": "mobilenet_v3_small",
    "efficientnet_v2_s": "efficientnet_b0", "efficientnet_v2_m": "efficientnet_v2_s",
    "efficientnet_v2_l": "efficientnet_v2_s", "convnext_tiny": "resnet18",
    "regnet_x_400mf": "mobilenet_v3_small", "regnet_y_400mf": "mobilenet_v3_small",
    "shufflenet_v2_x1_0": "shufflenet_v2_x0_5", "shufflenet_v2_x1_5": "shufflenet_v2_x0_5",
    "shufflenet_v2_x2_0": "shufflenet_v2_x0_5", "mnasnet0_75": "mnasnet0_5",
    "mnasnet1_0": "mnasnet0_5", "mnasnet1_3": "mnasnet0_5", "squeezenet1_0": "squeezenet1_1",
    "alexnet": "mobilenet_v3_small", "googlenet": "mobilenet_v2", "inception_v3": "resnet18",
    "vit_b_16": "resnet18", "vit_b_32": "resnet18", "vit_l_16": "vit_b_16", "vit_l_32": "vit_b_32",
    "vit_h_14": "vit_l_16", "swin_t": "resnet18", "swin_s": "swin_t", "swin_b": "swin_t",
    "swin_v2_t": "resnet18", "swin_v2_s": "swin_v2_t", "swin_v2_b": "swin_v2_t",
    "maxvit_t": "resnet18",
}
# Larger members of a family distil into its smallest member.
_TORCHVISION_FAMILY_STUDENTS = {
    "convnext_": "convnext_tiny", "efficientnet_b": "efficientnet_b0",
    "regnet_x_": "regnet_x_400mf", "regnet_y_": "regnet_y_400mf",
}


def _torchvision_student(name: str) -> str | None:
    if name in _TORCHVISION_STUDENTS:
        return _TORCHVISION_STUDENTS[name]
    for prefix, student in _TORCHVISION_FAMILY_STUDENTS.items():
        if name.startswith(prefix):
            return student
    return None


def replace_first_conv(model: nn.Module, in_chans: int) -> nn.Module:
    """Swap the first ``nn.Conv2d`` for one taking ``in_chans`` channels, keeping its name.

    Example:
        >>> gray = replace_first_conv(torchvision.models.resnet18(), in_chans=1)
        >>> gray.conv1.in_channels
        1
    """
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if conv.in_channels == in_chans:
        return model
    new_conv = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new_conv)
    return model


def _torchvision_factory(name: str) -> Callable[[int, int], nn.Module]:
    extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}

    def factory(num_classes: int, in_chans: int) -> nn.Module:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
        return replace_first_conv(model, in_chans) if in_chans != 3 else model

    factory.__name__ = f"torchvision_{name}"
    return factory


def _register_torchvision() -> None:
    for name in torchvision.models.list_models(module=torchvision.models):
        if name in _REGISTRY:
            continue
        size = 299 if name == "inception_v3" else 224
        exact = " (needs exactly 224x224)" if name.startswith("vit_") else ""
        register_arch(ArchSpec(
            name=name,
            family="torchvision",
            default_input=(3, size, size),
            default_normalize="imagenet",
            default_student=_torchvision_student(name),
            factory=_torchvision_factory(name),
            description=f"torchvision {name}, ImageNet layout{exact}",
        ))
