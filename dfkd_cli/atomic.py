"""Atomic file writes whose files get the permissions the user's umask asks for.

Every artefact dfkd writes goes through a temporary sibling that is renamed over the target, so a
reader sees the old file or the new one, never half of one. ``tempfile.mkstemp`` creates its files
0600 whatever the umask; :func:`temporary_sibling` gives them the mode ``open()`` would
(0644 under umask 022, 0600 under 077), so student.onnx and report.json get the same permissions
as config.toml and as the files of any other tool.

Example:
    >>> atomic_write(Path("runs/x/report.json"), text)
    >>> with temporary_sibling(Path("runs/x/student.onnx"), ".onnx") as tmp:
    ...     exporter.save(tmp)
    ...     replace(tmp, Path("runs/x/student.onnx"))
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it in /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir``: 0o777 less the umask."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def temporary_sibling(path: Path, suffix: str = "") -> Iterator[Path]:
    """A new empty file beside ``path`` (same file system, so ``os.replace`` onto ``path`` is
    atomic) with the umask's permissions, named ``.STEM.XXXXXXXX.tmpSUFFIX`` (writers that go by
    the extension get ``suffix``); removed on the way out if it is still there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    try:
        os.fchmod(handle, file_mode())
    finally:
        os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def temporary_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` named ``prefix`` plus a unique tail, with the umask's
    permissions (``tempfile.mkdtemp`` alone makes it 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, folder_mode())
    return folder


def follow_umask(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the umask's permissions: some
    writers make their files 0600 whatever the umask (safetensors does)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for inner in path.rglob("*"):
            if not inner.is_symlink():
                os.chmod(inner, folder_mode() if inner.is_dir() else file_mode())
        os.chmod(path, folder_mode())
    else:
        os.chmod(path, file_mode())


def replace(temporary: Path, path: Path) -> None:
    """Rename the finished ``temporary`` (from :func:`temporary_sibling` or
    :func:`temporary_folder`) onto ``path`` in one step, with the umask's permissions."""
    follow_umask(temporary)
    os.replace(temporary, path)


def atomic_write(path: Path, data: bytes | str, durable: bool = False) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` through a temporary sibling and a rename.
    ``durable`` also flushes the file and the rename to disk (for checkpoints that must survive a
    power cut). Nothing is left behind when writing fails; an old ``path`` then stays as it was."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with temporary_sibling(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
