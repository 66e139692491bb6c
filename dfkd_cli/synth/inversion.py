"""Per-batch generator inversion, shared by CMI (Fang et al., IJCAI 2021) and FastDFKD (Fang et
al., AAAI 2022).

Both make each synthetic batch by optimising a generator and a latent code z with Adam for a few
iterations against the frozen teacher, then add the batch to a growing pool the student trains on:

- ``bn``: BatchNorm-statistics matching (DeepInversion's prior; FastDFKD with momentum),
- ``oh``: cross-entropy of the teacher's prediction to sampled target classes ("one-hot" loss),
- ``adv``: -KL(teacher || student) at temperature ``adv_temperature``, only on the samples where
  teacher and student predict the same class (so the batch moves to where the student starts to
  disagree, without pushing samples across the teacher's decision boundary).

The teacher sees a lightly augmented view (random crop after padding, flips) of the generator's
output. The generator stays in train mode (its BatchNorm uses batch statistics), as in both papers;
the batch kept is the one with the lowest loss seen (``keep = "best"``) or the last one.
Subclasses say where the generator comes from (CMI: re-initialised; Fast: a copy of a meta-learned
one) and what happens after each batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.base import Capabilities, Synthesizer, SynthContext
from dfkd_cli.synth.deepinversion import balanced_targets
from dfkd_cli.synth.generator import Generator, resolve_generator_size
from dfkd_cli.synth.losses import LOSS_TERMS, BatchNormStatistics, LossInputs, weighted_loss
from dfkd_cli.trainer import augment


@dataclass
class InversionInputs(LossInputs):
    """Loss inputs plus the temperature of the masked adversarial term."""

    adv_temperature: float = 1.0


def masked_adversarial(inp: InversionInputs) -> torch.Tensor:
    """-KL(teacher || student) at temperature T, averaged over the batch with the samples where
    teacher and student disagree (different argmax) counted as zero."""
    if inp.student_logits is None:
        raise RuntimeError("the 'adv' term needs the student's logits")
    t = inp.adv_temperature
    log_p_teacher = F.log_softmax(inp.logits / t, dim=1)
    log_p_student = F.log_softmax(inp.student_logits / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)
    agree = (inp.logits.argmax(1) == inp.student_logits.argmax(1)).to(kl.dtype)
    return -(kl * agree).mean()


INVERSION_TERMS: dict[str, Callable[[Any], torch.Tensor]] = {
    "bn": LOSS_TERMS["bn"],
    "oh": LOSS_TERMS["ce"],
    "adv": masked_adversarial,
}


class GeneratorInversion(Synthesizer):
    """Base class: a per-batch Adam loop over a generator and z, the best (or last) batch kept.

    Subclasses implement ``_start_batch`` (the generator, z and optimizers of one batch) and may
    override ``_end_batch`` (e.g. a meta update), ``_after_backward`` and ``_inputs``. Their
    ``Config`` needs at least: batch_size, iterations, latent_dim, ngf, first_bn_multiplier,
    adv_temperature, crop_pad, flip and keep.
    """

    capabilities = Capabilities(requires_bn=True)
    loss_terms = ("bn", "oh", "adv")
    terms: dict[str, Callable[[Any], torch.Tensor]] = INVERSION_TERMS
    bn_momentum: float = 0.0

    def __init__(self, context: SynthContext, config: Any, loss: dict[str, float]) -> None:
        super().__init__(context, config, loss)
        if config.keep not in ("best", "last"):
            raise DfkdError(f"synth.keep must be 'best' or 'last', got '{config.keep}'")
        self.size_note = resolve_generator_size(config, self.teacher.input_shape, self.device)
        if config.iterations < 1 or config.batch_size < 2:
            raise DfkdError("synth.iterations must be >= 1 and synth.batch_size >= 2 (BatchNorm needs a batch)")
        self.generator = Generator(config.latent_dim, config.ngf, self.teacher.input_shape).to(self.device)
        self.bn = BatchNormStatistics(self.teacher.model, config.first_bn_multiplier, self.bn_momentum)
        self.batches_made = 0
        self.last_parts: dict[str, float] = {}

    def generator_module(self) -> nn.Module:
        return self.generator

    def _start_batch(self, n: int) -> tuple[nn.Module, torch.Tensor, list[torch.optim.Optimizer]]:
        """The generator to optimise for one batch of ``n``, its latent code and the optimizers to step."""
        raise NotImplementedError

    def _after_backward(self, generator: nn.Module) -> None:
        """Called between each backward and the optimizer steps."""

    def _end_batch(self, generator: nn.Module) -> None:
        """Called once a batch is done (after its last iteration or an early stop)."""

    def _adv_on(self) -> bool:
        return bool(self.loss.get("adv"))

    def _inputs(self, x: torch.Tensor, targets: torch.Tensor) -> InversionInputs:
        """The teacher (and, for ``adv``, the student) on a lightly augmented view of ``x``."""
        view = augment(x, self.config.crop_pad, self.config.flip)
        self.bn.reset()
        logits = self.teacher.model(view)
        student_logits = self.student_logits(view) if self._adv_on() else None
        return InversionInputs(x=view, logits=logits, targets=targets, bn=self.bn, student_logits=student_logits,
                               adv_temperature=self.config.adv_temperature)

    def _weights(self) -> dict[str, float]:
        return self.loss if self._adv_on() else {k: v for k, v in self.loss.items() if k != "adv"}

    def make_batch(self, n: int) -> torch.Tensor:
        """``n`` inputs from ``iterations`` Adam steps on generator and z (fewer if the run's hooks say stop)."""
        cfg = self.config
        targets = balanced_targets(n, self.teacher.num_classes).to(self.device)
        generator, z, optimizers = self._start_batch(n)
        generator.train()
        best_x, best_loss = None, math.inf
        with self.bn:
            for it in range(cfg.iterations):
                x = generator(z)
                inputs = self._inputs(x, targets)
                loss, parts = weighted_loss(self._weights(), inputs, self.terms)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                self.scaler.backward(loss)
                self.scaler.unscale(*optimizers)  # _after_backward reads true gradients
                self._after_backward(generator)
                self.scaler.step(*optimizers)
                value = float(loss.detach())
                if cfg.keep == "last" or value < best_loss:
                    best_x, best_loss = x.detach(), value
                parts["acc"] = float((inputs.logits.argmax(1) == targets).float().mean())
                self.last_parts = parts
                if self.hooks.should_stop(it + 1, cfg.iterations, parts):
                    break
        self._end_batch(generator)
        self.batches_made += 1
        return best_x

    def status(self) -> dict[str, float]:
        return {"pool": len(self.pool), **{k: v for k, v in self.last_parts.items() if k in ("bn", "oh", "acc")}}

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "generator": self.generator.state_dict(),
                "bn": self.bn.state_dict(), "batches_made": self.batches_made, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"], self.device)
        self.generator.load_state_dict(state["generator"])
        self.bn.load_state_dict(state["bn"], self.device)
        self.batches_made = state["batches_made"]
        self.scaler.load_state_dict(state.get("scaler"))
