"""An exclusive lock on a run's output folder, held from the checks before any work to the end.

Two runs writing the same ``--out`` would replace each other's files. The lock is ``flock`` on
``.OUT.lock`` beside ``OUT`` (in its parent folder), holding the pid and command of the run that
has it. A second run into the same folder fails at once with exit 2, naming the first. The kernel
drops a ``flock`` when its process ends in any way (even ``kill -9``), so a lock file left by a
dead run never blocks the next one. The file is removed when the lock is released.

Example:
    >>> with OutputLock(Path("runs/x")):
    ...     train_and_publish()
"""

from __future__ import annotations

import fcntl
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from dfkd_cli.errors import DfkdError, shown

ATTEMPTS = 6  # a lock held only for an instant (refuse_if_locked looking) is waited out: 0.25 s at most


def lock_path(out: Path) -> Path:
    """Where the lock of ``out`` lives: ``.NAME.lock`` in ``out``'s parent folder."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


class OutputLock:
    """``flock`` on :func:`lock_path`, taken on ``__enter__`` (creating missing parent folders,
    which are removed again on release when still empty) and released on ``__exit__``."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._descriptor: int | None = None
        self._made: list[Path] = []

    def __enter__(self) -> "OutputLock":
        self._made = _make_parents(self.path.parent)
        try:
            self._descriptor = self._acquire()
        except BaseException:
            self._remove_made()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _acquire(self) -> int:
        while True:
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as err:
                raise DfkdError(f"cannot write the run folder: cannot create '{self.path}' ({err.strerror}); "
                                "pick another --out") from None
            if not _try_flock(descriptor, fcntl.LOCK_EX, attempts=ATTEMPTS):
                holder = _holder(descriptor)
                os.close(descriptor)
                raise DfkdError(_busy(holder, self.out, self.path))
            if _still_named(descriptor, self.path):
                break
            os.close(descriptor)  # the run before released it and removed the file: lock the new one
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n{_command()}\n".encode("utf-8", "replace"))
        return descriptor

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks a file about to go) and
        drop the lock; then the parent folders made for it, if still empty."""
        if self._descriptor is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._descriptor)
            self._descriptor = None
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:  # the run's folder (or someone else's file) is in it now: keep it
                break
        self._made = []


def refuse_if_locked(out: Path) -> None:
    """Fail at once when another run holds the lock of ``out`` (before the slow imports of a run;
    the run takes its own lock later, with its checks). Holds nothing: a shared lock for an
    instant, which :class:`OutputLock` waits out."""
    path = lock_path(Path(out))
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file, so no lock
    try:
        if not _try_flock(descriptor, fcntl.LOCK_SH, attempts=1):
            raise DfkdError(_busy(_holder(descriptor), Path(out), path))
    finally:
        os.close(descriptor)


def _try_flock(descriptor: int, kind: int, attempts: int) -> bool:
    """``flock`` without blocking, tried ``attempts`` times 50 ms apart; False when it stays held."""
    for attempt in range(attempts):
        try:
            fcntl.flock(descriptor, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.05)
    return False


def _busy(holder: str, out: Path, path: Path) -> str:
    return f"another dfkd run ({holder}) is writing to '{out}'; wait for it to end or pick another --out (its lock: {path})"


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    made = []
    for path in missing:
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            for done in reversed(made):
                done.rmdir()
            raise DfkdError(f"cannot create the run folder under '{path.parent}' ({err.strerror}); "
                            "pick another --out") from None
        made.append(path)
    return made


def _holder(descriptor: int) -> str:
    """``pid N: COMMAND`` from the lock file, as the run holding it wrote it."""
    os.lseek(descriptor, 0, os.SEEK_SET)
    lines = os.read(descriptor, 4096).decode("utf-8", "replace").splitlines()
    if not lines or not lines[0].strip().isdigit():
        return "one that is just starting"
    command = f": {shown(lines[1], 120, quote=False)}" if len(lines) > 1 and lines[1] else ""
    return f"pid {lines[0].strip()}{command}"


def _still_named(descriptor: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``descriptor`` (not removed or replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _command() -> str:
    return shlex.join(["dfkd", *sys.argv[1:]])
