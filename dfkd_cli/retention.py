"""Retention for the student update: a memory of earlier synthetic batches and the meta term.

Adversarial data-free KD shifts the synthetic distribution as the generator moves, and the student
forgets what it learnt on earlier batches. ``train.update`` picks the student's loss:

- ``plain``: L_acq(theta; x), the KD loss on the fresh batch ``x`` only.
- ``replay``: L_acq(theta; x) + L_ret(theta; m), with ``m`` drawn from a ring-buffer memory of
  earlier batches and L_ret the same KD loss against the teacher on ``m``.
- ``lra`` ("Learning to Retain while Acquiring", Patel, Mopuri & Qiu, CVPR 2023):
  L_acq(theta; x) + L_ret(theta - alpha * grad L_acq(theta; x); m), so the student moves where
  one acquisition step would not hurt retention. The inner step keeps theta attached (the released
  code detached it, which leaves the meta term without gradient and ``lra`` equal to ``replay``).
  ``exact`` differentiates through the inner gradient (second order); ``first`` treats it as a
  constant (first-order MAML), i.e. the gradient of L_ret at the stepped point.

Example:
    >>> memory = MemoryBank(4096)
    >>> memory.add(x)
    >>> stepped = lra_stepped_params(acq, dict(student.named_parameters()), alpha=0.1, order="exact")
    >>> ret = retention_loss(student, teacher, memory.sample(128), criterion, stepped)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

# criterion(student_logits, teacher_logits) -> scalar loss (the trainer's KD loss)
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ORDERS = ("exact", "first")


class MemoryBank:
    """Ring buffer of past synthetic inputs (detached, on the inputs' device and dtype).

    Example:
        >>> bank = MemoryBank(5)
        >>> bank.add(torch.randn(3, 1, 8, 8)); bank.add(torch.randn(4, 1, 8, 8))
        >>> len(bank), bank.sample(2).shape
        (5, torch.Size([2, 1, 8, 8]))
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"memory capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._data: torch.Tensor | None = None  # allocated on the first add
        self._count = 0  # slots filled
        self._position = 0  # next slot to write

    def __len__(self) -> int:
        return self._count

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Write batch ``x`` over the oldest slots, wrapping; only the last ``capacity`` samples of
        a batch larger than the memory are kept."""
        n = len(x)
        if n == 0:
            return
        if self._data is None:
            self._data = torch.empty((self.capacity, *x.shape[1:]), dtype=x.dtype, device=x.device)
        kept = x[-self.capacity:].detach()
        start = self._position + n - len(kept)
        slots = (start + torch.arange(len(kept), device=self._data.device)) % self.capacity
        self._data[slots] = kept.to(self._data.dtype)
        self._position = (self._position + n) % self.capacity
        self._count = min(self._count + n, self.capacity)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` stored samples drawn uniformly with replacement (the global torch RNG)."""
        if self._data is None or self._count == 0:
            raise RuntimeError("the memory bank is empty: add() a batch before sampling")
        index = torch.randint(0, self._count, (n,), device=self._data.device)
        return self._data[index]

    def state_dict(self) -> dict[str, Any]:
        """The stored samples (slot order) and the write position."""
        data = self._data[: self._count].clone() if self._data is not None else torch.empty(0)
        return {"data": data, "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        data, position = state["data"], int(state["position"])
        if len(data) > self.capacity or not 0 <= position < self.capacity:
            raise ValueError(f"memory state ({len(data)} samples, position {position}) does not fit "
                             f"capacity {self.capacity}")
        self._count, self._position = len(data), position
        self._data = None
        if len(data):
            self._data = torch.empty((self.capacity, *data.shape[1:]), dtype=data.dtype, device=data.device)
            self._data[: len(data)] = data


def retention_loss(student: nn.Module, teacher: nn.Module, x_memory: torch.Tensor, criterion: Criterion,
                   params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """L_ret: ``criterion`` between the student's logits on ``x_memory`` (with ``params`` in place
    of its parameters when given; buffers stay the module's own) and the teacher's (no grad)."""
    with torch.inference_mode():
        teacher_logits = teacher(x_memory)
    teacher_logits = teacher_logits.clone()  # a normal tensor: inference tensors cannot be saved for backward
    if params is None:
        student_logits = student(x_memory)
    else:
        student_logits = functional_call(student, params, (x_memory,))
    return criterion(student_logits, teacher_logits)


def lra_stepped_params(acquisition: torch.Tensor, params: dict[str, torch.Tensor], alpha: float,
                       order: str = "exact") -> dict[str, torch.Tensor]:
    """theta - alpha * grad L_acq(theta), per parameter that requires grad, still attached to
    theta. ``exact`` keeps the graph of the gradient (second order); ``first`` detaches it.
    ``acquisition``'s graph is kept for the caller's backward."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    trainable = {name: p for name, p in params.items() if p.requires_grad}
    grads = torch.autograd.grad(acquisition, list(trainable.values()), create_graph=order == "exact",
                                retain_graph=True, allow_unused=True)
    stepped = {}
    for (name, p), g in zip(trainable.items(), grads):
        if g is None:  # the parameter does not reach L_acq: the inner step leaves it
            stepped[name] = p
            continue
        stepped[name] = p - alpha * (g if order == "exact" else g.detach())
    return stepped
