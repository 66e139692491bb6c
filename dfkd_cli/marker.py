"""The ``.dfkd-run`` marker: what in a run folder dfkd wrote, so it removes that and nothing else.

Every run folder carries the marker, a small JSON file listing the entries dfkd put there
(``student.onnx``, ``report.json``, ``checkpoints``, ...) and whether dfkd made the folder itself.
It is written into the staging folder before that is renamed into place, and into ``--out`` when
the first checkpoint goes there. ``--overwrite`` replaces a folder only when every entry in it is
listed (or it is empty); clean-up removes listed entries only.

Example:
    >>> seal(staging)                 # list everything now in the folder
    >>> claim(out, "checkpoints")     # add one entry, making the marker if needed
    >>> foreign_entries(out)          # what dfkd did not write
    []
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dfkd_cli import __version__
from dfkd_cli.atomic import atomic_write

MARKER = ".dfkd-run"
FORMAT = 1


def read(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder``; None when there is none or it is not one dfkd wrote."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("dfkd_run") != FORMAT or not isinstance(data.get("entries"), list):
        return None
    if not all(_plain_name(entry) for entry in data["entries"]):  # never a path out of the folder
        return None
    return data


def _plain_name(entry: Any) -> bool:
    return isinstance(entry, str) and entry not in ("", ".", "..") and "/" not in entry and "\\" not in entry


def _write(folder: Path, entries: list[str], created: bool) -> None:
    data = {"dfkd_run": FORMAT, "dfkd_version": __version__, "created": created, "entries": sorted(set(entries))}
    atomic_write(Path(folder) / MARKER, json.dumps(data, indent=1) + "\n")


def seal(folder: Path, created: bool = True) -> None:
    """Mark ``folder`` as a run folder holding exactly what is in it now (all written by dfkd)."""
    _write(folder, [p.name for p in Path(folder).iterdir() if p.name != MARKER], created)


def claim(folder: Path, entry: str) -> None:
    """Add ``entry`` to the marker of ``folder``, making the folder and marker when missing (then
    the marker records whether dfkd made the folder, so clean-up leaves a folder it found)."""
    folder = Path(folder)
    marker = read(folder)
    if marker is None:
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder, [entry], created)
    elif entry not in marker["entries"]:
        _write(folder, [*marker["entries"], entry], bool(marker.get("created")))


def release(folder: Path, entry: str) -> None:
    """Drop ``entry`` (already removed) from the marker; with nothing listed any more, drop the
    marker too and the folder when dfkd made it and it is empty."""
    folder = Path(folder)
    marker = read(folder)
    if marker is None:
        return
    entries = [name for name in marker["entries"] if name != entry]
    if entries:
        _write(folder, entries, bool(marker.get("created")))
        return
    (folder / MARKER).unlink(missing_ok=True)
    if marker.get("created") and not any(folder.iterdir()):
        folder.rmdir()


def foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` its marker does not list (all of them without a marker)."""
    marker = read(folder)
    listed = set(marker["entries"]) if marker else set()
    return sorted(p.name for p in Path(folder).iterdir() if p.name != MARKER and p.name not in listed)


def remove_run(folder: Path) -> list[str]:
    """Delete the listed entries of the run folder ``folder``, its marker and then the folder if
    empty. A symbolic link is removed, never followed. Returns what is left (entries dfkd did not
    write), in which case the folder stays."""
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
        return []
    marker = read(folder)
    for name in marker["entries"] if marker else []:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    left = sorted(p.name for p in folder.iterdir())
    if not left:
        folder.rmdir()
    return left
