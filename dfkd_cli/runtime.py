"""Runtime concerns in one place: device, seeds, versions, time budget and the progress display.

Nothing else in dfkd reads environment variables or writes to the terminal's stderr.
"""

from __future__ import annotations

import os
import platform
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dfkd_cli.errors import DfkdError

if TYPE_CHECKING:
    from dfkd_cli.distributed import World


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cpu``, ``cuda`` and ``cuda:N`` are taken as asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise DfkdError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DfkdError(f"device '{name}' asked for but CUDA is not available here; use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DfkdError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s); pick one below that")
    return torch.device(name)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside a distributed launch."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, str(default))
        if not text.isdigit():
            raise DfkdError(f"environment variable {name}={text!r} is not a number; launch with torchrun or --nproc N")
        values.append(int(text))
    rank, size, local_rank = values
    return rank, max(size, 1), local_rank


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run's numbers depend on."""
    import torchvision

    # Module versions keep the local build tag (e.g. 2.15.0+cu132), which says which build ran.
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for package in ("dfkd", "numpy", "onnx", "onnxruntime", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def hardware_description(device: torch.device) -> str:
    """Human-readable description of the hardware a run used, e.g. 'CPU: AMD EPYC (2 threads)'."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"CPU: {cpu} ({torch.get_num_threads()} threads)"


@dataclass
class Stopwatch:
    """Wall-clock seconds and peak memory per stage."""

    device: torch.device = torch.device("cpu")
    seconds: dict[str, float] = field(default_factory=dict)
    memory_mb: dict[str, dict[str, float | None]] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._start, 3)
        self.memory_mb[stage] = peak_memory_mb(self.device)
        self._start = now

    @property
    def total(self) -> float:
        """Seconds of the stages lapped so far."""
        return sum(self.seconds.values())


def pool_memory_limit(megabytes: float, device: torch.device) -> int:
    """Bytes of synthetic pool to hold in memory: ``megabytes``, or with 0 a quarter of the
    device's memory (the GPU's for a CUDA pool, else physical RAM)."""
    if megabytes > 0:
        return int(megabytes * 2**20)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process so far and, on CUDA, the peak allocated by torch
    since the last call (which resets it), in MiB."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = None
    if device.type == "cuda":
        cuda = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return {"rss": round(rss, 1), "cuda_allocated": cuda}


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '10m' or '2h'.

    Example:
        >>> parse_duration("10m")
        600.0
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise DfkdError(f"time budget '{text}' is not a duration; write it like 90s, 10m or 2h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


class Budget:
    """Wall-clock budget for a run; ``expired()`` is checked between optimisation steps. It also
    ends early when ``stop`` (Ctrl-C, SIGTERM) asks the run to stop."""

    def __init__(self, seconds: float | None, elapsed: float = 0.0, stop: "StopRequest | None" = None,
                 world: "World | None" = None) -> None:
        self.seconds = seconds
        self.start = time.monotonic() - elapsed  # a resumed run continues its budget
        self.stop = stop
        # With several processes the budget ends for all of them at the same student step: the
        # decision is all-reduced in settle() and expired() returns it.
        self.world = world if world is not None and world.active else None
        self._settled, self._settled_elapsed = False, elapsed
        # Whether schedules follow the share of time used: only when the budget, not the step
        # count, is expected to end the run, since time makes a seeded CPU run unrepeatable.
        self.paces = True

    def part(self, seconds: float | None, shared: bool = True) -> "Budget":
        """A budget of ``seconds`` from now that the same stop request ends (``shared``: settled
        across processes too; a local part must only bound work without collectives)."""
        return Budget(seconds, stop=self.stop, world=self.world if shared else None)

    def settle(self) -> None:
        """Agree across processes whether the budget ended and how much of it is used (once per
        student step), so schedules that follow the budget stay the same on every rank."""
        if self.world is not None:
            expired, elapsed = self.world.maximum([float(self._expired_here()), self.elapsed])
            self._settled, self._settled_elapsed = expired > 0, elapsed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def stop_requested(self) -> str | None:
        """The name of the signal that asked the run to stop, if one did."""
        return self.stop.requested if self.stop is not None else None

    def expired(self) -> bool:
        return self._settled if self.world is not None else self._expired_here()

    def _expired_here(self) -> bool:
        return bool(self.stop_requested) or (self.seconds is not None and self.elapsed >= self.seconds)

    def left(self) -> float | None:
        """Seconds until the budget ends; None without one."""
        return max(0.0, self.seconds - self.elapsed) if self.seconds is not None else None

    def fraction(self) -> float:
        """Share of the budget used so far, in [0, 1]; 0 without a budget or when it does not pace
        the run (see ``paces``). With several processes, the share agreed at the last student step."""
        if not self.paces:
            return 0.0
        elapsed = self._settled_elapsed if self.world is not None else self.elapsed
        return min(elapsed / self.seconds, 1.0) if self.seconds else 0.0


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM, while active, ask the run to stop at the end of its current
    step instead of killing it; a second signal stops at once (``KeyboardInterrupt`` carrying the
    signal's name). The handlers before it (see :mod:`dfkd_cli.interrupts`) come back on exit.

    Example:
        >>> with StopRequest() as stop:
        ...     while not stop.requested:
        ...         train_one_step()
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the caller turns this into exit 130 and says what was kept
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def is_ci() -> bool:
    """True when running in CI (the ``CI`` variable set), where the live display is replaced."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


class Display:
    """Progress and logs on stderr. This base class is the quiet mode: it shows nothing.

    ``stage(name, total, seconds_left)``: a stage of ``total`` steps (None: unknown) that the
    budget ends after ``seconds_left`` at most (None: unbounded); its ETA is the sooner of the two.
    """

    def stage(self, name: str, total: int | None = None, seconds_left: float | None = None) -> None: ...

    def advance(self, n: int = 1, **metrics: float) -> None: ...

    def log(self, message: str) -> None: ...

    def close(self) -> None: ...


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def stage_eta(done: int, total: int | None, elapsed: float, deadline_left: float | None) -> float | None:
    """Seconds left in a stage: by its rate when ``total`` is known, capped by the budget's deadline.

    Example:
        >>> stage_eta(50, 200, 10.0, None), stage_eta(50, 200, 10.0, 12.0), stage_eta(3, None, 1.0, 5.0)
        (30.0, 12.0, 5.0)
    """
    by_rate = (total - done) * elapsed / done if total and done else None
    candidates = [v for v in (by_rate, deadline_left) if v is not None]
    return max(0.0, min(candidates)) if candidates else None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class PlainDisplay(Display):
    """Periodic plain lines, for logs and CI: ``[train] 120/200 kd=0.41 agreement=0.83 eta 0:32``."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._name, self._total, self._done = "", None, 0
        self._metrics: dict[str, float] = {}
        self._started = self._last = time.monotonic()
        self._deadline: float | None = None

    def stage(self, name: str, total: int | None = None, seconds_left: float | None = None) -> None:
        self._name, self._total, self._done, self._metrics = name, total, 0, {}
        self._started = time.monotonic()
        self._deadline = self._started + seconds_left if seconds_left is not None else None
        self._last = 0.0
        bound = f", at most {_clock(seconds_left)}" if seconds_left is not None else ""
        self.log(f"[{name}] started" + (f" ({total} steps{bound})" if total else f" ({bound[2:]})" if bound else ""))

    def advance(self, n: int = 1, **metrics: float) -> None:
        self._done += n
        self._metrics.update(metrics)
        if n == 0:
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self._done == self._total:
            self._last = now
            self.log(f"[{self._name}] {self._progress(now)} {_format_metrics(self._metrics)}".rstrip())

    def _progress(self, now: float) -> str:
        left = self._deadline - now if self._deadline is not None else None
        eta = stage_eta(self._done, self._total, now - self._started, left)
        return f"{self._done}/{self._total or '?'} eta {_clock(eta)}"

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


class RichDisplay(Display):
    """A live Rich progress bar per stage with the latest losses and agreement, on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
        )
        self.progress.start()
        self._task = None

    def stage(self, name: str, total: int | None = None, seconds_left: float | None = None) -> None:
        self._finish_task()
        bound = f"(at most {_clock(seconds_left)}) " if seconds_left is not None else ""
        self._task = self.progress.add_task(name, total=total, metrics=bound)

    def _finish_task(self) -> None:
        """Show the stage that ended as complete, also one without a known total."""
        if self._task is not None:
            done = max(self.progress.tasks[self._task].completed, 1)
            self.progress.update(self._task, total=done, completed=done)

    def advance(self, n: int = 1, **metrics: float) -> None:
        if self._task is not None:
            fields = {"metrics": _format_metrics(metrics)} if metrics else {}
            self.progress.update(self._task, advance=n, **fields)

    def log(self, message: str) -> None:
        self.progress.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        self._finish_task()
        self.progress.stop()


def make_display(output_format: str) -> Display:
    """Rich live display on an interactive terminal, plain lines in CI or logs, nothing when quiet
    (and nothing on the ranks of a distributed run but rank 0)."""
    if output_format == "quiet" or distributed_env()[0] != 0:
        return Display()
    if output_format == "human" and sys.stderr.isatty() and not is_ci():
        return RichDisplay()
    return PlainDisplay()
