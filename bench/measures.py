"""Speed and memory from a run's report.json, beside the accuracy in every bench table.

`dfkd compress` reports its throughput meter (``run.throughput.student_samples_per_s``) and each
stage's peak memory (``run.peak_memory_mb``); bench/kd_baselines.py reports its steps, batch size
and distillation seconds, and no memory.

    >>> samples_per_s({"run": {"steps": 100, "train": {"batch_size": 64}, "wall_clock_s": {"distill": 4.0}}})
    1600.0
"""

from __future__ import annotations

from typing import Any


def samples_per_s(report: dict[str, Any] | None) -> float | None:
    """Student samples per second: the compress report's meter, else a KD report's steps x batch
    size over its distillation seconds; None when the report has neither."""
    run = (report or {}).get("run") or {}
    meter = (run.get("throughput") or {}).get("student_samples_per_s")
    if meter is not None:
        return meter
    seconds = (run.get("wall_clock_s") or {}).get("distill")
    if not seconds or run.get("steps") is None or "batch_size" not in (run.get("train") or {}):
        return None
    return run["steps"] * run["train"]["batch_size"] / seconds


def peak_memory(report: dict[str, Any] | None) -> str | None:
    """The highest peak over the run's stages, in MiB: CUDA allocated where measured, and resident memory."""
    stages = ((report or {}).get("run") or {}).get("peak_memory_mb") or {}
    rss = [s["rss"] for s in stages.values() if s.get("rss") is not None]
    cuda = [s["cuda_allocated"] for s in stages.values() if s.get("cuda_allocated") is not None]
    parts = ([f"CUDA {max(cuda):,.0f}"] if cuda else []) + ([f"RSS {max(rss):,.0f}"] if rss else [])
    return " / ".join(parts) or None
