"""FastDFKD (Fang, Mo, Wang, Song, Song: "Up to 100x Faster Data-free Knowledge Distillation",
AAAI 2022).

CMI and DeepInversion synthesize every batch from scratch, which needs hundreds of steps. FastDFKD
meta-learns a generator initialisation shared by all batches, so each new batch needs only a few
steps (``iterations``: the paper's Fast-2, Fast-5, Fast-10):

- for each batch, the meta generator is copied, a fresh latent code z is drawn, and the copy and
  z take ``iterations`` Adam steps on the shared inversion losses (``bn``, ``oh``, ``adv``: see
  inversion.py), z with its own learning rate ``lr_z``;
- the BatchNorm loss uses momentum statistics (``bn_momentum``): it compares an exponential moving
  average of the synthetic batches' feature statistics (earlier batches detached) with the
  teacher's running statistics, so one small batch need not match them exactly;
- then the meta generator learns from the adapted copy, with ``meta = "reptile"``:
  theta <- theta + meta_lr * (theta_adapted - theta); or ``meta = "fomaml"`` (first-order MAML):
  the adapted copy's gradients from every inner step, summed, are applied to the meta parameters
  by an Adam meta-optimizer with learning rate lr * iterations (one meta step moves about as far
  as one inner loop, the released FastDFKD setting);
- during the first ``warmup`` pool batches (the ones the student trains on) the adversarial term
  is off (the student has not learned anything yet); the first ``synthesize()`` call makes all
  remaining warm-up batches at once, so the student starts on a pool from a warmed-up generator.

Every batch (the best or the last of its iterations) joins the growing pool the student trains on.
Held-out batches (``holdout``) are made the same way, meta update included, but never join the pool
and do not count towards the warm-up: made before training starts, they are made without the
adversarial term while the warm-up lasts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.context import SynthContext
from dfkd_cli.synth.generator import check_auto_int
from dfkd_cli.synth.inversion import GeneratorInversion
from dfkd_cli.synth.registry import register_synthesizer


@register_synthesizer("fast")
class FastSynthesizer(GeneratorInversion):
    """A meta-learned generator initialisation adapted for a few steps per batch."""

    @dataclass
    class Config:
        batch_size: int | str = 256  # "auto": by input and device
        iterations: int = 5  # inner Adam steps per batch (Fast-2 / Fast-5 / Fast-10)
        lr: float = 2e-3  # inner Adam (betas 0.5, 0.999) learning rate of the generator copy
        lr_z: float = 0.01  # inner learning rate of the latent code
        latent_dim: int = 256
        ngf: int | str = 64  # "auto": by input and device
        first_bn_multiplier: float = 1.0
        bn_momentum: float = 0.9  # 0 = plain per-batch BN statistics matching
        meta: str = "reptile"  # reptile | fomaml
        meta_lr: float = 0.5  # Reptile's step towards the adapted generator (fomaml ignores it)
        warmup: int = 0  # first pool batches without the adversarial term (held-out batches do not count)
        adv_temperature: float = 1.0
        crop_pad: int = 4
        flip: bool = True
        keep: str = "best"  # best | last

        def __post_init__(self) -> None:
            check_auto_int(self.batch_size, "synth.batch_size")
            check_auto_int(self.ngf, "synth.ngf")

    def __init__(self, context: SynthContext, config: Any, loss: dict[str, float]) -> None:
        if config.meta not in ("reptile", "fomaml"):
            raise DfkdError(f"synth.meta must be 'reptile' or 'fomaml', got '{config.meta}'")
        if not 0.0 <= config.bn_momentum < 1.0:
            raise DfkdError(f"synth.bn_momentum must be in [0, 1), got {config.bn_momentum}")
        if not 0.0 < config.meta_lr <= 1.0:
            raise DfkdError(f"synth.meta_lr must be in (0, 1] (the fraction of the way to the adapted generator), "
                            f"got {config.meta_lr}")
        self.bn_momentum = config.bn_momentum
        super().__init__(context, config, loss)
        self.pool_batches = 0  # batches added to the pool: the warm-up counts these, not held-out ones
        self.meta_optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.lr * config.iterations,
                                               betas=(0.5, 0.999))

    def _adv_on(self) -> bool:
        return bool(self.loss.get("adv")) and self.pool_batches >= self.config.warmup

    def _start_batch(self, n: int) -> tuple[nn.Module, torch.Tensor, list[torch.optim.Optimizer]]:
        cfg = self.config
        adapted = copy.deepcopy(self.generator)
        z = torch.randn(n, cfg.latent_dim, device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([{"params": adapted.parameters()}, {"params": [z], "lr": cfg.lr_z}],
                                     lr=cfg.lr, betas=(0.5, 0.999))
        self.meta_optimizer.zero_grad(set_to_none=True)
        return adapted, z, [optimizer]

    def _after_backward(self, generator: nn.Module) -> None:
        if self.config.meta != "fomaml" or not self.scaler.finite(generator.parameters()):
            return  # an overflowed fp16 step is skipped by the inner optimizer; the meta-gradient skips it too
        for meta, fast in zip(self.generator.parameters(), generator.parameters()):
            if fast.grad is not None:
                meta.grad = fast.grad.clone() if meta.grad is None else meta.grad + fast.grad

    def _end_batch(self, generator: nn.Module) -> None:
        self.bn.update_momentum()
        if self.config.meta == "fomaml":
            self.meta_optimizer.step()
            return
        with torch.no_grad():
            for meta, fast in zip(self.generator.parameters(), generator.parameters()):
                meta.add_(fast - meta, alpha=self.config.meta_lr)
            # Generator BatchNorm runs in train mode throughout; its buffers follow the adapted copy.
            for meta_buffer, fast_buffer in zip(self.generator.buffers(), generator.buffers()):
                meta_buffer.copy_(fast_buffer)

    def synthesize(self) -> None:
        """One batch into the pool; the first call also makes the remaining warm-up batches."""
        while True:
            self.pool.add(self.make_batch(self.config.batch_size))
            self.pool_batches += 1
            if self.pool_batches > self.config.warmup:
                return

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "pool_batches": self.pool_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        # Checkpoints from before pool batches were counted: all batches made, as the warm-up counted then.
        self.pool_batches = int(state.get("pool_batches", state["batches_made"]))
