"""Run configs written as TOML: nested dicts of scalars and lists, enough for ``config.toml``."""

from __future__ import annotations

import json
from typing import Any


def dump_toml(data: dict[str, Any]) -> str:
    """Write nested dicts of scalars and lists as TOML (enough for run configs).

    Example:
        >>> print(dump_toml({"train": {"lr": 0.1}}).strip())
        [train]
        lr = 0.1
    """
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines += ["", f"[{'.'.join(path)}]"]
    for key, value in scalars.items():
        if value is not None:
            lines.append(f"{key} = {toml_value(value)}")
    for key, sub in tables.items():
        _dump_table(sub, path + [key], lines)


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal: ``True`` -> ``true``, ``"a"`` -> ``"a"``, ``[1, 2]`` -> ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    # JSON's string escapes are TOML's; TOML also refuses a raw DEL, which JSON leaves alone.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
