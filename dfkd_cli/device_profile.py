"""Device profiles: the ``[cpu]`` table of a recipe file.

A recipe file's main tables hold its paper's settings; its optional ``[cpu]`` table holds dotted
``synth.`` and ``train.`` keys that replace them when the run's device is a CPU, so that a CPU run
makes progress in minutes. The profile sits just above the file's main tables and below everything
else: a ``--config`` file's recipe tables, ``-s`` overrides and ``--steps`` win over it. A run's
``config.toml`` records the numbers that ran, so ``--config`` (and ``--resume``) repeat them on
any device.

Example:
    >>> flat_profile({"synth.batch_size": 64, "train": {"steps_per_round": 20}})
    {'synth.batch_size': 64, 'train.steps_per_round': 20}
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

from dfkd_cli.errors import DfkdError, shown

PROFILE_TABLE = "cpu"
PROFILE_DEVICE = "cpu"  # the torch device type the [cpu] table applies on
_PROFILE_ROOTS = ("synth", "train")  # [recipe] says what the recipe is: the same on every device
_EXAMPLE = 'e.g. "synth.batch_size" = 64'


def flat_profile(table: Any) -> dict[str, Any]:
    """The ``[cpu]`` table as dotted key -> value. Quoted dotted keys (``"synth.lr" = 0.1``) and bare
    ones (``synth.lr = 0.1``, which TOML nests) read the same; a key outside ``synth.``/``train.`` is refused."""
    if not isinstance(table, dict):
        raise DfkdError(f"[{PROFILE_TABLE}] must be a table of dotted keys ({_EXAMPLE}), got {shown(table)}")
    flat: dict[str, Any] = {}
    _flatten(table, "", flat)
    for key in flat:
        if key.split(".")[0] not in _PROFILE_ROOTS or "." not in key:
            raise DfkdError(f"unknown key {shown(key)} in the [{PROFILE_TABLE}] table; its keys are dotted synth. or "
                            f"train. settings ({_EXAMPLE})")
    return flat


def _flatten(table: dict[str, Any], prefix: str, flat: dict[str, Any]) -> None:
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten(value, f"{path}.", flat)
        elif path in flat:  # "synth.lr" = 1 and synth.lr = 2: TOML sees two keys, the recipe one
            raise DfkdError(f"the [{PROFILE_TABLE}] table sets {shown(path)} twice; keep one")
        else:
            flat[path] = value


def check_profile_keys(profile: dict[str, Any], synth_cls: Any, train_cls: type) -> None:
    """Refuse a profile key that is not a setting of ``synth_cls`` (its ``Config`` and loss terms) or of
    the trainer's ``train_cls``, naming the close match."""
    valid = ([f"synth.{f.name}" for f in fields(synth_cls.Config)] + [f"synth.loss.{t}" for t in synth_cls.loss_terms]
             + [f"train.{f.name}" for f in fields(train_cls)])
    for key in profile:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {shown(close[0])}? " if close else ""
            raise DfkdError(f"unknown key {shown(key)} in the [{PROFILE_TABLE}] table; {hint}its keys are this "
                            f"recipe's dotted synth. and train. settings ({_EXAMPLE})")


def apply_profile(data: dict[str, Any], profile: dict[str, Any]) -> None:
    """Set each dotted ``profile`` key in the recipe ``data`` (parsed TOML), in place."""
    for key, value in profile.items():
        *tables, last = key.split(".")
        node = data
        for part in tables:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DfkdError(f"[{PROFILE_TABLE}] key {shown(key)}: {shown(part)} is a value in the recipe, "
                                "not a table; fix the file")
        node[last] = value


def profile_under(profile: Any, top: dict[str, Any]) -> Any:
    """A recipe file's ``[cpu]`` table once a run config's recipe tables ``top`` merge over the file:
    the keys ``top`` sets leave it (the config's number is the one that ran, on either device) and
    ``top``'s own ``[cpu]`` keys join it."""
    own = top.get(PROFILE_TABLE, {})
    if not isinstance(profile, dict) or not isinstance(own, dict):
        return own if PROFILE_TABLE in top else profile  # not a table: build_recipe names the problem
    kept = {key: value for key, value in flat_profile(profile).items() if not _sets(top, key)}
    return {**kept, **flat_profile(own)}


def _sets(tables: dict[str, Any], key: str) -> bool:
    node: Any = tables
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
