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
from dfkd_cli.precision import LossScaler, Precision

if TYPE_CHECKING:
    from dfkd_cli.prior import PriorData
    from dfkd_cli.teacher import Teacher

# Called after each synthesis iteration with (iteration, total, loss parts); returns True to stop early.
StepCallback = Callable[[int, int, dict[str, float]], bool]


def _never_stop(step: int, total: int, parts: dict[str, float]) -> bool:
    return False


def frozen_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode with its weights frozen for this pass: gradients reach ``x`` only
    (no weight gradients the model's own optimizer would have to discard), and the model's
    BatchNorm statistics, training mode and ``requires_grad`` flags are left as they were."""
    was_training = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        return model(x)
    finally:
        for module, mode in zip(model.modules(), was_training):
            module.training = mode
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)


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

    def __init__(self, memory_limit: int | None = None) -> None:
        self.memory_limit = memory_limit
        self.on_spill: Callable[[str], None] = lambda note: None
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
        self._chunks, self._data, self._disk = [], None, None
        if state.get("data") is not None:
            self.add(state["data"].to(device))


class Synthesizer:
    """Base class: subclasses set ``Config`` (a dataclass of settings) and ``loss_terms``.

    Example:
        >>> synth = NoiseSynthesizer(teacher, NoiseSynthesizer.Config(), {}, torch.device("cpu"))
        >>> synth.synthesize(); batch = synth.sample(64)
    """

    @dataclass
    class Config:
        batch_size: int = 256

    loss_terms: ClassVar[tuple[str, ...]] = ()
    requires_bn: ClassVar[bool] = False
    # Online synthesizers (a generator trained alongside the student) make each batch fresh from
    # their current state, so held-out samples are drawn along the run, not once at the start.
    online: ClassVar[bool] = False
    # Recipes that read unlabelled images from a related domain (``--prior``): the pipeline sets
    # ``self.prior`` (a :class:`dfkd_cli.prior.PriorData`) before the first ``synthesize()``;
    # ``prior_holdout``: the student is selected on prior images held out of the stream.
    # Whether the training data is ``self.pool`` (what ``--save-synthetic`` then saves); recipes that
    # make every batch fresh set it False and the pipeline records a sample of their batches instead.
    keeps_pool: ClassVar[bool] = True
    uses_prior: ClassVar[bool] = False
    prior_holdout: ClassVar[bool] = False

    def __init__(self, teacher: "Teacher", config: Any, loss: dict[str, float], device: torch.device) -> None:
        self.teacher = teacher
        self.config = config
        self.loss = dict(loss)
        self.device = device
        self.pool = SyntheticPool()
        self.on_step: StepCallback = _never_stop
        # Share of the run done (student steps or time budget, whichever is further), for schedules
        # that span the whole run; set by the pipeline.
        self.run_progress: Callable[[], float] = lambda: 0.0
        # The student being trained, set by the pipeline for terms that need its feedback (``adv``).
        self.student: torch.nn.Module | None = None
        self.prior: "PriorData | None" = None
        self.world = World()  # the processes of a distributed run (set by the pipeline)
        self.scaler = LossScaler()  # loss scaling for the synthesizer's own backward passes (fp16)

    def use_precision(self, precision: Precision) -> None:
        """Scale this synthesizer's losses as ``precision`` needs (the pipeline calls it once)."""
        self.scaler = precision.scaler()

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The live student's logits on ``x`` for adversarial terms, differentiable in ``x`` only
        (see :func:`frozen_logits`)."""
        if self.student is None:
            raise RuntimeError("this recipe's adversarial term needs the student: set synthesizer.student first")
        return frozen_logits(self.student, x)

    def prior_batch(self, n: int) -> torch.Tensor:
        """``n`` prior images on the synthesizer's device (recipes with ``uses_prior``)."""
        if self.prior is None:
            raise RuntimeError("this recipe needs prior images: set synthesizer.prior first")
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

    def scale_lr(self, factor: float) -> None:
        """Multiply every learning rate the synthesizer uses by ``factor`` (the divergence guard
        lowers it after a non-finite loss): its optimizers, their schedules' base rates, and
        ``config.lr`` for optimizers made per batch."""
        for value in vars(self).values():
            if isinstance(value, torch.optim.Optimizer):
                for group in value.param_groups:
                    group["lr"] *= factor
            elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
                value.base_lrs = [lr * factor for lr in value.base_lrs]
        if hasattr(self.config, "lr"):
            self.config.lr *= factor

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state["pool"], self.device)
        self.scaler.load_state_dict(state.get("scaler"))
