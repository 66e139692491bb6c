"""The Gaussian-noise baseline every DFKD table reports: KD on N(0, 1) inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd_cli.synth.base import Capabilities, Synthesizer
from dfkd_cli.synth.registry import register_synthesizer


@register_synthesizer("noise")
class NoiseSynthesizer(Synthesizer):
    """Draws inputs from N(0, 1) in the teacher's normalised input space (no optimisation)."""

    @dataclass
    class Config:
        batch_size: int = 256  # holdout samples drawn per call

    capabilities = Capabilities(keeps_pool=False)

    def make_batch(self, n: int) -> torch.Tensor:
        return torch.randn(n, *self.teacher.input_shape, device=self.device)

    def synthesize(self) -> None:
        """Nothing to prepare: every batch is fresh noise."""

    def sample(self, n: int) -> torch.Tensor:
        return self.make_batch(n)

    def preview(self, n: int) -> torch.Tensor:
        return self.make_batch(n)
