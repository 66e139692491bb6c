"""``prior-kd``: KD on unlabelled images from a related domain alone (``--prior``), the
"alternative data" baseline of the DAFL table (an MNIST teacher distilled on USPS digits).

Nothing is synthesized: every student batch is drawn from the prior stream, and the student is
selected on prior images held out of that stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd_cli.synth.base import Capabilities, Synthesizer
from dfkd_cli.synth.registry import register_synthesizer


@register_synthesizer("prior-kd")
class PriorKDSynthesizer(Synthesizer):
    """Serves prior images as the student's training inputs."""

    @dataclass
    class Config:
        batch_size: int = 256  # images the prior loader decodes per batch

    capabilities = Capabilities(uses_prior=True, keeps_pool=False, prior_holdout=True)

    def synthesize(self) -> None:
        """Nothing to make: the prior stream is the data."""

    def sample(self, n: int) -> torch.Tensor:
        return self.prior_batch(n)

    def holdout(self, n: int) -> torch.Tensor:
        if self.prior is None:
            raise RuntimeError("this recipe needs prior images: build the synthesizer with SynthContext(prior=...)")
        return self.prior.holdout(n).to(self.device)

    def preview(self, n: int) -> torch.Tensor:
        return self.prior_batch(n)

    def status(self) -> dict[str, float]:
        return {"skipped": float(self.prior.skipped)} if self.prior is not None else {}
