"""Zero-Shot Knowledge Distillation (Nayak, Mopuri, Shaj, Babu, Chakraborty: "Zero-Shot Knowledge
Distillation in Deep Networks", ICML 2019): data impressions.

The teacher's final-layer weights give a class similarity matrix: the cosine similarity of the
class weight vectors, each row min-max normalised to [0, 1]. For every data
impression a class k is chosen and a soft target y ~ Dirichlet(beta * C_k) is sampled, with two
scaling factors (beta = 1.0 gives softer, beta = 0.1 sparser targets; half of the impressions
each). The input, started from uniform random noise, is optimised with Adam so the teacher's
softmax at temperature T = 20 matches y (cross-entropy with soft targets, term ``soft_ce``), with
pixels kept in the range real images can take. The student is then distilled on the pool of
impressions. Only the final linear layer is needed, so teachers without BatchNorm work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.base import Capabilities, Synthesizer, SynthContext
from dfkd_cli.synth.deepinversion import balanced_targets, pixel_range
from dfkd_cli.synth.losses import LossInputs, weighted_loss
from dfkd_cli.synth.registry import register_synthesizer

# Min-max normalisation sends each class's least similar class to 0, which a Dirichlet
# concentration may not be; this floor keeps that class's expected share negligible.
MIN_CONCENTRATION = 1e-3


def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """(num_classes, num_classes) cosine similarities of the rows of the final layer's ``weight``,
    each row min-max normalised to [0, 1] (so the diagonal, a class with itself, is 1)."""
    w = F.normalize(weight.detach().flatten(1).double(), dim=1)
    cosine = w @ w.T
    low = cosine.min(dim=1, keepdim=True).values
    high = cosine.max(dim=1, keepdim=True).values
    return ((cosine - low) / (high - low).clamp_min(1e-12)).float()


def dirichlet_targets(similarity: torch.Tensor, classes: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """One soft target per entry of ``classes``: y ~ Dirichlet(beta * C_k) for class k (a row of
    the class similarity matrix). ``beta`` is one scale or one per entry; rows sum to 1."""
    beta = torch.as_tensor(beta, dtype=torch.float64).reshape(-1, 1)
    concentration = (beta * similarity.double()[classes.cpu()]).clamp_min(MIN_CONCENTRATION)
    # float64: with concentrations near the floor, float32 gamma draws can all underflow to zero.
    y = torch.distributions.Dirichlet(concentration).sample()
    return (y / y.sum(dim=1, keepdim=True)).float()


def beta_schedule(n: int, betas: tuple[float, ...]) -> torch.Tensor:
    """The scaling factor of each of ``n`` impressions: the ``betas`` in turn, equal shares."""
    return torch.tensor([betas[i % len(betas)] for i in range(n)], dtype=torch.float64)


@dataclass
class SoftTargetInputs(LossInputs):
    """Loss inputs with the sampled soft targets and the temperature they are matched at."""

    soft_targets: torch.Tensor | None = None
    temperature: float = 20.0


def soft_cross_entropy(inp: SoftTargetInputs) -> torch.Tensor:
    """Mean over the batch of -sum_i y_i log softmax(logits / T)_i."""
    log_p = F.log_softmax(inp.logits / inp.temperature, dim=1)
    return -(inp.soft_targets * log_p).sum(dim=1).mean()


ZSKD_TERMS = {"soft_ce": soft_cross_entropy}


@register_synthesizer("zskd")
class ZSKDSynthesizer(Synthesizer):
    """Optimises data impressions for Dirichlet-sampled soft targets until the pool holds
    ``impressions`` of them; the student trains on that pool."""

    @dataclass
    class Config:
        batch_size: int = 256  # impressions optimised together
        impressions: int = 24000  # pool size, then synthesis stops (the paper's MNIST count)
        iterations: int = 1500  # Adam steps on the pixels of each batch
        lr: float = 0.01
        temperature: float = 20.0  # of the teacher's softmax matched to the targets
        beta_high: float = 1.0  # Dirichlet scaling factors, half of the impressions each
        beta_low: float = 0.1

        def __post_init__(self) -> None:
            for name in ("batch_size", "impressions", "iterations"):
                if getattr(self, name) < 1:
                    raise DfkdError(f"synth.{name} must be at least 1, got {getattr(self, name)}")
            for name in ("lr", "temperature", "beta_high", "beta_low"):
                if getattr(self, name) <= 0:
                    raise DfkdError(f"synth.{name} must be positive, got {getattr(self, name)}")

    loss_terms = ("soft_ce",)
    capabilities = Capabilities()

    def __init__(self, context: SynthContext, config: Any, loss: dict[str, float]) -> None:
        super().__init__(context, config, loss)
        self.similarity = class_similarity(self._final_weight())

    def _final_weight(self) -> torch.Tensor:
        """The weight of the teacher's final layer: one row per class."""
        name = self.teacher.classifier_name
        weight = getattr(self.teacher.model.get_submodule(name), "weight", None)
        if weight is None or weight.dim() < 2 or weight.shape[0] != self.teacher.num_classes:
            raise DfkdError(f"zskd needs the teacher's final layer '{name}' to have a weight with one row per class; "
                            f"{self.teacher.arch} has none, so pick a recipe that does not read it (e.g. dafl)")
        return weight

    def make_batch(self, n: int) -> torch.Tensor:
        cfg = self.config
        model = self.teacher.model
        classes = balanced_targets(n, self.teacher.num_classes)
        betas = beta_schedule(n, (cfg.beta_high, cfg.beta_low))[torch.randperm(n)]
        targets = dirichlet_targets(self.similarity, classes, betas).to(self.device)
        low, high = pixel_range(self.teacher, self.device)
        # A uniform random image in pixel space, so the start is already inside the valid range.
        x = (low + (high - low) * torch.rand(n, *self.teacher.input_shape, device=self.device)).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=cfg.lr)
        for it in range(cfg.iterations):
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            inputs = SoftTargetInputs(x=x, logits=logits, soft_targets=targets, temperature=cfg.temperature)
            loss, parts = weighted_loss(self.loss, inputs, ZSKD_TERMS)
            self.scaler.backward(loss)
            self.scaler.step(optimizer)
            with torch.no_grad():
                x.data = torch.max(torch.min(x, high), low)
            parts["acc"] = float(  # the teacher's top class is the target's
                (logits.argmax(1) == targets.argmax(1)).float().mean())
            if self.hooks.should_stop(it + 1, cfg.iterations, parts):
                break
        return x.detach()

    def synthesize(self) -> None:
        """Add one batch of impressions, until the pool holds ``impressions`` of them."""
        missing = self.config.impressions - len(self.pool)
        if missing > 0:
            self.pool.add(self.make_batch(min(self.config.batch_size, missing)))
