"""The plan of a ``dfkd compress`` run: everything resolved before any work, with where it came from.

The pipeline builds a :class:`Plan` after loading the inputs and probing a few real steps
(:mod:`dfkd_cli.probe`), prints it on stderr, records it in report.json, and with ``--dry-run``
stops there. Every estimate is measured on this device; the live display corrects it as the run goes.

Example:
    >>> plan.lines()[:2]
    ['teacher: resnet8, 10 classes, 78,042 parameters, BatchNorm (19 layers), sha256 3f2a...',
     'input: 1x32x32 (--input-shape); normalisation mean [0.1307] std [0.3081] (--normalize mnist)']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dfkd_cli.autopilot import Adjustment


@dataclass(frozen=True)
class Stage:
    """One stage of the run: its share of the budget (None: not bounded by it) and estimated seconds."""

    name: str
    estimate_s: float
    budget_s: float | None = None
    note: str = ""

    def line(self) -> str:
        bound = f", at most {_duration(self.budget_s)}" if self.budget_s is not None else ""
        return f"  {self.name:<10} ~{_duration(self.estimate_s)}{bound}{f' ({self.note})' if self.note else ''}"


@dataclass
class Plan:
    """What a run will do, resolved before it starts (see the module doc)."""

    teacher: dict[str, Any]
    input_shape: list[int]
    input_shape_from: str
    mean: list[float]
    std: list[float]
    normalisation_from: str
    student: str
    student_from: str
    recipe: str
    recipe_reason: str
    race: list[str]
    device: str
    precision: str
    time_budget_s: float | None
    steps: int
    device_settings: list[str] = field(default_factory=list)
    adjustments: list[Adjustment] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    available_memory_mb: float | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    budget_binds: bool = False  # the budget, not the step count, is expected to end training
    export_s: float = 0.0  # seconds of the budget kept for export and evaluation

    @property
    def estimate_s(self) -> float:
        return sum(stage.estimate_s for stage in self.stages)

    def lines(self) -> list[str]:
        """The plan as lines for stderr."""
        t = self.teacher
        bn = f"BatchNorm ({t['bn_layers']} layers)" if t["bn_layers"] else "no BatchNorm"
        budget = _duration(self.time_budget_s) if self.time_budget_s is not None else "none (--time-budget none)"
        lines = [
            f"plan: teacher {t['arch']}, {t['num_classes']} classes, {t['params']:,} parameters, {bn}",
            f"  input {'x'.join(map(str, self.input_shape))} ({self.input_shape_from})",
            f"  normalisation mean {_floats(self.mean)} std {_floats(self.std)} ({self.normalisation_from})",
            f"  student {self.student} ({self.student_from})",
            f"  recipe {self.recipe} ({self.recipe_reason})",
            f"  device {self.device}, precision {self.precision}; budget {budget}, {self.steps} student steps at most",
        ]
        lines += [f"  device setting: {note}" for note in self.device_settings]
        lines += [f"  adjusted: {adjustment}" for adjustment in self.adjustments]
        lines += ["  stages (estimates from timing real steps on this device):"]
        lines += [stage.line() for stage in self.stages]
        available = f" of {self.available_memory_mb:,.0f} MB available" if self.available_memory_mb else ""
        lines.append(f"  total ~{_duration(self.estimate_s)}; peak memory ~{self.peak_memory_mb:,.0f} MB{available}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adjustments"] = [adjustment.to_dict() for adjustment in self.adjustments]
        data["estimate_s"] = round(self.estimate_s, 1)
        data["stages"] = [{**dataclasses.asdict(stage), "estimate_s": round(stage.estimate_s, 3)}
                          for stage in self.stages]
        return data


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
