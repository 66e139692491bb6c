"""The batch types that flow from a synthesizer to the student trainer, one per modality.

An image batch is a float tensor ``[N, C, H, W]`` in the teacher's normalised input space. A text
batch is a :class:`TextBatch`: the texts with the teacher's logits for them (computed once, when
a text is made, so a student step runs the student alone). The run (held-out selection, the race,
checkpoints) handles both through the few operations here: ``len``, slicing, :func:`concat`, and
:func:`batch_state` / :func:`batch_from_state` for checkpoints (plain lists and tensors only, so a
checkpoint still loads with ``torch.load(weights_only=True)``).

Example:
    >>> batch = TextBatch(["a fine film", "dull"], torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    >>> len(concat([batch, batch[:1]]))
    3
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch


@dataclass
class TextBatch:
    """Texts and the teacher's float32 logits for them (``[N, classes]``, on the CPU)."""

    texts: list[str]
    logits: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.logits):
            raise ValueError(f"{len(self.texts)} texts but {len(self.logits)} rows of logits")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: slice | torch.Tensor) -> "TextBatch":
        """The rows at ``index``: a slice, or a tensor of row numbers."""
        if isinstance(index, slice):
            return TextBatch(self.texts[index], self.logits[index])
        rows = index.cpu()
        return TextBatch([self.texts[i] for i in rows.tolist()], self.logits[rows])

    def teacher_classes(self) -> torch.Tensor:
        return self.logits.argmax(1)


Batch = Union[torch.Tensor, TextBatch]


def concat(parts: Sequence[Batch]) -> Batch:
    """The rows of every part, in order (parts are all tensors or all text batches)."""
    if isinstance(parts[0], TextBatch):
        return TextBatch([text for part in parts for text in part.texts], torch.cat([part.logits for part in parts]))
    return torch.cat(list(parts))


def batch_state(batch: Batch) -> Any:
    """``batch`` as checkpoint data: a tensor as it is, a text batch as a plain dict."""
    if isinstance(batch, TextBatch):
        return {"texts": list(batch.texts), "logits": batch.logits}
    return batch


def batch_from_state(state: Any) -> Batch:
    """The batch :func:`batch_state` saved."""
    if isinstance(state, dict):
        return TextBatch(list(state["texts"]), state["logits"].cpu())
    return state
