"""Measure a student against its teacher: agreement, accuracy, latency and size (loading the
real data: :mod:`dfkd_cli.eval_data`).

Example:
    >>> data = load_eval_data(Path("cifar10_test.npz"), (3, 32, 32), mean, std, class_names)
    >>> report = agreement_report(predict(teacher, data.x), predict(student, data.x), class_names, data.y)
    >>> round(report["top1_agreement"], 3)
    0.912
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["agreement_report", "count_params", "file_size_bytes", "median_ms", "onnx_latency_ms", "predict",
           "torch_latency_ms"]

# A latency measurement stops early past this many seconds, after _MIN_TIMED timed passes: a teacher at
# ~1 s a pass (vit_b_16 on 2 CPU cores) is timed 3 times instead of 23 calls in all (27 s -> ~5 s).
LATENCY_BUDGET_S = 3.0
_MIN_TIMED = 3


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits of ``model`` (already on ``device``) for ``x``, in eval mode, batched, returned as float32 on CPU.

    The model's train/eval mode is restored afterwards.

    Example:
        >>> predict(teacher, torch.zeros(3, 3, 32, 32)).shape
        torch.Size([3, 10])
    """
    was_training = model.training
    model.eval()
    try:
        outputs = [model(batch.to(device)).float().cpu() for batch in x.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def agreement_report(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    class_names: list[str],
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Top-1 agreement of student with teacher, overall and per class (keyed by the teacher's prediction).

    With ``labels`` the report also holds ``teacher_accuracy``, ``student_accuracy`` and, per class
    (keyed by the true label), ``n_labelled`` and ``student_accuracy``. Classes never predicted (or
    never present) get ``None`` for the undefined fraction.

    Example:
        >>> t = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> agreement_report(t, s, ["cat", "dog"])["per_class"]["dog"]
        {'n': 1, 'agreement': 0.0}
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.ndim != 2 or len(teacher_logits) == 0:
        raise ValueError(f"need two equal [N>0, K] logit tensors, got {list(teacher_logits.shape)} and {list(student_logits.shape)}")
    if len(class_names) != teacher_logits.shape[1] or len(set(class_names)) != len(class_names):
        raise ValueError(f"need {teacher_logits.shape[1]} distinct class names, got {len(class_names)}")
    teacher_pred, student_pred = teacher_logits.argmax(1).cpu(), student_logits.argmax(1).cpu()
    agree = teacher_pred == student_pred
    report: dict[str, Any] = {"n": len(agree), "top1_agreement": _mean(agree)}
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        predicted_here = teacher_pred == index
        per_class[name] = {"n": int(predicted_here.sum()), "agreement": _mean(agree[predicted_here])}
    if labels is not None:
        labels = labels.cpu()
        if labels.shape != agree.shape:
            raise ValueError(f"labels shape {list(labels.shape)} does not match {len(agree)} samples")
        report["teacher_accuracy"] = _mean(teacher_pred == labels)
        report["student_accuracy"] = _mean(student_pred == labels)
        for index, name in enumerate(class_names):
            labelled_here = labels == index
            per_class[name]["n_labelled"] = int(labelled_here.sum())
            per_class[name]["student_accuracy"] = _mean((student_pred == labels)[labelled_here])
    report["per_class"] = per_class
    return report


def _mean(hits: torch.Tensor) -> float | None:
    return float(hits.float().mean()) if hits.numel() else None


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def file_size_bytes(path: Path) -> int:
    """Size of the file at ``path`` in bytes."""
    return os.path.getsize(path)


def torch_latency_ms(
    model: nn.Module, input_shape: tuple[int, int, int], batch_size: int = 1, warmup: int = 3, iters: int = 20
) -> float:
    """Median wall-clock milliseconds per forward pass of one batch on the CPU (threads as configured).

    A model on another device is measured on a CPU copy; the caller's module is not moved.

    Example:
        >>> torch_latency_ms(student, (3, 32, 32)) > 0
        True
    """
    on_cpu = all(p.device.type == "cpu" for p in chain(model.parameters(), model.buffers()))
    module = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = module.training
    module.eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            return median_ms(lambda: module(x), warmup, iters)
    finally:
        module.train(was_training)


def onnx_latency_ms(
    path: Path, input_shape: tuple[int, int, int], batch_size: int = 1, warmup: int = 3, iters: int = 20
) -> float:
    """Median wall-clock milliseconds per batch for an ONNX model in onnxruntime on the CPU.

    Example:
        >>> onnx_latency_ms(Path("student.onnx"), (3, 32, 32)) > 0
        True
    """
    from dfkd_cli.export import onnx_session

    session = onnx_session(Path(path))
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch_size, *input_shape), dtype=np.float32)}
    return median_ms(lambda: session.run(None, feed), warmup, iters)


def median_ms(run: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of up to ``iters`` timed calls after up to ``warmup`` untimed ones; once
    ``LATENCY_BUDGET_S`` has passed, warm-up stops (after one call) and so does timing (after three)."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    deadline = time.perf_counter() + LATENCY_BUDGET_S
    for _ in range(warmup):
        run()
        if time.perf_counter() > deadline:
            break
    timings: list[float] = []
    while len(timings) < iters and not (len(timings) >= _MIN_TIMED and time.perf_counter() > deadline):
        start = time.perf_counter()
        run()
        timings.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(timings))
