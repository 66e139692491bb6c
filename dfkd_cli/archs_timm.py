"""timm's models as dfkd architectures, named ``timm:NAME`` (``timm:resnet18``, ``timm:resnet18.a1_in1k``).

The registry in :mod:`dfkd_cli.archs` resolves these names here, lazily: timm is only imported when a
``timm:`` name or pattern is used, and its ~1300 models are never registered eagerly. A spec builds
its model with ``timm.create_model(name, pretrained=False, ...)``, so parameter names are timm's own
and nothing is ever downloaded. Input size and normalisation come from the model's pretrained
config (the default tag's, or the one named after the dot).

Example:
    >>> spec = timm_spec("timm:resnet18.a1_in1k")
    >>> spec.default_input, spec.default_stats[0]
    ((3, 224, 224), (0.485, 0.456, 0.406))
    >>> list_timm_archs("timm:resnet1*")[:2]
    ['timm:resnet10t', 'timm:resnet14t']
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

from torch import nn

from dfkd_cli.archs import ArchSpec, format_shape
from dfkd_cli.errors import DfkdError

TIMM_PREFIX = "timm:"
# Used only when timm has no pretrained config for a model (every timm 1.0 model has one).
FALLBACK_INPUT = (3, 224, 224)

# Default students: the first rule whose pattern matches the whole timm name wins; a family is listed
# only where its smallest member is obvious (the smallest members themselves match no rule).
_STUDENT_RULES: tuple[tuple[str, str], ...] = (
    (r"resnet18d?", "resnet10t"),
    (r"resnet(26|34|50|101|152|200)[cdst]?", "resnet18"),
    (r"(se)?resnext\d+d?_\d+x\d+d|wide_resnet(50|101)_2|seresnet(34|50|101|152)", "resnet18"),
    (r"mobilenetv3_(large_(075|100|150d)|small_(075|100)|rw)", "mobilenetv3_small_050"),
    (r"mobilenetv2_(075|100|110d|120d|140)", "mobilenetv2_050"),
    (r"efficientnet_b[1-8]", "efficientnet_b0"),
    (r"tf_efficientnet_b[1-8]", "tf_efficientnet_b0"),
    (r"efficientnetv2_(s|m|l|xl|rw_s|rw_m)", "efficientnetv2_rw_t"),
    (r"convnext_(femto|pico|nano|tiny|small|base|large|xlarge|xxlarge)", "convnext_atto"),
    (r"convnextv2_(femto|pico|nano|tiny|small|base|large|huge)", "convnextv2_atto"),
    (r"regnetx_(0[0-9][4-9]|0[1-9]\d|[1-9]\d\d)(_tv)?", "regnetx_002"),
    (r"regnety_(0[0-9][4-9]|0[1-9]\d|[1-9]\d{2,3})(_tv|_sgn)?", "regnety_002"),
    (r"densenet(161|169|201|264d)", "densenet121"),
    (r"vgg(13|16|19)", "vgg11"),
    (r"vgg(13|16|19)_bn", "vgg11_bn"),
    (r"ghostnet_(100|130)", "ghostnet_050"),
    (r"ghostnetv3_(100|130|160)", "ghostnetv3_050"),
    (r"mobilevit_(xs|s)", "mobilevit_xxs"),
    (r"mobilevitv2_(075|100|125|150|175|200)", "mobilevitv2_050"),
    (r"efficientvit_b[1-3]", "efficientvit_b0"),
    (r"vit_(small|base|large)_patch16_224", "vit_tiny_patch16_224"),  # a ViT takes only its own input size
    (r"deit_(small|base)_patch16_224|deit3_(small|medium|base|large)_patch16_224", "deit_tiny_patch16_224"),
    (r"deit_(small|base)_distilled_patch16_224", "deit_tiny_distilled_patch16_224"),
)


def is_timm_name(name: str) -> bool:
    """Whether ``name`` (or a glob pattern) is in timm's namespace: starts with ``timm:``."""
    return name.strip().lower().startswith(TIMM_PREFIX)


def _timm() -> ModuleType:
    """The timm package (a dependency of dfkd; imported only when a ``timm:`` name is used)."""
    try:
        import timm
    except ImportError as error:
        raise DfkdError("timm is not installed; install it with pip install 'timm>=1.0,<2' to use timm: models") from error
    return timm


def _split(name: str) -> tuple[str, str | None]:
    """"timm:resnet18.a1_in1k" -> ("resnet18", "a1_in1k"); the tag is None when absent."""
    rest = name.strip().lower()[len(TIMM_PREFIX):].strip()
    arch, _, tag = rest.partition(".")
    return arch, tag or None


def timm_spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of the timm model ``name`` ("timm:resnet18" or "timm:resnet18.a1_in1k").

    Raises DfkdError, with close matches, for a model or tag timm does not know.
    """
    arch, tag = _split(name)
    return _cached_spec(arch, tag)


@functools.cache
def _cached_spec(arch: str, tag: str | None) -> ArchSpec:
    _check_known(arch)
    full_name = f"{TIMM_PREFIX}{arch}" + (f".{tag}" if tag else "")
    default_input, stats, where = _defaults(_pretrained_config(arch, tag))
    return ArchSpec(
        name=full_name,
        family="timm",
        default_input=default_input,
        default_normalize=full_name if stats is not None else "imagenet",
        default_student=timm_default_student(arch),
        factory=_factory(arch),
        description=f"timm {arch}, random init ({where})",
        default_stats=stats,
    )


Stats = tuple[tuple[float, ...], tuple[float, ...]]


def _defaults(config: Any) -> tuple[tuple[int, int, int], Stats | None, str]:
    """(input shape, (mean, std) or None, where they came from) read from a timm pretrained config;
    what the config lacks is assumed (3x224x224, ImageNet statistics) and the description says so."""
    size = tuple(getattr(config, "input_size", None) or ())
    mean, std = getattr(config, "mean", None), getattr(config, "std", None)
    stats = (tuple(mean), tuple(std)) if mean and std else None
    source = f"its {config.tag or 'default'} pretrained config" if config is not None else None
    if len(size) == 3:
        default_input, shape_from = (int(size[0]), int(size[1]), int(size[2])), f"from {source}"
    else:
        default_input, shape_from = FALLBACK_INPUT, "assumed"
    stats_from = f"mean/std from {source}" if stats else "ImageNet mean/std assumed"
    missing = "; timm has no pretrained config for it" if config is None else ""
    return default_input, stats, f"input {format_shape(default_input)} {shape_from}; {stats_from}{missing}"


def _check_known(arch: str) -> None:
    """A one-line DfkdError with close matches when timm has no model ``arch``."""
    timm = _timm()
    if timm.is_model(arch):
        return
    if not arch:
        raise DfkdError("empty timm model name; pass timm:NAME (list them with `dfkd archs 'timm:*'`)")
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean: {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
    raise DfkdError(f"unknown timm model {arch!r}; {hint}(list them with `dfkd archs 'timm:*'`)")


def _pretrained_config(arch: str, tag: str | None) -> Any:
    """timm's pretrained config for ``arch`` (the tag's, else the default tag's), or None if it has none."""
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

    if tag is None:
        return get_pretrained_cfg(arch)
    tags = [key.partition(".")[2] for key in get_arch_pretrained_cfgs(arch)]
    if tag not in tags:
        listed = ", ".join(tags[:5]) + (f" (+{len(tags) - 5} more)" if len(tags) > 5 else "")
        known = f"its tags: {listed}" if tags else "it has no pretrained tags"
        raise DfkdError(f"timm model {arch} has no pretrained tag {tag!r}; {known} (or leave the tag out)")
    return get_pretrained_cfg(f"{arch}.{tag}")


def _factory(arch: str) -> Callable[[int, int], nn.Module]:
    def factory(num_classes: int, in_chans: int) -> nn.Module:
        # pretrained=False always: dfkd loads the user's weights itself and never downloads any.
        return _timm().create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)

    factory.__name__ = f"timm_{arch}"
    return factory


def timm_default_student(arch: str) -> str | None:
    """The ``timm:`` default student of timm model ``arch`` (untagged), or None when no rule applies.

    Example:
        >>> timm_default_student("resnet50")
        'timm:resnet18'
    """
    for pattern, student in _STUDENT_RULES:
        if re.fullmatch(pattern, arch):
            return TIMM_PREFIX + student if student != arch else None
    return None


def list_timm_archs(pattern: str) -> list[str]:
    """``timm:`` names matching the glob ``pattern`` (which starts with ``timm:``), sorted; a pattern
    with a dot ("timm:resnet18.*") matches the pretrained tags too.

    Example:
        >>> list_timm_archs("timm:resnet18.tv*")
        ['timm:resnet18.tv_in1k']
    """
    timm = _timm()
    wanted = pattern.strip().lower()[len(TIMM_PREFIX):]
    names = timm.list_pretrained() if "." in wanted else timm.list_models()
    return sorted(TIMM_PREFIX + name for name in names if fnmatch.fnmatchcase(name, wanted))


def timm_alternative(name: str) -> str | None:
    """``timm:NAME`` when ``name`` (given without the prefix) is a timm model, for error hints; None
    without timm installed (the hint is then left out, not the error it belongs to)."""
    try:
        import timm
    except ImportError:
        return None
    arch = name.strip().lower()
    return TIMM_PREFIX + arch if timm.is_model(arch) else None
