"""``--from-synthetic DIR``: train a student on a saved synthetic set, without synthesizing again.

The set's training samples form the pool; its held-out samples select and measure the student as
they did in the run that made them. Only the recipe's ``[train]`` table matters here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd_cli.synth.base import Capabilities, Synthesizer
from dfkd_cli.synthetic_set import SyntheticSet


class FromSyntheticSynthesizer(Synthesizer):
    """A fixed pool loaded from a synthetic set (see :mod:`dfkd_cli.synthetic_set`)."""

    @dataclass
    class Config:
        batch_size: int = 256

    capabilities = Capabilities()

    def load(self, data: SyntheticSet) -> None:
        self.pool.add(data.train.to(self.device))
        self._holdout = data.holdout.to(self.device)

    def synthesize(self) -> None:
        """Nothing to make: the saved set is the data."""

    def holdout(self, n: int) -> torch.Tensor:
        return self._holdout[:n]
