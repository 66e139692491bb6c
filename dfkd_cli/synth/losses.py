"""Named loss terms that synthesizers weight, e.g. ``ce``, ``bn``, ``tv_l2``, ``l2``, ``adv``.

A recipe's ``[synth.loss]`` table gives each term's weight; a term with weight 0 is not computed.

Example:
    >>> total, parts = weighted_loss({"ce": 1.0, "tv_l2": 1e-4}, LossInputs(x=x, logits=t(x), targets=y))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormStatistics:
    """Forward hooks on every BatchNorm layer of a model that compare the batch's feature
    statistics with the layer's running statistics (DeepInversion's feature-distribution prior).

    With ``momentum`` m > 0 (FastDFKD's BN momentum), the statistics compared are an exponential
    moving average over batches: m * (earlier batches' average, detached) + (1 - m) * (this batch),
    so one small batch need not match the running statistics on its own. ``update_momentum()``
    folds the last recorded batch into the average; the first batch compares its own statistics.

    Use as a context manager so the hooks exist only while synthesizing.
    """

    def __init__(self, model: nn.Module, first_multiplier: float = 1.0, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"BatchNorm statistics momentum must be in [0, 1), got {momentum}")
        self.model = model
        self.first_multiplier = first_multiplier
        self.momentum = momentum
        self.layer_losses: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        # Per layer, in model.modules() order: the moving (mean, var) and the last batch's (mean, var).
        self.average: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self._last: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)

    def __enter__(self) -> "BatchNormStatistics":
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        x = inputs[0].float()  # fp16/bf16 activations under autocast; statistics in fp32
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        if self.momentum > 0:
            index = self._index[id(module)]
            self._last[index] = (mean.detach(), var.detach())
            if self.average[index] is not None:
                avg_mean, avg_var = self.average[index]
                mean = self.momentum * avg_mean + (1 - self.momentum) * mean
                var = self.momentum * avg_var + (1 - self.momentum) * var
        loss = torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2)
        self.layer_losses.append(loss)

    def update_momentum(self) -> None:
        """Fold the statistics of the last batch seen into the moving average (momentum > 0)."""
        m = self.momentum
        for i, last in enumerate(self._last):
            if last is None:
                continue
            avg = self.average[i]
            self.average[i] = last if avg is None else (m * avg[0] + (1 - m) * last[0], m * avg[1] + (1 - m) * last[1])
            self._last[i] = None

    def state_dict(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]]:
        return {"average": [None if a is None else (a[0].cpu(), a[1].cpu()) for a in self.average]}

    def load_state_dict(self, state: dict[str, list], device: torch.device) -> None:
        self.average = [None if a is None else (a[0].to(device), a[1].to(device)) for a in state["average"]]

    def reset(self) -> None:
        self.layer_losses = []

    def loss(self) -> torch.Tensor:
        """Sum over layers of ||mu - running_mu|| + ||var - running_var||, the first layer weighted."""
        if not self.layer_losses:
            raise RuntimeError("no BatchNorm statistics were recorded: run the model inside the context first")
        first, *rest = self.layer_losses
        return self.first_multiplier * first + sum(rest, torch.zeros_like(first))


@dataclass
class LossInputs:
    """What the loss terms may look at for one synthesis iteration."""

    x: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor | None = None
    bn: BatchNormStatistics | None = None
    student_logits: torch.Tensor | None = None


def total_variation(x: torch.Tensor, p: int) -> torch.Tensor:
    """Total variation over horizontal, vertical and both diagonal neighbours, as DeepInversion
    defines its image priors: summed over the four directions, each direction's differences give

    - p = 1: their mean absolute value (per pixel, so the same for any batch size);
    - p = 2: their l2 norm over the whole batch, not divided by the batch size: it grows with
      sqrt(batch size), and the recipes' ``tv_l2`` weights are the reference code's for that term.
    """
    diffs = (
        x[:, :, :, 1:] - x[:, :, :, :-1],
        x[:, :, 1:, :] - x[:, :, :-1, :],
        x[:, :, 1:, 1:] - x[:, :, :-1, :-1],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
    )
    if p == 1:
        return sum(d.abs().mean() for d in diffs)
    return sum(torch.linalg.vector_norm(d) for d in diffs)


def _ce(inp: LossInputs) -> torch.Tensor:
    return F.cross_entropy(inp.logits, inp.targets)


def _bn(inp: LossInputs) -> torch.Tensor:
    return inp.bn.loss()


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.clamp_min(1e-8).log() - q.clamp_min(1e-8).log())).sum(1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of JS(p || q) for rows of probabilities, in nats (at most log 2)."""
    m = 0.5 * (p + q)
    return (0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)).mean()


def _competition(inp: LossInputs, temperature: float = 3.0) -> torch.Tensor:
    """Adaptive DeepInversion's competition term 1 - JS(teacher, student) at T=3, normalised by
    log 2 so it lies in [0, 1]: minimising it seeks inputs where the student disagrees."""
    if inp.student_logits is None:
        raise RuntimeError("the 'adv' term needs the student's logits")
    p_teacher = F.softmax(inp.logits / temperature, dim=1)
    p_student = F.softmax(inp.student_logits / temperature, dim=1)
    return 1.0 - jensen_shannon(p_teacher, p_student) / math.log(2)


def _l2(inp: LossInputs) -> torch.Tensor:
    return torch.norm(inp.x.flatten(1), dim=1).mean()


LOSS_TERMS: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    "ce": _ce,
    "bn": _bn,
    "tv_l1": lambda inp: total_variation(inp.x, 1),
    "tv_l2": lambda inp: total_variation(inp.x, 2),
    "l2": _l2,
    "adv": _competition,
}


def weighted_loss(weights: dict[str, float], inputs: LossInputs,
                  terms: dict[str, Callable[[LossInputs], torch.Tensor]] = LOSS_TERMS) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of weight * term over the non-zero weights; also each term's unweighted value.

    ``terms`` maps names to term functions: a synthesizer module with terms of its own passes
    ``{**LOSS_TERMS, "name": fn, ...}`` (and a ``LossInputs`` subclass with the extra fields)."""
    inputs = _in_fp32(inputs)
    total = inputs.x.new_zeros(())
    parts: dict[str, float] = {}
    with torch.autocast(inputs.x.device.type, enabled=False):
        for name, weight in weights.items():
            if weight == 0:
                continue
            value = terms[name](inputs)
            total = total + weight * value
            parts[name] = float(value.detach())
    return total, parts


def _in_fp32(inputs: LossInputs) -> LossInputs:
    """``inputs`` with its floating-point tensors in fp32: under fp16/bf16 autocast the networks'
    outputs are half precision, and softmax, logs and sums over them lose the loss's accuracy
    (at T = 20 the KL divergence of identical logits came out 0.04 in fp16). The cast is differentiable, gradients flow as before."""
    changes = {f.name: value.float() for f in dataclasses.fields(inputs)
               if isinstance(value := getattr(inputs, f.name), torch.Tensor) and value.is_floating_point()}
    return dataclasses.replace(inputs, **changes)
