"""Generator recipes: DAFL, ZSKT, DFAD and DFQ, on the shared online-generator base class.

- DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019): the generator makes
  inputs the teacher classifies confidently (``oh``: cross-entropy to the teacher's own argmax),
  with large penultimate features (``act``: minus their mean absolute value) and balanced classes
  (``ie``: minus the entropy of the batch-mean prediction, in base 10 as in the authors' released
  code, so the paper's weight ie = 5 means what it meant there; DFQ's ``ie`` is in nats). No
  student feedback, no BatchNorm needed, so it works for LeNet-5.
- ZSKT (Micaelli & Storkey, "Zero-shot Knowledge Transfer via Adversarial Belief Matching",
  NeurIPS 2019): the generator maximises KL(teacher || student) (``adv``), the student minimises it
  (plus attention transfer, see ``train.attention`` in the trainer).
- DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019): the same game with the mean
  absolute logit difference (``adv`` is minus the L1 disagreement; the student uses
  ``train.loss = "l1"``).
- DFQ (Choi et al., "Data-Free Network Quantization With Adversarial Knowledge Distillation",
  CVPRW 2020): BatchNorm-statistics matching (``bn``), confident samples (``ent``: mean per-sample
  entropy of the teacher, minimised), balanced classes (``ie``), and adversarial KL (``adv``).

Every term is written as something the generator minimises, so the adversarial terms are the
negated disagreement; the live display shows the values as minimised.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from dfkd_cli.synth.losses import LOSS_TERMS, BatchNormStatistics, LossInputs, weighted_loss
from dfkd_cli.synth.context import Capabilities
from dfkd_cli.synth.online import OnlineConfig, OnlineGeneratorSynthesizer
from dfkd_cli.synth.registry import register_synthesizer


@dataclass
class GeneratorInputs(LossInputs):
    """Loss inputs plus the teacher's penultimate features and the disagreement measure."""

    features: torch.Tensor | None = None
    disagreement: str = "kl"


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of probabilities."""
    return -(p * p.clamp_min(1e-8).log()).sum(-1)


def disagreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """How much the student disagrees with the teacher: batch-mean KL(teacher || student) at T = 1
    (ZSKT, DFQ) or the mean absolute logit difference (DFAD), in fp32."""
    teacher_logits, student_logits = teacher_logits.float(), student_logits.float()
    if kind == "l1":
        return F.l1_loss(student_logits, teacher_logits)
    log_p_teacher = F.log_softmax(teacher_logits, dim=1)
    return F.kl_div(F.log_softmax(student_logits, dim=1), log_p_teacher, reduction="batchmean", log_target=True)


def _one_hot(inp: LossInputs) -> torch.Tensor:
    return F.cross_entropy(inp.logits, inp.logits.argmax(1))


def _activation(inp: GeneratorInputs) -> torch.Tensor:
    # DAFL's -(1/n) sum ||f||_1, taken per feature as well so the weight does not depend on the width.
    return -inp.features.abs().mean()


def _information_entropy(inp: LossInputs) -> torch.Tensor:
    return -entropy(F.softmax(inp.logits, dim=1).mean(0))


def _information_entropy_log10(inp: LossInputs) -> torch.Tensor:
    """DAFL's ``ie``: minus the batch-mean prediction's entropy in base 10 (ln 10 = 2.3x weaker than nats)."""
    return _information_entropy(inp) / math.log(10)


def _sample_entropy(inp: LossInputs) -> torch.Tensor:
    return entropy(F.softmax(inp.logits, dim=1)).mean()


def _adversarial(inp: GeneratorInputs) -> torch.Tensor:
    if inp.student_logits is None:
        raise RuntimeError("the 'adv' term needs the student's logits")
    return -disagreement(inp.logits, inp.student_logits, inp.disagreement)


GENERATOR_TERMS: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    **LOSS_TERMS, "oh": _one_hot, "act": _activation, "ie": _information_entropy,
    "ent": _sample_entropy, "adv": _adversarial,
}


class PenultimateFeatures:
    """A forward pre-hook on the teacher's classifier that keeps its input (the penultimate
    features), present only inside the context."""

    def __init__(self, model: torch.nn.Module, classifier_name: str) -> None:
        self.module = model.get_submodule(classifier_name)
        self.features: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = inputs[0]

    def __enter__(self) -> "PenultimateFeatures":
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class GeneratorSynthesizer(OnlineGeneratorSynthesizer):
    """Computes the terms of ``terms`` (``GENERATOR_TERMS``) that the recipe weights on each generator batch."""

    disagreement_kind: ClassVar[str] = "kl"
    terms: ClassVar[dict[str, Callable[[LossInputs], torch.Tensor]]] = GENERATOR_TERMS

    def generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        model = self.teacher.model
        wants = {name for name, weight in self.loss.items() if weight}
        features = PenultimateFeatures(model, self.teacher.classifier_name) if "act" in wants else nullcontext()
        statistics = BatchNormStatistics(model) if "bn" in wants else nullcontext()
        with features, statistics:
            logits = model(x)
        inputs = GeneratorInputs(
            x=x, logits=logits,
            bn=statistics if "bn" in wants else None,
            features=features.features if "act" in wants else None,
            student_logits=self.student_logits(x) if "adv" in wants else None,
            disagreement=self.disagreement_kind)
        loss, parts = weighted_loss(self.loss, inputs, self.terms)
        with torch.no_grad():
            probs = F.softmax(logits.detach(), dim=1)
            parts["mean_entropy"] = float(entropy(probs.mean(0)))
        return loss, parts


# The Config defaults below are each paper's own settings; the shipped recipes size them for a CPU.


@register_synthesizer("dafl")
class DAFLSynthesizer(GeneratorSynthesizer):
    """DAFL: one-hot, activation and information-entropy losses; the teacher alone guides it."""

    @dataclass
    class Config(OnlineConfig):
        batch_size: int | str = 512
        latent_dim: int = 100
        ngf: int | str = 64
        lr: float = 0.2

    loss_terms = ("oh", "act", "ie")
    terms = {**GENERATOR_TERMS, "ie": _information_entropy_log10}
    student_on_generator_batch = True


@register_synthesizer("zskt")
class ZSKTSynthesizer(GeneratorSynthesizer):
    """ZSKT: the generator maximises KL(teacher || student)."""

    @dataclass
    class Config(OnlineConfig):
        batch_size: int | str = 128
        latent_dim: int = 100
        ngf: int | str = 64
        lr: float = 1e-3
        schedule: str = "cosine"
        schedule_steps: int = 80000

    loss_terms = ("adv",)


@register_synthesizer("dfad")
class DFADSynthesizer(GeneratorSynthesizer):
    """DFAD: the generator maximises the mean absolute logit difference."""

    @dataclass
    class Config(OnlineConfig):
        batch_size: int | str = 256
        latent_dim: int = 256
        ngf: int | str = 64
        lr: float = 1e-3
        schedule: str = "step"
        schedule_steps: int = 25000

    loss_terms = ("adv",)
    disagreement_kind = "l1"


@register_synthesizer("dfq")
class DFQSynthesizer(GeneratorSynthesizer):
    """DFQ: BatchNorm statistics, confident and balanced classes, adversarial KL."""

    @dataclass
    class Config(OnlineConfig):
        batch_size: int | str = 256
        latent_dim: int = 256
        ngf: int | str = 64
        lr: float = 1e-3

    loss_terms = ("bn", "ent", "ie", "adv")
    capabilities = Capabilities(requires_bn=True, online=True, keeps_pool=False)
