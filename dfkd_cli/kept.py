"""The student a run keeps: the latest whose held-out agreement is within noise of the best seen.

Near the end of a schedule, students differ on a few hundred held-out samples by less than one
standard error of the measurement, so keeping the strictly best would often ship an earlier,
less-trained student (the one-standard-error rule). Both trainers, image and text, keep theirs in a
:class:`KeptStudent`; selection never looks at real data.

Example:
    >>> kept = KeptStudent()
    >>> for step, agreement in enumerate([0.55, 0.53, 0.48, 0.54], start=1):
    ...     _ = kept.offer(agreement, 256, step, {"w": torch.zeros(1)})
    >>> kept.step, kept.agreement, kept.peak
    (4, 0.54, 0.55)
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


def within_noise(agreement: float, peak: float, samples: int) -> bool:
    """Whether a held-out ``agreement`` on ``samples`` samples is within one standard error of the
    ``peak`` agreement seen: the two are then not measurably different, and selection keeps the
    later student, which has had more of the learning-rate schedule.

    Example:
        >>> within_noise(0.53, 0.55, 256), within_noise(0.49, 0.55, 256)  # one s.e. is 3.1 points
        (True, False)
    """
    return agreement >= peak - math.sqrt(max(peak * (1 - peak), 0.0) / max(samples, 1))


class KeptStudent:
    """The kept student's weights, step and held-out agreement, and the highest agreement seen."""

    def __init__(self) -> None:
        self.agreement = -1.0
        self.peak = -1.0
        self.step = 0
        self.weights: dict[str, torch.Tensor] | None = None

    def offer(self, agreement: float, samples: int, step: int, weights: dict[str, torch.Tensor]) -> bool:
        """Keep a copy of ``weights`` when their ``agreement`` on ``samples`` held-out samples is
        within noise of the best seen (this one included); returns whether they were kept."""
        self.peak = max(self.peak, agreement)
        if not within_noise(agreement, self.peak, samples):
            return False
        self.agreement, self.step, self.weights = agreement, step, copy.deepcopy(weights)
        return True

    def choose(self, scored: list[tuple[float, int, dict[str, torch.Tensor]]], samples: int) -> float:
        """Keep the latest of ``(agreement, step, weights)`` candidates, in step order, within noise
        of the best among them; returns its agreement."""
        self.peak = max(agreement for agreement, _, _ in scored)
        kept = [entry for entry in scored if within_noise(entry[0], self.peak, samples)]
        self.agreement, self.step, self.weights = kept[-1]
        return self.agreement

    def restore(self, model: Any) -> Any:
        """Load the kept weights (if any) into ``model``, put it in eval mode and return it."""
        if self.weights is not None:
            model.load_state_dict(self.weights)
        return model.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"best_agreement": self.agreement, "best_step": self.step, "peak_agreement": self.peak,
                "best_state": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.agreement, self.step = float(state["best_agreement"]), int(state["best_step"])
        self.peak = float(state.get("peak_agreement", self.agreement))  # checkpoints from before the rule
        self.weights = state["best_state"]
