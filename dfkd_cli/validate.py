"""One validation for every source: typed checks whose one-line errors name where a value came from.

A value gets the same check whether it was given as a flag, read from a run's config.toml, a
recipe, a student's safetensors metadata, a synthetic set's manifest or a checkpoint; only
``where`` differs, so a bad value from a file is reported as clearly as one from the command line,
naming the file and the key: ``"--std"``, ``"'runs/x/config.toml' [run] std"``,
``"dfkd student metadata 'dfkd.std'"``, ``"checkpoint 'teacher.pt' key 'fc.weight'"``. Each validator
returns the value in its canonical type (a tuple of floats, an int, ...) or raises
:class:`~dfkd_cli.errors.DfkdError` (exit 2). ``fix`` replaces the default advice after the ``;``.

Recipe keys are type-checked by :func:`dfkd_cli.config.build_recipe` (one path for recipe files,
config tables and ``-s`` overrides), which this module does not repeat.

Example:
    >>> positive_int("ten", "'config.toml' [run] steps")
    Traceback (most recent call last):
    dfkd_cli.errors.DfkdError: 'config.toml' [run] steps must be a whole number above 0, got 'ten'
    >>> normalisation([0.5], [0.25], 3, "--mean", "--std")
    ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfkd_cli.errors import DfkdError, shown

if TYPE_CHECKING:
    import torch
    from torch import nn

INT64_MAX = 2**63 - 1  # what TOML and torch hold; a seed or count beyond it is refused
MIN_CLASSES = 2  # a one-output network is a regressor or a detector head, not a classifier to distil
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # weight dtypes a teacher may be stored in
# A healthy classifier's weights and logits stay far below these; a diverged one's do not.
BROKEN_WEIGHT = 1e6
BROKEN_OUTPUT = 1e6
_SHAPE_TEXT = re.compile(r"^\s*(\d+)\s*[x×,]\s*(\d+)\s*[x×,]\s*(\d+)\s*$", re.IGNORECASE)


class SourcedValues(tuple):
    """Floats that remember where they were read from, so a check made later (against the
    teacher's channel count, known only once it is loaded) names the same source."""

    where: str

    def __new__(cls, values: Iterable[float], where: str = "") -> SourcedValues:
        made = super().__new__(cls, values)
        made.where = where
        return made


def fail(where: str, expected: str, got: Any, fix: str | None = None) -> DfkdError:
    """The one-line error ``WHERE must be EXPECTED, got GOT; FIX`` (to raise)."""
    return DfkdError(f"{where} must be {expected}, got {shown(got)}" + (f"; {fix}" if fix else ""))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(value: Any, where: str, minimum: int | None = None, maximum: int = INT64_MAX,
            fix: str | None = None) -> int:
    """A whole number (not a bool, not a float) in ``[minimum, maximum]``."""
    if _is_int(value) and (minimum is None or value >= minimum) and value <= maximum:
        return int(value)
    if _is_int(value) and value > maximum:
        expected = "at most 2**63-1 (64 bits)" if maximum == INT64_MAX else f"at most {maximum}"
    elif minimum == 1:
        expected = "a whole number above 0"
    else:
        expected = "a whole number" if minimum is None else f"a whole number of at least {minimum}"
    raise fail(where, expected, value, fix)


def positive_int(value: Any, where: str, fix: str | None = None) -> int:
    """A whole number from 1 to 2**63-1 (a count of steps, classes, samples)."""
    return integer(value, where, 1, INT64_MAX, fix)


def number(value: Any, where: str, minimum: float | None = None, positive: bool = False,
           fix: str | None = None) -> float:
    """A finite number (ints accepted), at least ``minimum``, above 0 when ``positive``."""
    try:
        converted = float(value) if _is_number(value) else math.nan
    except OverflowError:  # an integer beyond float range
        converted = math.nan
    if math.isfinite(converted) and not (positive and converted <= 0) and not (minimum is not None and converted < minimum):
        return converted
    expected = "a positive number" if positive else "a finite number"
    raise fail(where, f"a number of at least {minimum:g}" if minimum is not None else expected, value, fix)


def positive_number(value: Any, where: str, fix: str | None = None) -> float:
    """A finite number above 0 (a duration, a learning rate)."""
    return number(value, where, positive=True, fix=fix)


def fraction(value: Any, where: str, open_interval: bool = False, fix: str | None = "e.g. 0.9") -> float:
    """A number in [0, 1], or in (0, 1) when ``open_interval``."""
    ok = _is_number(value) and (0 < value < 1 if open_interval else 0 <= value <= 1)  # NaN fails both
    if not ok:
        raise fail(where, "between 0 and 1 (exclusive)" if open_interval else "between 0 and 1", value, fix)
    return float(value)


def boolean(value: Any, where: str, fix: str | None = "write true or false") -> bool:
    """``true`` or ``false`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise fail(where, "true or false", value, fix)
    return value


def text(value: Any, where: str, choices: Sequence[str] | None = None, fix: str | None = None) -> str:
    """A non-empty single-line string, one of ``choices`` when given."""
    if choices is not None and value not in choices:
        listed = " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"
        raise fail(where, listed, value, fix)
    if not isinstance(value, str) or not value.strip() or "\n" in value or "\x00" in value:
        raise fail(where, "a non-empty line of text", value, fix)
    return value


def path(value: Any, where: str, fix: str | None = None) -> Path:
    """A file or folder name: a non-empty string or path (existence is checked where it is opened)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return Path(text(value, where, fix=fix or "give a file or folder path"))


def seed(value: Any, where: str) -> int:
    """A random seed: a whole number from 0 to 2**63-1 (what torch, NumPy and TOML all hold)."""
    return integer(value, where, 0, INT64_MAX, "a seed is a whole number from 0 to 2**63-1, e.g. 0")


def input_shape(value: Any, where: str) -> tuple[int, int, int]:
    """``CxHxW`` as text (``"3x32x32"``) or as three whole numbers, each at least 1."""
    if isinstance(value, str):
        match = _SHAPE_TEXT.match(value)
        sizes: Any = [int(group) for group in match.groups()] if match else None
    elif isinstance(value, (list, tuple)):
        sizes = list(value)
    else:
        sizes = None
    if sizes is None or len(sizes) != 3 or not all(_is_int(s) and 1 <= s <= INT64_MAX for s in sizes):
        raise fail(where, "CxHxW with positive sizes", value, "write it as CxHxW, e.g. 3x32x32")
    return (sizes[0], sizes[1], sizes[2])


def finite_floats(values: Any, where: str, count: int | None = None, fix: str | None = None) -> SourcedValues:
    """Finite numbers from a list or comma-separated text (``"0.485,0.456,0.406"``), ``count`` of them when given."""
    items = values.split(",") if isinstance(values, str) else values
    if not isinstance(items, (list, tuple)) or not items:
        raise fail(where, "comma-separated numbers", values, fix or "e.g. 0.485,0.456,0.406")
    floats = []
    for item in items:
        try:
            parsed = float(item.strip()) if isinstance(item, str) else float(item) if _is_number(item) else None
        except (ValueError, OverflowError):
            parsed = None
        if parsed is None:
            raise fail(where, "comma-separated numbers", values, fix or "e.g. 0.485,0.456,0.406")
        floats.append(parsed)
    if not all(math.isfinite(v) for v in floats):
        raise fail(where, "finite numbers", floats, fix or "give the values the teacher was trained with")
    if count is not None and len(floats) != count:
        raise fail(where, f"{count} numbers", floats, fix)
    return SourcedValues(floats, where)


def _per_channel(values: Sequence[float], channels: int, where: str, fix: str | None) -> tuple[float, ...]:
    if len(values) == channels:
        return tuple(values)
    if len(values) == 1:
        return tuple(values[0] for _ in range(channels))
    advice = fix or f"give {channels} values (or one for all channels)"
    raise DfkdError(f"{where} has {len(values)} values but the input has {channels} channels; {advice}")


def normalisation(mean: Any, std: Any, channels: int, where_mean: str | None = None, where_std: str | None = None,
                  fix: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std): finite numbers, one per channel (one value is used for every
    channel), every std above 0. ``where_*`` default to the sources :class:`SourcedValues` carry."""
    where_mean = where_mean or getattr(mean, "where", "") or "--mean"
    where_std = where_std or getattr(std, "where", "") or "--std"
    mean_values = _per_channel(finite_floats(mean, where_mean, fix=fix), channels, where_mean, fix)
    std_values = _per_channel(finite_floats(std, where_std, fix=fix), channels, where_std, fix)
    if min(std_values) <= 0:
        raise DfkdError(f"{where_std} values must be positive, got {list(std_values)}; "
                        f"{fix or 'give the per-channel std the teacher was trained with'}")
    return mean_values, std_values


def class_names(names: Any, num_classes: int, where: str, fix: str | None = None) -> list[str]:
    """``num_classes`` distinct, non-empty names (a report keyed by class cannot hold two of one)."""
    advice = fix or "put one class name per line"
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise fail(where, "a list of class names", names, advice)
    if len(names) != num_classes:
        raise DfkdError(f"{where} has {len(names)} names but the teacher has {num_classes} classes; {advice}")
    empty = [i for i, name in enumerate(names) if not name.strip()]
    if empty:
        raise DfkdError(f"{where} has an empty class name (number {empty[0] + 1}); {advice}")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise DfkdError(f"{where} names class {shown(name)} twice (numbers {seen[name] + 1} and {index + 1}); "
                            f"give every class its own name")
        seen[name] = index
    return list(names)


def num_classes(value: Any, where: str, fix: str | None = None) -> int:
    """A classifier's class count: at least 2."""
    return integer(value, where, MIN_CLASSES, INT64_MAX, fix)


def weight(name: str, tensor: torch.Tensor, where: str) -> None:
    """A stored floating-point weight: float16, bfloat16, float32 or float64, every value finite.

    ``where`` names the file; the key is added. Complex or integer values where the model holds
    floats would be cast silently (dropping the imaginary part, or scaling nothing), so they are refused.
    """
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in FLOAT_DTYPES:
        raise DfkdError(f"{where} key {shown(name)} holds {dtype} values where the model has float weights; "
                        f"store the weights as {', '.join(FLOAT_DTYPES)}")
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise DfkdError(f"{where} key {shown(name)} holds {bad} NaN or infinite value(s); the weights are damaged "
                        "(or were saved from a diverged training run): re-save them from a healthy model")


def distinct_finite_outputs(outputs: torch.Tensor, where: str, fix: str) -> None:
    """Outputs of a model on different inputs: every value finite, and not the same for every input."""
    import torch

    if not bool(torch.isfinite(outputs).all()):
        raise DfkdError(f"{where} gives NaN or infinite outputs on random inputs; {fix}")
    spread = float((outputs - outputs[:1]).abs().max()) if len(outputs) > 1 else 1.0
    scale = float(outputs.abs().max())
    if spread <= 1e-6 * max(1.0, scale):
        raise DfkdError(f"{where} gives the same outputs for every input (a constant network: e.g. zeroed weights); {fix}")


def broken_weights(model: nn.Module) -> str | None:
    """What is wrong with a diverged model's weights (NaN/inf, or above BROKEN_WEIGHT), or None."""
    import torch

    with torch.no_grad():
        weights = [p.detach() for p in model.parameters() if p.numel()]
        if not all(bool(torch.isfinite(w).all()) for w in weights):
            return "its weights hold NaN or infinite values"
        largest = max((float(w.abs().max()) for w in weights), default=0.0)
    return f"its weights reach {largest:.3g}" if largest > BROKEN_WEIGHT else None


def broken_model(model: nn.Module, rows: torch.Tensor, output_limit: float = BROKEN_OUTPUT) -> str | None:
    """What is wrong with a diverged model: its weights (:func:`broken_weights`), NaN/inf outputs on
    ``rows`` or outputs above ``output_limit``; None when nothing is (or the model cannot run ``rows``)."""
    import torch

    problem = broken_weights(model)
    if problem is not None:
        return problem
    try:
        with torch.inference_mode():
            outputs = model(rows).float()
    except Exception:  # a model that fails on this batch has another problem, which its caller reports
        return None
    if not bool(torch.isfinite(outputs).all()):
        return "its outputs on held-out inputs are NaN or infinite"
    top = float(outputs.abs().max())
    return f"its outputs on held-out inputs reach {top:.3g}" if top > output_limit else None
