"""Synthesizers: each makes training inputs for the student from the teacher alone.

Every synthesizer is built from a :class:`~dfkd_cli.synth.context.SynthContext` (everything it
needs, given once), declares its :class:`~dfkd_cli.synth.context.Capabilities`, exposes the same
operations (``synthesize()`` makes more data, ``sample(n)`` returns a training batch,
``holdout(n)`` makes samples kept out of training) and registers itself by name beside its
implementation (:func:`~dfkd_cli.synth.registry.register_synthesizer`); recipes pick one with
``recipe.synthesizer``. Importing this package imports every synthesizer module, which fills
:data:`SYNTHESIZERS` in this order (the order ``dfkd recipes`` and error messages list them).
"""

from __future__ import annotations

# Importing a module registers its synthesizers; this order is the registry's (not alphabetical).
from dfkd_cli.synth import noise, deepinversion, cmi, fast  # noqa: F401,I001
from dfkd_cli.synth import adversarial, zskd, avkd, prior_kd  # noqa: F401,I001
from dfkd_cli.synth.base import Synthesizer
from dfkd_cli.synth.context import Capabilities, RunHooks, StudentView, SynthContext
from dfkd_cli.synth.registry import SYNTHESIZERS, register_synthesizer, synthesizer_class

# The text synthesizers (recipe.family = "text") register in the same dict. dfkd_cli.text imports
# this package first, so whichever of the two is imported first, the image ones come first.
from dfkd_cli.text import prompter, synth as text_synth  # noqa: E402,F401  (registration)

__all__ = ["SYNTHESIZERS", "Capabilities", "RunHooks", "StudentView", "SynthContext", "Synthesizer",
           "register_synthesizer", "synthesizer_class"]
