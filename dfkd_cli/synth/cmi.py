"""CMI: Contrastive Model Inversion (Fang, Song, Wang, Shen, Wang, Song: "Contrastive Model
Inversion for Data-Free Knowledge Distillation", IJCAI 2021).

Each batch comes from a freshly re-initialised generator and latent code, optimised with Adam
for ``iterations`` steps on the shared inversion losses (``bn``, ``oh``, ``adv``: see
inversion.py) plus a contrastive term ``cr`` that makes the new batch distinguishable from every
sample synthesized before, against mode collapse:

- the embedding of an input is the teacher's global-average-pooled features at every BatchNorm
  layer, concatenated, through a projection head (a two-layer MLP trained jointly with the
  generator and kept across batches);
- instance discrimination (InfoNCE at temperature ``cr_temperature``): for each sample, the
  positive is a differently augmented view of the same sample (a random resized crop and flip),
  the negatives are the other samples of the batch and every entry of a memory bank;
- the memory bank holds the (detached) pooled features of the samples already in the pool, up to
  ``bank_size`` entries, the oldest replaced first.

Only the batches that join the pool are stored in the memory bank; held-out batches are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.synth.context import SynthContext
from dfkd_cli.synth.generator import check_auto_int, reset_parameters
from dfkd_cli.synth.inversion import INVERSION_TERMS, GeneratorInversion, InversionInputs
from dfkd_cli.synth.registry import register_synthesizer


def instance_contrast(queries: torch.Tensor, keys: torch.Tensor, bank: torch.Tensor | None,
                      temperature: float) -> torch.Tensor:
    """InfoNCE over cosine similarities: row i of ``queries`` should pick row i of ``keys`` among
    all ``keys`` and every row of ``bank`` (all three already projected)."""
    q = F.normalize(queries, dim=1)
    candidates = F.normalize(keys, dim=1)
    if bank is not None and len(bank):
        candidates = torch.cat([candidates, F.normalize(bank, dim=1)])
    logits = q @ candidates.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def random_resized_crop(x: torch.Tensor, min_scale: float, flip: bool) -> torch.Tensor:
    """Per sample, a random square crop covering ``min_scale`` to all of the area, resized back to
    full size (bilinear, differentiable), mirrored half the time when ``flip``."""
    n = len(x)
    side = torch.empty(n, device=x.device).uniform_(min_scale, 1.0).sqrt()
    shift = (1 - side)[:, None] * (torch.rand(n, 2, device=x.device) * 2 - 1)
    mirror = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=x.device)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = side * mirror, side, shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class PooledFeatures:
    """Forward hooks recording the global-average-pooled output of every BatchNorm layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.features: list[torch.Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "PooledFeatures":
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        self.features.append(output.flatten(2).mean(2) if output.dim() > 2 else output)

    def take(self) -> torch.Tensor:
        """The recorded features, concatenated per sample, and a fresh start."""
        features, self.features = torch.cat(self.features, dim=1), []
        return features


class FeatureBank:
    """A bounded FIFO of feature rows (the contrastive memory bank)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: torch.Tensor | None = None
        self.count = 0  # rows written so far, ever
        self.next = 0  # slot the next row goes to

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach()[-self.capacity:]
        if self.data is None:
            self.data = rows.new_zeros(self.capacity, rows.shape[1])
        slots = (self.next + torch.arange(len(rows), device=rows.device)) % self.capacity
        self.data[slots] = rows
        self.next = int((self.next + len(rows)) % self.capacity)
        self.count += len(rows)

    def tensor(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[: len(self)]

    def state_dict(self) -> dict[str, Any]:
        return {"data": None if self.data is None else self.data.cpu(), "count": self.count, "next": self.next}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.data = None if state["data"] is None else state["data"].to(device)
        self.count, self.next = state["count"], state["next"]


@dataclass
class ContrastInputs(InversionInputs):
    """Inversion inputs plus the projected embeddings of two views and of the memory bank."""

    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    bank: torch.Tensor | None = None
    cr_temperature: float = 0.1


def _cr(inp: ContrastInputs) -> torch.Tensor:
    return instance_contrast(inp.queries, inp.keys, inp.bank, inp.cr_temperature)


@register_synthesizer("cmi")
class CMISynthesizer(GeneratorInversion):
    """Per-batch re-initialised generator + contrastive memory bank; batches join the pool."""

    @dataclass
    class Config:
        batch_size: int | str = 256  # "auto": by input and device
        iterations: int = 200  # Adam steps per batch, generator re-initialised each batch
        lr: float = 1e-3  # Adam (betas 0.5, 0.999) on generator, z and projection head
        latent_dim: int = 256
        ngf: int | str = 64  # "auto": by input and device
        first_bn_multiplier: float = 1.0
        adv_temperature: float = 1.0
        crop_pad: int = 4  # teacher's view: random crop after this much padding
        flip: bool = True
        keep: str = "best"  # best | last: which iteration's batch joins the pool
        cr_temperature: float = 0.1
        bank_size: int = 4096  # memory bank rows (features of past pool samples)
        head_dim: int = 256  # projection head width
        min_crop_scale: float = 0.25  # contrastive view: smallest crop area fraction

        def __post_init__(self) -> None:
            check_auto_int(self.batch_size, "synth.batch_size")
            check_auto_int(self.ngf, "synth.ngf")

    loss_terms = ("bn", "oh", "adv", "cr")
    terms = {**INVERSION_TERMS, "cr": _cr}

    def __init__(self, context: SynthContext, config: Any, loss: dict[str, float]) -> None:
        super().__init__(context, config, loss)
        self.features = PooledFeatures(self.teacher.model)
        feature_dim = self._embed(torch.zeros(2, *self.teacher.input_shape, device=self.device)).shape[1]
        self.head = nn.Sequential(nn.Linear(feature_dim, config.head_dim), nn.ReLU(inplace=True),
                                  nn.Linear(config.head_dim, config.head_dim)).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=config.lr, betas=(0.5, 0.999))
        self.bank = FeatureBank(config.bank_size)

    @torch.no_grad()
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled teacher features of ``x`` (no gradient), as stored in the memory bank."""
        with self.features:
            self.teacher.model(x)
            return self.features.take()

    def _start_batch(self, n: int) -> tuple[nn.Module, torch.Tensor, list[torch.optim.Optimizer]]:
        reset_parameters(self.generator)
        z = torch.randn(n, self.config.latent_dim, device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([*self.generator.parameters(), z], lr=self.config.lr, betas=(0.5, 0.999))
        return self.generator, z, [optimizer, self.head_optimizer]

    def _inputs(self, x: torch.Tensor, targets: torch.Tensor) -> ContrastInputs:
        cfg = self.config
        if not self.loss.get("cr"):
            return ContrastInputs(**vars(super()._inputs(x, targets)))
        with self.features:
            # The second view goes first: the base class resets the BN losses before its own forward.
            self.teacher.model(random_resized_crop(x, cfg.min_crop_scale, cfg.flip))
            keys = self.features.take()
            inputs = super()._inputs(x, targets)
            queries = self.features.take()
        bank = self.bank.tensor()
        return ContrastInputs(**vars(inputs), queries=self.head(queries), keys=self.head(keys),
                              bank=None if bank is None else self.head(bank), cr_temperature=cfg.cr_temperature)

    def synthesize(self) -> None:
        """One batch into the pool, and its pooled teacher features into the memory bank."""
        x = self.make_batch(self.config.batch_size)
        self.pool.add(x)
        self.bank.add(self._embed(x))

    def status(self) -> dict[str, float]:
        extra = {"cr": self.last_parts["cr"]} if "cr" in self.last_parts else {}
        return {**super().status(), **extra}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "head": self.head.state_dict(),
                "head_optimizer": self.head_optimizer.state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.bank.load_state_dict(state["bank"], self.device)
