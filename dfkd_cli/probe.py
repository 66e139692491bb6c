"""Time and size a few real steps of a run before it starts, so the plan's estimates are measured.

The probe builds a throwaway copy of the run (its own student copy and synthesizer, small batches,
the random number generators forked), times a couple of synthesis iterations, a sample and two
student steps, and records how many activation bytes one sample costs each network. Nothing of it
reaches the real run: the seed gives the same student with or without a probe.

Example:
    >>> costs = probe_run(build_probe_run, recipe)
    >>> costs.round_seconds(recipe)  # one synthesis round of the real batch sizes
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dfkd_cli.trainer import predict_classes

PROBE_BATCH = 4  # samples per first probe step: cheap for any teacher (small networks are probed again)
PROBE_ITERATIONS = 1  # synthesis iterations timed per probe batch
ACTIVATION_FACTOR = 1.5  # bytes held per byte of module outputs in a training step (see _probe_at)
REPROBE_SECONDS = 3.0  # real batches estimated below this are probed again at their real size


@dataclass
class Costs:
    """Measured per-sample costs of one recipe on this device.

    ``iteration_s``: one synthesis iteration (a pass through the teacher and back) per sample;
    ``iterations``: iterations per synthesized batch; ``sample_s`` and ``step_s``: drawing a
    training sample and a student step per sample; ``bytes_per_sample``: activation memory of one
    sample in synthesis and in a student step.
    """

    iteration_s: float
    iterations: int
    sample_s: float
    step_s: float
    bytes_per_sample: dict[str, float]
    probe_s: float
    first_round_batches: int = 1  # batches the first synthesize() makes (warm-up batches, e.g. FastDFKD's)
    teacher_s: float = 0.0  # the teacher's inference per sample (labelling after training, evaluation)

    def batch_seconds(self, synth_batch: int) -> float:
        """One synthesized batch of ``synth_batch`` samples."""
        return self.iteration_s * self.iterations * synth_batch

    def steps_seconds(self, steps: int, train_batch: int, steps_per_round: int, synth_batch: int) -> float:
        """``steps`` student steps with the synthesis rounds they need."""
        rounds = math.ceil(steps / max(steps_per_round, 1)) + self.first_round_batches - 1
        return rounds * self.batch_seconds(synth_batch) + steps * train_batch * (self.sample_s + self.step_s)

    def to_dict(self) -> dict[str, Any]:
        return {key: (round(value, 6) if isinstance(value, float) else value)
                for key, value in dataclasses.asdict(self).items()}


class ActivationBytes:
    """Sums the bytes of every module output during a forward pass (what autograd keeps)."""

    def __init__(self, *models: nn.Module | None) -> None:
        self.total = 0
        self._handles = [module.register_forward_hook(self._hook)
                         for model in models if model is not None for module in model.modules()
                         if not list(module.children())]

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.total += output.numel() * 4  # counted as fp32: the larger of the precisions

    def __enter__(self) -> "ActivationBytes":
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


class _IterationTimer:
    """A stop rule (see :class:`dfkd_cli.synth.RunHooks`) that ends each synthesized batch after
    ``PROBE_ITERATIONS``."""

    def __init__(self) -> None:
        self.calls = 0
        self.batches = 0
        self.total = 1

    def __call__(self, iteration: int, total: int, parts: dict[str, float]) -> bool:
        self.calls += 1
        self.batches += iteration == 1
        self.total = max(total, 1)
        return iteration >= PROBE_ITERATIONS


def probe_run(build: Callable[[int], tuple[Any, Any]], synth_batch: int, train_batch: int) -> Costs:
    """Measure a run built by ``build(batch)`` (a synthesizer and a student trainer of probe size).

    ``synth_batch`` and ``train_batch`` are the real run's sizes. The probe first uses
    :data:`PROBE_BATCH` samples; where the real batches then look cheap (under
    :data:`REPROBE_SECONDS`) it measures again at the real size, since small batches overstate
    the per-sample cost of small networks.
    """
    small = _probe_at(build, max(2, min(PROBE_BATCH, synth_batch, train_batch)))
    full = min(synth_batch, train_batch)
    cheap = (small.batch_seconds(synth_batch) < REPROBE_SECONDS
             and train_batch * (small.sample_s + small.step_s) < REPROBE_SECONDS)
    if full <= PROBE_BATCH or not cheap:
        return small
    costs = _probe_at(build, full)
    costs.probe_s += small.probe_s
    return costs


def _probe_at(build: Callable[[int], tuple[Any, Any]], n: int) -> Costs:
    """Per-sample costs at batch ``n``; every operation runs once untimed first (first calls
    allocate and start thread pools)."""
    began = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        synth, trainer = build(n)
        timer = _IterationTimer()
        with synth.hooks.stopping_when(timer):
            synth.synthesize()
            first_round_batches, timer.calls = max(timer.batches, 1), 0
            with ActivationBytes(synth.teacher.model, synth.generator_module()) as synthesis_bytes:
                synthesis_s = _timed(synth.synthesize)
            synth.sample(n)
            sample_s = _timed(lambda: synth.sample(n))
            batch = synth.sample(n).float()
        trainer.step(batch)
        with ActivationBytes(trainer.student) as student_bytes:
            step_s = _timed(lambda: trainer.step(batch))
        predict_classes(synth.teacher.model, batch)
        teacher_s = _timed(lambda: predict_classes(synth.teacher.model, batch))
    calls = max(timer.calls, 1)
    # autograd keeps about every module output for the backward pass, and gradients come on top;
    # 1.5x the outputs overstated the peak resident memory measured at 224 px by about 2x
    per_sample = {"synthesis": ACTIVATION_FACTOR * synthesis_bytes.total / calls / n,
                  "student": ACTIVATION_FACTOR * student_bytes.total / n}
    return Costs(iteration_s=synthesis_s / calls / n, iterations=timer.total, sample_s=sample_s / n,
                 step_s=step_s / n, bytes_per_sample=per_sample, probe_s=time.perf_counter() - began,
                 first_round_batches=first_round_batches, teacher_s=teacher_s / n)


def _timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def available_memory(device: torch.device) -> float:
    """Bytes this run may still allocate: free GPU memory, or the system's available memory."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return float(fields["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")  # no way to know here: the rule does not shrink anything
