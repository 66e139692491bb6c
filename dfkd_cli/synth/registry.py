"""The synthesizer registry: each synthesizer registers itself beside its implementation.

    >>> @register_synthesizer("cheap-inversion")
    ... class CheapInversionSynthesizer(Synthesizer): ...

Recipes pick a registered name with ``recipe.synthesizer``. ``dfkd_cli.synth`` imports every
synthesizer module (image and text), so importing it fills :data:`SYNTHESIZERS`.
"""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.context import Capabilities

SYNTHESIZERS: dict[str, type] = {}  # name -> class, in registration order

T = TypeVar("T", bound=type)


def register_synthesizer(name: str) -> Callable[[T], T]:
    """A class decorator registering the synthesizer as ``name``; the class must declare its
    ``capabilities`` (a :class:`Capabilities`) and a name is taken once."""

    def register(cls: T) -> T:
        if not isinstance(getattr(cls, "capabilities", None), Capabilities):
            raise TypeError(f"synthesizer {cls.__qualname__} must declare capabilities: ClassVar[Capabilities]")
        holder = SYNTHESIZERS.get(name)
        if holder is not None and holder.__qualname__ != cls.__qualname__:
            raise ValueError(f"synthesizer name '{name}' is taken by {holder.__qualname__}")
        SYNTHESIZERS[name] = cls
        return cls

    return register


def synthesizer_class(name: str) -> type:
    """The synthesizer registered as ``name``; unknown names list the close matches."""
    try:
        return SYNTHESIZERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(SYNTHESIZERS), n=3)
        hint = f"did you mean: {', '.join(close)}? " if close else ""
        raise DfkdError(f"unknown synthesizer '{name}' in recipe.synthesizer; {hint}available: {', '.join(SYNTHESIZERS)}") from None
