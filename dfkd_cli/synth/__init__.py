"""Synthesizers: each makes training inputs for the student from the teacher alone.

Every synthesizer exposes the same operations (``synthesize()`` makes more data, ``sample(n)``
returns a training batch, ``holdout(n)`` makes samples kept out of training) and is registered by
name here; recipes pick one with ``recipe.synthesizer``.
"""

from __future__ import annotations

import difflib

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.adversarial import DAFLSynthesizer, DFADSynthesizer, DFQSynthesizer, ZSKTSynthesizer
from dfkd_cli.synth.avkd import AVKDSynthesizer
from dfkd_cli.synth.base import Synthesizer
from dfkd_cli.synth.cmi import CMISynthesizer
from dfkd_cli.synth.deepinversion import DeepInversionSynthesizer
from dfkd_cli.synth.fast import FastSynthesizer
from dfkd_cli.synth.noise import NoiseSynthesizer
from dfkd_cli.synth.prior_kd import PriorKDSynthesizer
from dfkd_cli.synth.zskd import ZSKDSynthesizer
from dfkd_cli.text.prompter import RLPromptSynthesizer
from dfkd_cli.text.synth import ManualPromptSynthesizer, RandomTextSynthesizer, UnlabeledTextSynthesizer

SYNTHESIZERS: dict[str, type] = {
    "noise": NoiseSynthesizer,
    "deepinversion": DeepInversionSynthesizer,
    "cmi": CMISynthesizer,
    "fast": FastSynthesizer,
    "dafl": DAFLSynthesizer,
    "zskt": ZSKTSynthesizer,
    "dfad": DFADSynthesizer,
    "dfq": DFQSynthesizer,
    "zskd": ZSKDSynthesizer,
    "avkd": AVKDSynthesizer,
    "prior-kd": PriorKDSynthesizer,
    # text (recipe.family = "text"): Hugging Face sequence classifiers
    "random-text": RandomTextSynthesizer,
    "unlabeled-text": UnlabeledTextSynthesizer,
    "promptdfd-manual": ManualPromptSynthesizer,
    "promptdfd-rl": RLPromptSynthesizer,
}


def synthesizer_class(name: str) -> type[Synthesizer]:
    """The synthesizer registered as ``name``; unknown names list the close matches."""
    try:
        return SYNTHESIZERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(SYNTHESIZERS), n=3)
        hint = f"did you mean: {', '.join(close)}? " if close else ""
        raise DfkdError(f"unknown synthesizer '{name}' in recipe.synthesizer; {hint}available: {', '.join(SYNTHESIZERS)}") from None


__all__ = ["SYNTHESIZERS", "Synthesizer", "synthesizer_class"]
