"""Ctrl-C and SIGTERM from the first millisecond to the last: exit 130 and one ``error:`` line.

``dfkd``'s ``main()`` calls :func:`install` before anything heavy is imported. From then on:

- while nothing is being written (imports, reading and checking inputs), a signal ends the
  process at once (``os._exit``), printing ``error: interrupted``: Python's own
  ``KeyboardInterrupt`` raised inside torch's import ends in a traceback or a crash;
- inside :func:`while_writing` (a run folder is claimed, a file is being written) a signal raises
  ``KeyboardInterrupt``, so ``finally`` blocks remove half-written files and the caller says what
  was kept;
- while a run trains, :class:`dfkd_cli.runtime.StopRequest` takes the signals and stops the run
  after its current step.

Without :func:`install` (dfkd used as a library, or the in-process test runner) nothing changes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from dfkd_cli.errors import EXIT_INTERRUPTED

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"installed": False}


def rank_prefix() -> str:
    """``rank N: `` on the other processes of a distributed run, read from ``RANK`` (set by
    torchrun and ``--nproc``) without importing torch."""
    rank = os.environ.get("RANK", "0").strip()
    return f"rank {rank}: " if rank.isdigit() and int(rank) > 0 else ""


def install() -> None:
    """Make SIGINT and SIGTERM end the process with exit 130 and one line, from now on."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _exit_now)
    _state["installed"] = True


def _exit_now(signum: int, frame: Any) -> None:
    os.write(2, f"error: {rank_prefix()}interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(EXIT_INTERRUPTED)


def _raise(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def while_writing() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise ``KeyboardInterrupt`` (carrying the signal's name), so the
    code writing files can clean up; the previous handlers come back on the way out."""
    if not _state["installed"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a few renames that must happen together; a signal that
    arrives meanwhile is handled right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def signal_name(err: KeyboardInterrupt) -> str:
    """``SIGTERM`` for a KeyboardInterrupt raised by :func:`while_writing` on SIGTERM, else ``SIGINT``."""
    name = err.args[0] if err.args else ""
    return name if isinstance(name, str) and name.startswith("SIG") else "SIGINT"
