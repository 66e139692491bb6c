"""The run folder: checked before any work, written through a staging folder, replaced in one rename.

A run writes everything into a hidden staging folder beside ``--out`` and renames it into place
only when every artefact exists, so a failed run never leaves files that look like a finished
one; while it trains, ``OUT/checkpoints`` (see :mod:`dfkd_cli.resume`) is the only thing in ``OUT``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dfkd_cli.errors import DfkdError
from dfkd_cli.resume import CheckpointDir


def check_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse an output folder the run cannot write, or would replace without ``--overwrite``."""
    if resume:
        return
    if out.exists() and not out.is_dir():
        raise DfkdError(f"output path '{out}' is a file, not a folder; pick another --out")
    if out.exists() and not overwrite and CheckpointDir(out).exists():
        raise DfkdError(f"output folder '{out}' holds an unfinished run; continue it with --resume {out} "
                        "or start over with --overwrite")
    if out.exists() and not overwrite:
        raise DfkdError(f"output folder '{out}' already exists; pick another --out or pass --overwrite")
    _check_writable(out.parent)


def _check_writable(folder: Path) -> None:
    """Fail now, not after hours of training, when the run folder cannot be created."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise DfkdError(f"cannot create the run folder under '{folder}': '{existing}' is a file; pick another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DfkdError(f"cannot write the run folder: '{existing}' is not writable; pick another --out")


def drop_checkpoints(out: Path) -> None:
    """Remove the run's checkpoints, and ``out`` itself when nothing else is in it."""
    CheckpointDir(out).remove()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def move_into_place(staging: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def clean(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden folder beside ``out`` to write a run into; removed on the way out (after a
    successful :func:`move_into_place` there is nothing left to remove)."""
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    clean(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        clean(staging)
