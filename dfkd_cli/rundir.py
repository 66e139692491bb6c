"""The run folder: claimed before any work, written through a staging folder, replaced in one rename.

:func:`claim_out_dir` holds ``--out`` for a whole run: it refuses a folder the run must not
replace or cannot write, takes the output lock (:mod:`dfkd_cli.outlock`) and turns Ctrl-C into a
message saying what was kept. A run writes everything into a hidden staging folder beside ``--out``
and renames it into place only when every artefact exists, so a failed run never leaves files that
look like a finished one; while it trains, ``OUT/checkpoints`` (see :mod:`dfkd_cli.resume`) is the
only thing it writes in ``OUT``. dfkd removes only what the ``.dfkd-run`` marker
(:mod:`dfkd_cli.marker`) lists: ``--overwrite`` replaces a dfkd run folder or an empty folder,
never the current folder, a folder above it, the home folder or one holding the run's inputs.

Example:
    >>> with claim_out_dir(out, overwrite=False, inputs=[teacher_path]):
    ...     with staging_dir(out) as staging:
    ...         write_everything(staging)
    ...         move_into_place(staging, out)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from dfkd_cli import interrupts, marker
from dfkd_cli.atomic import temporary_folder
from dfkd_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DfkdError
from dfkd_cli.outlock import OutputLock
from dfkd_cli.resume import CheckpointDir

_placed: set[Path] = set()  # output folders a finished run was renamed into, in this process


@contextlib.contextmanager
def claim_out_dir(out: Path, overwrite: bool, resume: bool = False,
                  inputs: Iterable[Path | None] = ()) -> Iterator[None]:
    """Check ``out`` and hold it for the run inside: refused folders are one-line errors before any
    work; a second run into ``out`` fails at once while this one holds the lock. Ctrl-C or SIGTERM
    inside ends with exit 130 and a message that says what was kept."""
    out = Path(out)
    flag = "--resume" if resume else "--out"
    refuse_protected(out, [Path(p) for p in inputs if p is not None], flag)
    _placed.discard(out.absolute())
    with interrupts.while_writing():
        try:
            check_writable(out.parent, out)
            with OutputLock(out):
                check_out_dir(out, overwrite, resume)
                if out.is_dir():  # checkpoints go in there; probed under the lock, unseen by another run
                    check_writable(out, out)
                yield
        except KeyboardInterrupt as err:
            raise DfkdError(f"interrupted by {interrupts.signal_name(err)}; {kept_message(out)}",
                            EXIT_INTERRUPTED) from None


@contextlib.contextmanager
def updating_run(run: Path, adds: Iterable[str] = ("student.int8.onnx",)) -> Iterator[None]:
    """Hold the finished run folder ``run`` while a command adds files to it (``dfkd quantize``):
    locked like a run's ``--out``, the names it ``adds`` listed in the marker (of a marked run
    folder) before they are written, a signal inside one ``error:`` line with exit 130."""
    run = Path(run)
    with interrupts.while_writing():
        try:
            with OutputLock(run):
                if marker.read(run) is not None:
                    for name in adds:
                        marker.claim(run, name)
                yield
        except KeyboardInterrupt as err:
            raise DfkdError(f"interrupted by {interrupts.signal_name(err)}; the files in '{run}' are whole (each is "
                            "replaced in one rename): run the command again", EXIT_INTERRUPTED) from None


def refuse_protected(out: Path, inputs: list[Path], flag: str = "--out") -> None:
    """Refuse an ``--out`` whose replacement would delete what is not the run's: the file system
    root, the home folder, the current folder or one above it, a folder holding an input."""
    target, here = _real(out), _real(Path.cwd())
    why = None
    if target == Path(target.anchor):
        why = "is the root of the file system"
    elif target == _real(Path.home()):
        why = "is your home folder"
    elif target == here or target in here.parents:
        why = "is the current folder" if target == here else "is a folder above the current one"
    else:
        held = next((p for p in inputs if target == _real(p) or target in _real(p).parents), None)
        why = f"holds the input '{held}'" if held is not None else None
    if why:
        raise DfkdError(f"refusing {flag} '{out}': it {why}, and dfkd replaces its --out folder as a whole; "
                        "give the run a folder of its own, e.g. --out runs/NAME")


def _real(path: Path) -> Path:
    """``path`` with every symbolic link followed (``Path.resolve`` raises on a link loop)."""
    return Path(os.path.realpath(path))


def check_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse an output folder the run would replace without ``--overwrite``, or that holds what
    dfkd did not write (``--overwrite`` replaces a dfkd run folder or an empty folder only)."""
    if out.is_symlink():
        raise DfkdError(f"output path '{out}' is a symbolic link; give the folder it points to, or another --out")
    if out.exists() and not out.is_dir():
        raise DfkdError(f"output path '{out}' is a file, not a folder; pick another --out")
    if resume:
        _adopt_checkpoints(out)
    elif out.exists() and not overwrite:
        _refuse_existing(out)
    if out.is_dir() and (foreign := marker.foreign_entries(out)):
        names = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        what = ("it holds files dfkd did not write there" if marker.read(out) else
                "it is not a dfkd run folder (no .dfkd-run marker) and not empty")
        raise DfkdError(f"refusing to replace '{out}': {what} ({names}); move them out or pick another --out")


def _refuse_existing(out: Path) -> None:
    folder = CheckpointDir(out)
    if folder.exists() and not folder.readable_files():
        raise DfkdError(f"output folder '{out}' holds an unfinished run whose checkpoints are all damaged "
                        f"({folder.damage()}), so it cannot be resumed; start over with --overwrite")
    if folder.exists():
        raise DfkdError(f"output folder '{out}' holds an unfinished run; continue it with --resume {out} "
                        "or start over with --overwrite")
    raise DfkdError(f"output folder '{out}' already exists; pick another --out or pass --overwrite")


def _adopt_checkpoints(out: Path) -> None:
    """A run checkpointed by a dfkd without markers: its ``checkpoints`` folder is dfkd's."""
    if out.is_dir() and marker.read(out) is None and [p.name for p in out.iterdir()] == ["checkpoints"]:
        marker.claim(out, "checkpoints")


def check_writable(folder: Path, out: Path) -> None:
    """Fail now, not after hours of training, when ``folder`` (or its nearest existing parent)
    cannot take the run's files: create, fill and remove a probe file there, which read-only
    mounts, /proc and full disks refuse even where the permission bits allow it."""
    existing = next((p for p in [folder, *folder.parents] if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        raise DfkdError(f"cannot create the run folder '{out}': '{existing}' is a file; pick another --out")
    try:
        handle, name = tempfile.mkstemp(prefix=".dfkd-probe-", dir=existing)
    except OSError as err:
        raise DfkdError(f"cannot write the run folder '{out}' ({_reason(err)}): '{existing}' is not writable; "
                        "pick another --out") from None
    try:
        os.write(handle, b"\0" * 4096)
        os.fsync(handle)
    except OSError as err:
        raise DfkdError(f"cannot write the run folder '{out}': writing into '{existing}' fails ({_reason(err)}); "
                        "free disk space or pick another --out") from None
    finally:
        os.close(handle)
        os.unlink(name)


def _reason(err: OSError) -> str:
    return "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err)).lower()


def kept_message(out: Path) -> str:
    """What an interrupted run leaves behind in ``out``, and how to go on from it."""
    if out.absolute() in _placed:
        return f"the run had finished: '{out}' is complete"
    files = CheckpointDir(out).readable_files()
    if files:
        return (f"the last checkpoint ({files[-1].name}) is kept in {CheckpointDir(out).path}; "
                f"continue with: dfkd compress --resume {out}")
    return "nothing of this run was kept"


def drop_checkpoints(out: Path) -> None:
    """Remove the run's checkpoints, and ``out`` itself when dfkd made it and nothing else is in it."""
    if "checkpoints" not in (marker.read(out) or {}).get("entries", []):
        return  # not a folder of checkpoints dfkd wrote
    CheckpointDir(out).remove()
    if not CheckpointDir(out).path.exists():
        marker.release(out, "checkpoints")


def move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``, replacing the run folder there (its
    listed entries only; ``claim_out_dir`` refused anything else)."""
    marker.seal(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    with interrupts.deferred():  # never leave ``out`` renamed away and the new run not yet in place
        if out.exists() or out.is_symlink():
            _refuse_if_changed(staging, out)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        staging.rename(out)
        _placed.add(out.absolute())
    if old is not None and (left := marker.remove_run(old)):
        kept = _free_name(out.parent / f"{out.name}.left-over")
        old.rename(kept)
        raise DfkdError(f"the run finished in '{out}'; files that appeared in the old folder while it ran "
                        f"({', '.join(left[:4])}) were kept in '{kept}'", EXIT_RUNTIME)


def _refuse_if_changed(staging: Path, out: Path) -> None:
    """``out`` gained files dfkd did not write while the run went on: keep both, say where."""
    foreign = marker.foreign_entries(out) if out.is_dir() and not out.is_symlink() else []
    if foreign:
        kept = _free_name(out.parent / f"{out.name}.new")
        staging.rename(kept)
        raise DfkdError(f"'{out}' gained files dfkd did not write while the run went on ({', '.join(foreign[:4])}), "
                        f"so it was left as it is; the finished run is in '{kept}'", EXIT_RUNTIME)


def keep_failed(staging: Path, out: Path) -> Path:
    """Keep a staging folder whose export failed as ``OUT.failed`` (replacing an earlier dfkd one;
    a folder of that name dfkd did not write stays and another name is used). Returns its path."""
    marker.seal(staging)
    failed = out.parent / f"{out.name}.failed"
    if failed.is_dir() and not failed.is_symlink() and not marker.foreign_entries(failed):
        marker.remove_run(failed)
    failed = _free_name(failed)
    staging.rename(failed)
    return failed


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first name nothing has."""
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out`` to write a run into (:func:`move_into_place` marks it as
    dfkd's); removed on the way out, after which :func:`move_into_place` left nothing to remove."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder(out.parent, f".{out.name}.partial-")
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging)
