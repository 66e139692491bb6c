"""AVKD (Tang & Lin, "Adversarial Variational Knowledge Distillation", ICANN 2021).

The teacher p(y|x) is fixed; a conditional generator G(y, eps) models q(x|y), and unlabelled
images from a related domain (``--prior``) stand for p(x). As in Adversarial Variational Bayes, a
discriminator D(x, y) learns with the logistic loss to tell (G(y, eps), y) (label 1) from
(x_prior, y) (label 0), so that at its optimum D(x, y) = log q(x|y) - log p(x). Each
``synthesize()`` is one iteration of the paper's Algorithm 1, y uniform over the classes:

1. generator step maximising -D(G(y, eps), y) + log p_T(y | G(y, eps)) + KL(p_T || p_S), written as
   the minimised terms ``prior`` (D on generated samples), ``ce`` (cross-entropy of the teacher to
   y) and ``adv`` (minus the teacher-student KL; the student frozen, see ``student_logits``);
2. discriminator step on the generator's batch against a prior batch;
3. the pipeline's ``train.steps_per_round`` student steps on fresh generated samples.

Conditioning: G reads eps concatenated with one-hot(y). D adds a learned per-class vector after its
first convolution, which equals concatenating one-hot label maps as extra input channels (a
convolution of a constant map is a per-class constant) except at the zero-padded border, and costs
nothing for teachers with many classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.adversarial import disagreement
from dfkd_cli.synth.context import Capabilities, SynthContext
from dfkd_cli.synth.online import OnlineConfig, OnlineGeneratorSynthesizer
from dfkd_cli.synth.registry import register_synthesizer


class Discriminator(nn.Module):
    """Three stride-2 convolutions with LeakyReLU, conditioned on the class, then a logit.

    Example:
        >>> d = Discriminator(channels=1, num_classes=10, width=32)
        >>> d(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])).shape
        torch.Size([4])
    """

    def __init__(self, channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, width, 4, stride=2, padding=1)
        self.label = nn.Embedding(num_classes, width)
        self.rest = nn.Sequential(
            nn.LeakyReLU(0.2), nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2), nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.first(x) + self.label(y)[:, :, None, None]
        return self.rest(h).squeeze(1)


@dataclass
class AVKDConfig(OnlineConfig):
    """The paper's 32x32 settings; the shipped recipe sizes them for a CPU."""

    batch_size: int | str = 256
    latent_dim: int = 100
    ngf: int | str = 64
    lr: float = 1e-3  # generator Adam, x0.1 at 20% and 40% of the run
    schedule: str = "step"
    d_width: int = 64  # discriminator channels after its first convolution
    d_lr: float = 2e-4  # discriminator: Nesterov SGD at a constant rate
    d_momentum: float = 0.9
    d_weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_width < 1 or self.d_lr <= 0 or not 0 <= self.d_momentum < 1 or self.d_weight_decay < 0:
            raise DfkdError("discriminator settings need synth.d_width >= 1, synth.d_lr > 0, "
                            "0 <= synth.d_momentum < 1 and synth.d_weight_decay >= 0")


@register_synthesizer("avkd")
class AVKDSynthesizer(OnlineGeneratorSynthesizer):
    """Conditional generator and discriminator against the prior, adversarial to the student."""

    Config = AVKDConfig
    loss_terms = ("prior", "ce", "adv")
    capabilities = Capabilities(online=True, keeps_pool=False, uses_prior=True)

    def __init__(self, context: SynthContext, config: AVKDConfig, loss: dict[str, float]) -> None:
        self.num_classes = context.teacher.num_classes
        super().__init__(context, config, loss)
        channels = self.teacher.input_shape[0]
        self.discriminator = Discriminator(channels, self.num_classes, config.d_width).to(self.device)
        self.d_optimizer = torch.optim.SGD(self.discriminator.parameters(), lr=config.d_lr, nesterov=True,
                                           momentum=config.d_momentum, weight_decay=config.d_weight_decay)
        self.d_scaler = context.precision.scaler()  # the discriminator's loss has its own scale

    def generator_input_dim(self) -> int:
        return self.config.latent_dim + self.num_classes

    def labels(self, n: int) -> torch.Tensor:
        return torch.randint(self.num_classes, (n,), device=self.device)

    def code(self, y: torch.Tensor) -> torch.Tensor:
        """The generator's input for labels ``y``: eps ~ N(0, I) concatenated with one-hot(y)."""
        eps = torch.randn(len(y), self.config.latent_dim, device=self.device)
        return torch.cat([eps, F.one_hot(y, self.num_classes).to(eps.dtype)], dim=1)

    def latent(self, n: int) -> torch.Tensor:
        return self.code(self.labels(n))

    def generator_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted ``prior``, ``ce`` and ``adv`` terms on generated ``x`` for labels ``y``."""
        terms: dict[str, torch.Tensor] = {}
        wants = {name for name, weight in self.loss.items() if weight}
        if "prior" in wants:
            terms["prior"] = self._frozen_discriminator(x, y).mean()
        logits = self.teacher.model(x).float() if wants & {"ce", "adv"} else None
        if "ce" in wants:
            terms["ce"] = F.cross_entropy(logits, y)
        if "adv" in wants:
            terms["adv"] = -disagreement(logits, self.student_logits(x), "kl")
        total = sum((self.loss[name] * value for name, value in terms.items()), x.new_zeros(()))
        return total, {name: float(value.detach()) for name, value in terms.items()}

    def _frozen_discriminator(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.discriminator.requires_grad_(False)
        try:
            return self.discriminator(x, y)
        finally:
            self.discriminator.requires_grad_(True)

    def discriminator_loss(self, fake: torch.Tensor, y_fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Logistic loss: generated pairs are 1, prior images (with labels drawn independently
        and uniformly, as p(x) does not depend on y) are 0."""
        d_fake = self.discriminator(fake, y_fake)
        d_real = self.discriminator(real, self.labels(len(real)))
        return (F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
                + F.binary_cross_entropy_with_logits(d_real, torch.zeros_like(d_real)))

    def synthesize(self) -> None:
        """``g_steps`` iterations of generator step then discriminator step."""
        steps = self.config.g_steps
        for step in range(steps):
            y = self.labels(self.config.batch_size)
            x = self.generator(self.code(y))
            loss, parts = self.generator_loss(x, y)
            self.update_generator(loss)
            d_loss = self.discriminator_loss(x.detach(), y, self.prior_batch(self.config.batch_size))
            self.d_optimizer.zero_grad(set_to_none=True)
            self.d_scaler.backward(d_loss)
            self.world.average_gradients(self.discriminator.parameters())
            self.d_scaler.step(self.d_optimizer)
            self.scheduler.step()
            self.updates += 1
            self.last_parts = {**parts, "g_loss": float(loss.detach()), "d_loss": float(d_loss.detach())}
            if self.hooks.should_stop(step + 1, steps, self.last_parts):
                break

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "discriminator": self.discriminator.state_dict(),
                "d_optimizer": self.d_optimizer.state_dict(), "d_scaler": self.d_scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.discriminator.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.d_scaler.load_state_dict(state.get("d_scaler"))
