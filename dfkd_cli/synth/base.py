"""The synthesizer interface and the in-memory synthetic pool."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch

from dfkd_cli.distributed import World
from dfkd_cli.synth.context import Capabilities, RunHooks, StepCallback, SynthContext, frozen_logits, ignore_note

if TYPE_CHECKING:
    from dfkd_cli.prior import PriorData
    from dfkd_cli.teacher import Teacher

__all__ = ["Capabilities", "DiskRows", "StepCallback", "SynthContext", "SyntheticPool", "Synthesizer", "frozen_logits"]


class DiskRows:
    """Float32 rows appended to a file in a temporary folder and read back memory-mapped; the
    folder is removed when the object is collected or the process exits."""

    def __init__(self, row_shape: tuple[int, ...]) -> None:
        self.row_shape = row_shape
        self.folder = Path(tempfile.mkdtemp(prefix="dfkd-pool-"))
        self.path = self.folder / "rows.f32"
        self.count = 0
        self._map: np.memmap | None = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def append(self, x: torch.Tensor) -> None:
        with open(self.path, "ab") as handle:
            handle.write(x.detach().float().cpu().contiguous().numpy().tobytes())
        self.count += len(x)
        self._map = None

    def rows(self, index: np.ndarray) -> torch.Tensor:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.count, *self.row_shape))
        return torch.from_numpy(np.array(self._map[index]))


class SyntheticPool:
    """Synthesized inputs kept as one tensor on the training device, sampled uniformly.

    Past ``memory_limit`` bytes the oldest samples move to a memory-mapped file on disk (``note``
    then says where, and ``on_spill`` is called with it once); sampling is uniform over both.
    """

    def __init__(self, memory_limit: int | None = None, on_spill: Callable[[str], None] = ignore_note) -> None:
        self.memory_limit = memory_limit
        self.on_spill = on_spill
        self.note: str | None = None
        self._chunks: list[torch.Tensor] = []
        self._data: torch.Tensor | None = None
        self._disk: DiskRows | None = None

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks) + (self._disk.count if self._disk else 0)

    def add(self, x: torch.Tensor) -> None:
        self._chunks.append(x.detach().float())  # generators under bf16/fp16 autocast make half precision
        self._data = None
        if self.memory_limit is not None and sum(c.numel() * c.element_size() for c in self._chunks) > self.memory_limit:
            self._spill()

    def clear(self) -> None:
        """Forget every sample (spilled ones too)."""
        self._chunks, self._data, self._disk = [], None, None

    def _spill(self) -> None:
        """Move the oldest samples to disk until the in-memory part fits the limit again."""
        data = self._memory()
        keep = max(1, self.memory_limit // max(data[0].numel() * data.element_size(), 1))
        if self._disk is None:
            self._disk = DiskRows(tuple(data.shape[1:]))
            self.note = (f"the synthetic pool passed {self.memory_limit / 2**20:,.0f} MB in memory; older samples "
                         f"spill to {self._disk.folder} (raise train.pool_memory_mb to keep more in memory)")
            self.on_spill(self.note)
        self._disk.append(data[: len(data) - keep])
        self._chunks, self._data = [data[len(data) - keep :].clone()], None

    def _memory(self) -> torch.Tensor:
        if self._data is None:
            if not self._chunks:
                raise RuntimeError("the synthetic pool is empty: call synthesize() first")
            self._data = torch.cat(self._chunks)
            self._chunks = [self._data]
        return self._data

    def tensor(self) -> torch.Tensor:
        """Every sample as one tensor (spilled ones read back from disk)."""
        data = self._memory()
        if self._disk is None:
            return data
        return torch.cat([self._disk.rows(np.arange(self._disk.count)).to(data.device), data])

    def sample(self, n: int) -> torch.Tensor:
        """``n`` samples drawn uniformly with replacement."""
        data = self._memory()
        if self._disk is None:
            return data[torch.randint(len(data), (n,), device=data.device)]
        return self.rows(torch.randint(len(self), (n,)))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The samples at ``index`` (0 is the oldest), from disk and memory."""
        data = self._memory()
        spilled = self._disk.count if self._disk else 0
        index = index.cpu()
        on_disk = index < spilled
        out = torch.empty(len(index), *data.shape[1:], dtype=data.dtype, device=data.device)
        if self._disk is not None and bool(on_disk.any()):
            out[on_disk.to(data.device)] = self._disk.rows(index[on_disk].numpy()).to(data.device, data.dtype)
        out[(~on_disk).to(data.device)] = data[(index[~on_disk] - spilled).to(data.device)]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.tensor().cpu() if len(self) else None}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.clear()
        if state.get("data") is not None:
            self.add(state["data"].to(device))


class Synthesizer:
    """Base class: subclasses set ``Config`` (a dataclass of settings), ``loss_terms`` and
    ``capabilities``, and register with :func:`dfkd_cli.synth.registry.register_synthesizer`.

    Everything a synthesizer needs comes in its :class:`SynthContext`; ``teacher``, ``device``,
    ``world``, ``prior`` and ``hooks`` are read-only views of it.

    Example:
        >>> synth = NoiseSynthesizer(SynthContext(teacher, torch.device("cpu")), NoiseSynthesizer.Config(), {})
        >>> synth.synthesize(); batch = synth.sample(64)
    """

    @dataclass
    class Config:
        batch_size: int = 256

    loss_terms: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[Capabilities]  # every concrete synthesizer declares its own

    def __init__(self, context: SynthContext, config: Any, loss: dict[str, float]) -> None:
        self.context = context
        self.config = config
        self.loss = dict(loss)
        self.pool = SyntheticPool(context.pool_memory_limit, context.on_spill)
        self.scaler = context.precision.scaler()  # loss scaling for the synthesizer's own backward passes (fp16)
        self._configured_lr: float | None = getattr(config, "lr", None)  # configs without a per-batch rate have none

    @property
    def teacher(self) -> "Teacher":
        return self.context.teacher

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def world(self) -> World:
        """The processes of a distributed run."""
        return self.context.world

    @property
    def prior(self) -> "PriorData | None":
        return self.context.prior

    @property
    def hooks(self) -> RunHooks:
        """The run's progress and stop rule (see :class:`RunHooks`)."""
        return self.context.hooks

    def generator_module(self) -> torch.nn.Module | None:
        """The generator network this synthesizer trains, if it has one (compiled with ``--compile``,
        measured by the probe); None for pixel optimisation and fixed data."""
        return None

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The live student's logits on ``x`` for adversarial terms, differentiable in ``x`` only
        (see :func:`frozen_logits`)."""
        if self.context.student is None:
            raise RuntimeError("this recipe's adversarial term needs the student: build the synthesizer with "
                               "SynthContext(student=StudentView(model))")
        return self.context.student.logits(x)

    def prior_batch(self, n: int) -> torch.Tensor:
        """``n`` prior images on the synthesizer's device (recipes with ``uses_prior``)."""
        if self.prior is None:
            raise RuntimeError("this recipe needs prior images: build the synthesizer with SynthContext(prior=...)")
        return self.prior.sample(n).to(self.device)

    def make_batch(self, n: int) -> torch.Tensor:
        """Synthesize ``n`` new inputs in the teacher's normalised input space."""
        raise NotImplementedError

    def synthesize(self) -> None:
        """Make more data: one batch of ``config.batch_size`` added to the pool."""
        self.pool.add(self.make_batch(self.config.batch_size))

    def sample(self, n: int) -> torch.Tensor:
        """A training batch of ``n`` inputs drawn from the pool."""
        return self.pool.sample(n)

    def preview(self, n: int) -> torch.Tensor:
        """Up to ``n`` distinct training inputs, for looking at (samples.png)."""
        return self.pool.rows(torch.randperm(len(self.pool))[:n])

    def holdout(self, n: int) -> torch.Tensor:
        """``n`` inputs made the same way as training data but never added to the pool."""
        batches, made = [], 0
        while made < n:
            batch = self.make_batch(min(self.config.batch_size, n - made))
            batches.append(batch)
            made += len(batch)
        return torch.cat(batches).float()

    def status(self) -> dict[str, float]:
        """Numbers for the live display (e.g. the pool size or the generator's last losses)."""
        return {"pool": len(self.pool)}

    def set_lr_scale(self, scale: float, state_scale: float) -> None:
        """Run at ``scale`` times the configured learning rates, right after loading a state saved
        at ``state_scale`` times them (the divergence guard lowers the scale after a non-finite
        loss): the loaded optimizers and their schedules' base rates are multiplied by
        ``scale / state_scale``, and ``config.lr`` (the rate of optimizers made per batch, not in
        the state) is set to ``scale`` times its value at construction."""
        factor = scale / state_scale
        for value in vars(self).values():
            if isinstance(value, torch.optim.Optimizer):
                for group in value.param_groups:
                    group["lr"] *= factor
            elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
                value.base_lrs = [lr * factor for lr in value.base_lrs]
        if self._configured_lr is not None:
            self.config.lr = self._configured_lr * scale

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"], self.device)
        self.scaler.load_state_dict(state.get("scaler"))
