"""Resumable runs: checkpoints of a whole distillation run, written atomically, read safely.

A checkpoint holds everything a run needs to continue as if it had never stopped: the student,
its optimizer and selection candidates, the synthesizer's state (generators, discriminators,
their optimizers and schedules, the synthetic pool), the held-out samples, the memory bank, the
random number generators (Python, NumPy, torch, CUDA), the step counters and the budget used.
Files live in ``OUT/checkpoints/`` beside ``run.toml`` (the run's settings, so ``--resume OUT``
needs no other flag); the last two are kept. Each is written to a temporary file, flushed to disk
and renamed, so a crash or a full disk never leaves a torn checkpoint, and read with
``torch.load(weights_only=True)``: a checkpoint cannot run code.

Example:
    >>> folder = CheckpointDir(Path("runs/x"))
    >>> folder.write(encode(payload), step=1200)
    >>> payload = folder.read_latest(torch.device("cpu"))
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd_cli import atomic, marker
from dfkd_cli.errors import EXIT_RUNTIME, DfkdError

FORMAT = 1
FOLDER = "checkpoints"
SETTINGS = "run.toml"
KEEP = 2


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a run draws from."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [list(item) if isinstance(item, tuple) else item for item in random.getstate()],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def encode(payload: dict[str, Any]) -> bytes:
    """The checkpoint's bytes (serialising also copies every tensor, so later training cannot
    change a state kept in memory for rollback)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def decode(data: bytes, device: torch.device) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: readers see the old
    file or the new one, never half of one. The temporary file is removed on failure."""
    atomic.atomic_write(path, data, durable=True)


class CheckpointDir:
    """``OUT/checkpoints``: ``step-NNNNNNNNN.pt`` files (the last ``KEEP``) and ``run.toml``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / FOLDER

    def files(self) -> list[Path]:
        """The checkpoints, oldest first."""
        return sorted(self.path.glob("step-*.pt")) if self.path.is_dir() else []

    def exists(self) -> bool:
        return bool(self.files())

    def readable_files(self) -> list[Path]:
        """The checkpoints that are whole, oldest first: a cheap look at the zip structure
        ``torch.save`` writes (a truncated file has lost its end), without loading them."""
        return [path for path in self.files() if _whole_zip(path)]

    def damage(self) -> str:
        """The checkpoints that are not whole, for a message: ``step-...pt: truncated; ...``."""
        return "; ".join(f"{path.name}: truncated or not a checkpoint" for path in self.files() if not _whole_zip(path))

    def write_settings(self, text: str) -> None:
        self._write(self.path / SETTINGS, text.encode("utf-8"))

    def write(self, data: bytes, step: int) -> Path:
        """Write one checkpoint, then drop all but the newest ``KEEP``."""
        target = self.path / f"step-{step:09d}.pt"
        self._write(target, data)
        for old in self.files()[:-KEEP]:
            old.unlink(missing_ok=True)
        return target

    def _write(self, target: Path, data: bytes) -> None:
        try:
            marker.claim(self.run_dir, FOLDER)  # before the folder exists: records whether dfkd made the run folder
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
        except OSError as err:
            kept = f"; the last checkpoint ({self.files()[-1].name}) is intact" if self.exists() else ""
            raise DfkdError(f"cannot write checkpoint '{target}': {err.strerror or err}{kept}; free disk space "
                            "or make the folder writable, then resume with --resume", EXIT_RUNTIME) from None

    def read_latest(self, device: torch.device) -> dict[str, Any]:
        """The newest checkpoint that reads back; a damaged newest one falls back to the one before."""
        files = self.files()
        if not files:
            raise DfkdError(f"'{self.run_dir}' has no checkpoint to resume from ({self.path} is missing or empty); "
                            f"start the run again with --out {self.run_dir} --overwrite instead of --resume")
        problems = []
        for path in reversed(files):
            try:
                payload = decode(path.read_bytes(), device)
            except Exception as err:  # a truncated or foreign file: try the one before it
                problems.append(f"{path.name}: {str(err).splitlines()[0][:80] if str(err) else type(err).__name__}")
                continue
            if isinstance(payload, dict) and payload.get("format") == FORMAT:
                return payload
            problems.append(f"{path.name}: not a dfkd checkpoint")
        raise DfkdError(f"no readable checkpoint in '{self.path}' ({'; '.join(problems)}), so the run cannot be "
                        f"resumed; start it again with --out {self.run_dir} --overwrite instead of --resume")

    def settings(self) -> Path:
        path = self.path / SETTINGS
        if not path.is_file():
            raise DfkdError(f"'{self.run_dir}' is not a resumable run ({path} is missing); give the folder a run "
                            "was started in with --out")
        return path

    def remove(self) -> None:
        """Delete the checkpoints, ``run.toml`` and temporary files of interrupted writes (the
        names dfkd gives them), then the folder if that left it empty."""
        if not self.path.is_dir():
            return
        ours = self.files() + [self.path / SETTINGS]
        ours += [p for p in self.path.glob(".*.tmp") if p.name.startswith((".step-", f".{Path(SETTINGS).stem}."))]
        for path in ours:
            path.unlink(missing_ok=True)
        if not any(self.path.iterdir()):
            self.path.rmdir()


def _whole_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def resume_state(out: Path, teacher_sha256: str, recipe: str, device: torch.device) -> dict[str, Any]:
    """The newest checkpoint in ``out``, checked against the teacher and recipe it continues."""
    state = CheckpointDir(out).read_latest(device)
    if state["teacher_sha256"] != teacher_sha256:
        raise DfkdError(f"the checkpoint in '{out}' was made for another teacher (sha256 "
                        f"{state['teacher_sha256'][:12]}, this one {teacher_sha256[:12]}); resume with the original teacher")
    if state["recipe"] != recipe:
        raise DfkdError(f"the checkpoint in '{out}' belongs to recipe '{state['recipe']}', not "
                        f"'{recipe}'; its checkpoints/run.toml was changed")
    return state
