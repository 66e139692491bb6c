"""Prior data (``--prior``): unlabelled images from a related domain, streamed to the recipes that
use them (``avkd``'s discriminator, ``prior-kd``'s student).

A prior is an image folder (flat, or with sub-folders whose names are ignored: no labels are read)
of png/jpg/jpeg/bmp/webp files of any size, or an ``.npz`` holding an array ``x``. Images are
converted to the teacher's channel count, resized (shorter side) and centre-cropped to its input
size, scaled to [0, 1] and normalised with its mean and std, exactly as eval data is.

A folder is streamed by a DataLoader with worker processes, never read into memory at once;
unreadable files are skipped and counted (the count reaches the report). An ``.npz`` is an array
already, so it is loaded once. ``reserve`` files are kept aside as held-out samples that the stream
never yields (``prior-kd`` selects its student on them).

Example:
    >>> prior = PriorData(Path("usps/"), (1, 32, 32), [0.1307], [0.3081], batch_size=128)
    >>> prior.sample(64).shape
    torch.Size([64, 1, 32, 32])
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dfkd_cli.errors import DfkdError
from dfkd_cli.eval_data import IMAGE_SUFFIXES, is_image_file, read_image, read_npz, to_unit_nchw


class _ImageFiles(Dataset):
    """Image files as ``[C, H, W]`` tensors in [0, 1]; ``None`` for a file that cannot be decoded."""

    def __init__(self, files: Sequence[Path], input_shape: tuple[int, int, int]) -> None:
        self.files = list(files)
        self.input_shape = input_shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        return index, read_image(self.files[index], self.input_shape)


def _stack_readable(items: list[tuple[int, torch.Tensor | None]]) -> tuple[torch.Tensor | None, list[int]]:
    """A DataLoader batch: the decoded images stacked, and the indices of files that were not."""
    images = [image for _, image in items if image is not None]
    return (torch.stack(images) if images else None), [index for index, image in items if image is None]


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C reaches the loader's workers too (one process group); only the main process acts on
    it, stopping the run cleanly at the end of its step, while the workers keep serving batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    """Loader processes: half the CPU cores (the other half trains), at most 4, none on one core."""
    return min(4, (os.cpu_count() or 1) // 2)


class PriorData:
    """Normalised prior images for a teacher, drawn endlessly in shuffled epochs.

    Raises :class:`DfkdError` (exit 2) for a missing path, a folder without images, one whose
    images are all unreadable, and an ``.npz`` without a usable ``x``.
    """

    def __init__(self, path: Path, input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float],
                 batch_size: int = 256, reserve: int = 0, seed: int = 0, workers: int | None = None) -> None:
        self.path = Path(path)
        self.input_shape = input_shape
        self.batch_size = batch_size
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._rng = torch.Generator().manual_seed(seed)
        self.workers = default_workers() if workers is None else workers
        self._skipped_reserve = 0
        self._skipped_stream: set[int] = set()  # each unreadable file counts once, whatever the epochs
        if input_shape[0] not in (1, 3):
            raise DfkdError(f"prior images are read as grey or RGB, but the teacher takes {input_shape[0]} channels; "
                            "leave out --prior")
        if self.path.is_dir():
            self.source, self._held_out, self._dataset = "image_folder", *self._open_folder(reserve)
        elif self.path.is_file() and self.path.suffix.lower() == ".npz":
            self.source, self._held_out, self._dataset = "npz", *self._open_npz(reserve)
        elif self.path.exists():
            raise DfkdError(f"prior '{self.path}' is neither an image folder nor an .npz file; pass a folder of images or an .npz with x")
        else:
            raise DfkdError(f"prior '{self.path}' not found; check the path")
        self._loader: DataLoader | None = None
        self._stream: Iterator[Any] | None = None
        self._leftover = torch.empty(0, *input_shape)

    @property
    def files(self) -> int:
        """Image files (or rows of the ``.npz``) the prior holds: held-out and unreadable ones included."""
        return self._total

    def _open_folder(self, reserve: int) -> tuple[torch.Tensor, Dataset]:
        files = sorted(p for p in self.path.rglob("*") if is_image_file(p) and not _hidden(p, self.path))
        if not files:
            raise DfkdError(f"prior folder '{self.path}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "add images or pass another folder")
        self._total = len(files)
        order = torch.randperm(len(files), generator=self._rng).tolist()
        files = [files[i] for i in order]
        held_out, first_readable = self._read_reserve(files, reserve)
        if first_readable is None:
            raise DfkdError(f"prior folder '{self.path}' has no readable image ({len(files)} files could not be "
                            "decoded); check the files")
        rest = files[first_readable:]
        return held_out, _ImageFiles(rest, self.input_shape)

    def _read_reserve(self, files: list[Path], reserve: int) -> tuple[torch.Tensor, int | None]:
        """Decode the first ``reserve`` readable files as held-out images; returns them and the index
        of the first file left for the stream (``None`` when no file at all could be read)."""
        images: list[torch.Tensor] = []
        for index, file in enumerate(files):
            image = read_image(file, self.input_shape)
            if image is None:
                self._skipped_reserve += 1
                continue
            if len(images) == reserve:  # first readable file beyond the reserve: the stream starts here
                return _stack(images, self.input_shape), index
            images.append(image)
        return _stack(images, self.input_shape), (len(files) if images else None)

    def _open_npz(self, reserve: int) -> tuple[torch.Tensor, Dataset]:
        arrays, found = read_npz(self.path, "prior", ("x",))
        if "x" not in arrays:
            raise DfkdError(f"prior '{self.path}' has no array 'x' (found: {', '.join(found) or 'nothing'}); "
                            "save the images as x=...")
        x = arrays["x"]
        if len(x) == 0:
            raise DfkdError(f"prior '{self.path}' holds no images; provide at least one")
        images = to_unit_nchw(x, self.input_shape, self.path, what="prior")
        self._total = len(images)
        images = images[torch.randperm(len(images), generator=self._rng)]
        return images[:reserve], torch.utils.data.TensorDataset(images[reserve:])

    def holdout(self, n: int) -> torch.Tensor:
        """Up to ``n`` normalised held-out images (the ``reserve`` the stream never yields)."""
        return self._normalise(self._held_out[:n])

    def sample(self, n: int) -> torch.Tensor:
        """``n`` normalised images from the stream (CPU, float32)."""
        if len(self._dataset) == 0:
            raise DfkdError(f"prior '{self.path}' has no images left beyond the {len(self._held_out)} held out; "
                            "add images or lower train.holdout")
        parts, have = [self._leftover], len(self._leftover)
        while have < n:
            batch = self._next_batch()
            parts.append(batch)
            have += len(batch)
        data = torch.cat(parts)
        self._leftover = data[n:]
        return self._normalise(data[:n])

    def _next_batch(self) -> torch.Tensor:
        while True:
            if self._stream is None:
                self._loader = self._loader or self._make_loader()
                self._stream = iter(self._loader)
            try:
                item = next(self._stream)
            except StopIteration:  # an epoch ended: the next one is reshuffled
                self._stream = None
                continue
            images, unreadable = item if self.source == "image_folder" else (item[0], [])
            self._skipped_stream.update(unreadable)
            if images is not None:
                return images

    def _make_loader(self) -> DataLoader:
        folder = self.source == "image_folder"
        workers = self.workers if folder else 0
        return DataLoader(self._dataset, batch_size=self.batch_size, shuffle=True, generator=self._rng,
                          num_workers=workers, collate_fn=_stack_readable if folder else None,
                          persistent_workers=workers > 0, drop_last=False, worker_init_fn=_ignore_interrupts)

    @property
    def skipped(self) -> int:
        """Files found unreadable so far (each once; files the stream has not reached yet are not known)."""
        return self._skipped_reserve + len(self._skipped_stream)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def describe(self) -> dict[str, Any]:
        """What the report says about the prior."""
        return {"path": str(self.path.resolve()), "source": self.source, "images": self.files,
                "held_out": len(self._held_out), "skipped_unreadable": self.skipped}


def _stack(images: list[torch.Tensor], input_shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.stack(images) if images else torch.empty(0, *input_shape)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
