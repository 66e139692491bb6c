"""Typed JSON records: the machinery behind :mod:`dfkd_cli.report_model`.

A :class:`Record` is a frozen, keyword-only dataclass whose fields are the keys of a JSON object. Each field is
declared with :func:`key`, which says in which document kinds the key must be present and in which
it may be ``null``; the field's annotation gives the value's type (``int``, ``float``, ``str``,
``bool``, ``Literal[...]``, ``list[X]``, ``dict[str, X]``, another record, or ``Any`` for open-ended
content). From these declarations come both the reader (:meth:`Record.read`, which names the path
of the first wrong key) and the JSON Schema (:func:`json_schema`), so the two cannot disagree.

A record read from a dict remembers which keys it had and in what order, and
:meth:`Record.to_dict` writes exactly those back: reading and writing round-trips a document.

Example:
    >>> @dataclass(frozen=True, kw_only=True)
    ... class Size(Record):
    ...     width: int = key("pixels")
    >>> Size.read({"width": 3}, Reader("image compress"), "size").to_dict()
    {'width': 3}
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

IMAGE_COMPRESS, TEXT_COMPRESS, IMAGE_EVAL, TEXT_EVAL = "image compress", "text compress", "image eval", "text eval"
KINDS = (IMAGE_COMPRESS, TEXT_COMPRESS, IMAGE_EVAL, TEXT_EVAL)  # the documents dfkd writes
COMPRESS, EVAL, IMAGE = (IMAGE_COMPRESS, TEXT_COMPRESS), (IMAGE_EVAL, TEXT_EVAL), (IMAGE_COMPRESS, IMAGE_EVAL)

R = TypeVar("R", bound="Record")


@dataclass(frozen=True)
class Key:
    """What a field's key promises: a description, and the document kinds that require it or allow null."""

    doc: str
    required: frozenset[str]
    null: frozenset[str]


def _kinds(value: bool | Iterable[str]) -> frozenset[str]:
    if isinstance(value, bool):
        return frozenset(KINDS) if value else frozenset()
    kinds = frozenset(value)
    if not kinds <= set(KINDS):
        raise ValueError(f"unknown document kind(s) {sorted(kinds - set(KINDS))}")
    return kinds


def key(doc: str, *, required: bool | Iterable[str] = True, null: bool | Iterable[str] = False) -> Any:
    """A record field: ``required`` (every kind, none, or the kinds listed) must have the key, and
    in the kinds ``null`` names its value may be ``null``. A field that is not required everywhere,
    or may be null, is annotated ``X | None`` and defaults to None (absent)."""
    spec = Key(doc, _kinds(required), _kinds(null))
    if spec.required == frozenset(KINDS) and not spec.null:
        return dataclasses.field(metadata={"key": spec})
    return dataclasses.field(default=None, metadata={"key": spec})


class Reader:
    """How to read a document: its kind, and whether it may be incomplete (``partial``, for rendering
    one: a missing key, or null where the schema wants a value, then reads as None)."""

    def __init__(self, kind: str, partial: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown document kind {kind!r}")
        self.kind, self.partial = kind, partial


class Record:
    """A JSON object with typed fields (subclasses: frozen, keyword-only dataclasses declared with :func:`key`)."""

    _present: tuple[str, ...] | None = None  # the keys it was read with, in order; None when built in code

    @classmethod
    def read(cls: type[R], data: Any, reader: Reader, path: str) -> R:
        """Check ``data`` against the declaration and build the record; ``ValueError`` names the path
        (e.g. ``run.race.entrants[0].seconds``) of the first key that is unknown, missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"report key {path or '(top level)'}: expected an object, got {_shown(data)}")
        specs = fields_of(cls)
        unknown = [name for name in data if name not in specs]
        if unknown:
            raise ValueError(f"report key {_join(path, str(unknown[0]))}: unknown key (known here: {', '.join(specs)})")
        values = {}
        for name, (spec, hint) in specs.items():
            where = _join(path, name)
            if name not in data:
                if reader.kind in spec.required and not reader.partial:
                    raise ValueError(f"report key {where}: missing (every {reader.kind} report has it)")
                values[name] = None
            elif data[name] is None:
                if reader.kind not in spec.null and not reader.partial:
                    raise ValueError(f"report key {where}: is null, expected {_describe(hint)}")
                values[name] = None
            else:
                nullable = reader.kind in spec.null or reader.partial
                values[name] = read_value(typing.Optional[hint] if nullable else hint, data[name], reader, where)
        built = cls(**values)
        object.__setattr__(built, "_present", tuple(data))
        return built

    @classmethod
    def blank(cls: type[R]) -> R:
        """A record with every key absent (for rendering code that treats absent and null alike)."""
        built = cls(**{name: None for name in fields_of(cls)})
        object.__setattr__(built, "_present", ())
        return built

    def has(self, name: str) -> bool:
        """Whether the key is in the document (a read record: it was read; a built one: it is not None)."""
        if self._present is not None:
            return name in self._present
        return getattr(self, name) is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys it was read with, in their order; for a record built in code,
        every field that is not None, and the nullable ones as ``null``."""
        specs = fields_of(type(self))
        names = self._present if self._present is not None else [
            name for name, (spec, _) in specs.items() if getattr(self, name) is not None or spec.null]
        return {name: write_value(getattr(self, name)) for name in names}


@functools.cache
def fields_of(cls: type[Record]) -> dict[str, tuple[Key, Any]]:
    """Each field's :class:`Key` and its value type (the annotation without ``| None``), checked:
    the annotation allows None exactly when the key may be absent or null."""
    hints = typing.get_type_hints(cls)
    specs = {}
    for field in dataclasses.fields(cls):
        spec = field.metadata.get("key")
        if spec is None:
            raise TypeError(f"{cls.__name__}.{field.name} is not declared with key()")
        hint, optional = _without_none(hints[field.name])
        if optional != (spec.required != frozenset(KINDS) or bool(spec.null)):
            raise TypeError(f"{cls.__name__}.{field.name}: annotate '| None' exactly when the key may be absent or null")
        specs[field.name] = (spec, hint)
    return specs


def _without_none(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        if len(members) != len(typing.get_args(hint)):
            return (members[0] if len(members) == 1 else Union[tuple(members)]), True
    return hint, False


def read_value(hint: Any, value: Any, reader: Reader, path: str) -> Any:
    """``value`` checked against ``hint`` (a copy for containers); ``ValueError`` names ``path``."""
    inner, optional = _without_none(hint)
    if value is None and optional:
        return None
    origin = typing.get_origin(inner)
    if inner is Any:
        return copy.deepcopy(value)
    if _is_record(inner):
        return inner.read(value, reader, path)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(inner)
        return [read_value(item, entry, reader, f"{path}[{index}]") for index, entry in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(inner)
        return {name: read_value(item, entry, reader, f"{path}[{json.dumps(name)}]") for name, entry in value.items()}
    if _scalar_fits(inner, value):
        return value
    raise ValueError(f"report key {path}: expected {_describe(hint)}, got {_shown(value)}")


def _scalar_fits(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) is Literal:
        return any(type(value) is type(option) and value == option for option in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint in (str, bool) and isinstance(value, hint)


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and hint is not Any and issubclass(hint, Record)


def write_value(value: Any) -> Any:
    """The JSON form of a field's value (records become dicts; containers are copied)."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [write_value(entry) for entry in value]
    if isinstance(value, dict):
        return {name: write_value(entry) for name, entry in value.items()}
    return value


def _describe(hint: Any) -> str:
    inner, optional = _without_none(hint)
    origin = typing.get_origin(inner)
    if origin is Literal:
        text = "one of " + ", ".join(repr(option) for option in typing.get_args(inner))
    elif _is_record(inner) or origin is dict:
        text = "an object"
    else:
        text = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}.get(
            origin or inner, str(inner))
    return text + (" or null" if optional else "")


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}... ({type(value).__name__})" if len(text) > 40 else f"{text} ({type(value).__name__})"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def json_schema(root: type[Record], matchers: dict[str, dict[str, Any]], **header: Any) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of documents whose top level is ``root``: each record in
    ``$defs``, keys required everywhere in ``required``, and for each document kind (recognised by
    ``matchers[kind]``, itself a schema) an ``if``/``then`` that adds what that kind promises."""
    defs: dict[str, Any] = {}
    body = _record_schema(root, defs)
    rules = [{"if": matchers[kind], "then": _kind_rules(root, kind)} for kind in KINDS]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **header, **body,
            "allOf": [rule for rule in rules if rule["then"]], "$defs": dict(sorted(defs.items()))}


def _record_schema(cls: type[Record], defs: dict[str, Any]) -> dict[str, Any]:
    properties = {}
    for name, (spec, hint) in fields_of(cls).items():
        schema = _value_schema(hint, defs)
        if spec.null:
            schema = _nullable(schema)
        properties[name] = {"description": spec.doc, **schema}
    required = [name for name, (spec, _) in fields_of(cls).items() if spec.required == frozenset(KINDS)]
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return {"description": doc, "type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def _value_schema(hint: Any, defs: dict[str, Any]) -> dict[str, Any]:
    inner, optional = _without_none(hint)
    origin = typing.get_origin(inner)
    if inner is Any:
        schema: dict[str, Any] = {}
    elif _is_record(inner):
        if inner.__name__ not in defs:
            defs[inner.__name__] = {}  # a placeholder first, in case a record refers to itself
            defs[inner.__name__] = _record_schema(inner, defs)
        schema = {"$ref": f"#/$defs/{inner.__name__}"}
    elif origin is Literal:
        options = list(typing.get_args(inner))
        schema = {"const": options[0]} if len(options) == 1 else {"enum": options}
    elif origin in (list, dict):
        item = typing.get_args(inner)[-1]
        if _kind_dependent(item):
            raise TypeError(f"{item.__name__} has kind-dependent keys and cannot sit in a list or map")
        schema = ({"type": "array", "items": _value_schema(item, defs)} if origin is list
                  else {"type": "object", "additionalProperties": _value_schema(item, defs)})
    else:
        schema = {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[inner]}
    return _nullable(schema) if optional else schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if set(schema) == {"type"} and isinstance(schema["type"], str):
        return {"type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _kind_dependent(hint: Any) -> bool:
    inner, _ = _without_none(hint)
    if not _is_record(inner):
        return False
    return any(spec.required not in (frozenset(), frozenset(KINDS)) or spec.null not in (frozenset(), frozenset(KINDS))
               or _kind_dependent(item) for spec, item in fields_of(inner).values())


def _kind_rules(cls: type[Record], kind: str) -> dict[str, Any]:
    """What a ``kind`` document adds to ``cls``'s schema: keys it requires, values it keeps non-null."""
    rules: dict[str, Any] = {}
    required = [name for name, (spec, _) in fields_of(cls).items()
                if kind in spec.required and spec.required != frozenset(KINDS)]
    if required:
        rules["required"] = required
    properties = {}
    for name, (spec, hint) in fields_of(cls).items():
        part: dict[str, Any] = {}
        if spec.null and kind not in spec.null:
            part["not"] = {"type": "null"}
        if _is_record(hint):
            part.update(_kind_rules(hint, kind))
        if part:
            properties[name] = part
    if properties:
        rules["properties"] = properties
    return rules
