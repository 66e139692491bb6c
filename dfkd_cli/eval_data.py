"""Real labelled data for the report: an ``.npz`` (``x``, optional ``y``) or an image folder (a
sub-folder per class), read into normalised tensors of the teacher's input shape.

Example:
    >>> data = load_eval_data(Path("cifar10_test.npz"), (3, 32, 32), mean, std, class_names)
    >>> data.x.shape, data.source
    (torch.Size([10000, 3, 32, 32]), 'npz')
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dfkd_cli.errors import DfkdError

__all__ = ["EvalData", "is_image_file", "load_eval_data", "read_image", "read_npz", "to_unit_nchw"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
# Float pixels may stray this far outside [0, 1] (rounding in whatever wrote them) and still count as [0, 1].
_FLOAT_RANGE_SLACK = 1e-3


@dataclass
class EvalData:
    """Evaluation inputs ready for the models.

    Attributes:
        x: normalised float32 inputs ``[N, C, H, W]``.
        y: int64 labels ``[N]``, or ``None`` when the data has none.
        skipped: image files that could not be read (always 0 for ``.npz``).
        source: ``"npz"`` or ``"image_folder"``.
        label_mapping: how folder names became label indices: ``"class_names"``, ``"digits"``,
            ``"sorted"`` (alphabetical; worth a warning when class names were known), or ``"npz"``.
    """

    x: torch.Tensor
    y: torch.Tensor | None
    skipped: int
    source: str
    label_mapping: str


def load_eval_data(
    path: Path,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: list[str] | None = None,
    limit: int | None = None,
) -> EvalData:
    """Load real evaluation data from an ``.npz`` file or a folder of class sub-folders of images.

    ``.npz``: array ``x`` (uint8 or [0, 1] floats; ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``)
    and optional integer labels ``y``. Folder: one sub-folder per class holding png/jpg/jpeg/bmp/webp
    files; labels follow ``class_names`` when every folder is named after one, else digit folder names
    (``0`` .. ``K-1``), else alphabetical order. Inputs are converted to ``C`` channels, resized (shorter
    side) and centre-cropped to ``H x W``, scaled to [0, 1] and normalised with ``mean``/``std``.
    ``limit`` keeps the first samples of an ``.npz``, or takes images round-robin over classes.

    Raises :class:`DfkdError` for a missing path, no readable images, an ``.npz`` without ``x``,
    shapes that cannot be converted and labels outside ``class_names``.

    Example:
        >>> data = load_eval_data(Path("val/"), (3, 224, 224), imagenet_mean, imagenet_std, names, limit=500)
        >>> data.x.shape, data.skipped
        (torch.Size([500, 3, 224, 224]), 0)
    """
    path = Path(path)
    channels = input_shape[0]
    if channels not in (1, 3):
        raise DfkdError(f"eval data is read as grey or RGB images, but the teacher takes {channels} channels; leave out the eval data")
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ValueError(f"mean/std need 1 or {channels} values, got {len(mean)} and {len(std)}")
    if limit is not None and limit < 1:
        raise DfkdError(f"eval limit must be at least 1, got {limit}")
    if path.is_dir():
        x, y, skipped, mapping = _load_image_folder(path, input_shape, class_names, limit)
        source = "image_folder"
    elif path.is_file() and path.suffix.lower() == ".npz":
        x, y = _load_npz(path, input_shape, limit)
        skipped, mapping, source = 0, "npz", "npz"
    elif path.exists():
        raise DfkdError(f"eval data '{path}' is neither an .npz file nor a folder; pass an .npz or a folder of class sub-folders")
    else:
        raise DfkdError(f"eval data '{path}' not found; check the path")
    if y is not None:
        _check_labels(y, path, class_names)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return EvalData(((x - mean_t) / std_t).contiguous(), y, skipped, source, mapping)


def _check_labels(y: torch.Tensor, path: Path, class_names: list[str] | None) -> None:
    upper = len(class_names) if class_names is not None else None
    low, high = int(y.min()), int(y.max())
    if low < 0 or (upper is not None and high >= upper):
        bound = f"0..{upper - 1}" if upper is not None else "non-negative"
        raise DfkdError(f"eval data '{path}' has labels {low}..{high} but the teacher's classes are {bound}; fix the labels or the class list")


def _load_npz(path: Path, input_shape: tuple[int, int, int], limit: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    arrays, found = read_npz(path, "eval data", ("x", "y"))
    if "x" not in arrays:
        raise DfkdError(f"eval data '{path}' has no array 'x' (found: {', '.join(found) or 'nothing'}); "
                        "save inputs as x=... and labels as y=...")
    x = arrays["x"][:limit]
    y = arrays["y"][:limit] if "y" in arrays else None
    if len(x) == 0:
        raise DfkdError(f"eval data '{path}' holds no samples; provide at least one")
    images = to_unit_nchw(x, input_shape, path)
    if y is None:
        return images, None
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DfkdError(f"eval data '{path}': 'y' must be {len(x)} integer labels, got {y.dtype} {list(y.shape)}; store class indices")
    return images, torch.from_numpy(y.astype(np.int64))


def read_npz(path: Path, what: str, names: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays ``names`` (those present, each with at least one dimension) of the ``.npz`` archive at
    ``path`` and the names of all its arrays, read without pickles. A file that is no ``.npz`` (empty,
    a single ``.npy`` array, text under that name, a damaged zip) is a one-line DfkdError naming
    ``what`` it was meant to be (eval data, prior, synthetic set file)."""
    fix = "write it with numpy.savez(path, x=...)"
    try:
        with open(path, "rb") as handle:
            head = handle.read(6)
        if not head.startswith(b"PK"):  # every .npz is a zip archive
            kind = "empty (0 bytes)" if not head else (
                "a single .npy array" if head.startswith(b"\x93NUMPY") else "not a zip archive")
            raise DfkdError(f"{what} '{path}' is {kind}, not an .npz archive; {fix}")
        with np.load(path, allow_pickle=False) as archive:
            found = list(archive.files)
            arrays = {name: archive[name] for name in names if name in found}
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:100]
        raise DfkdError(f"{what} '{path}' is not a readable .npz ({reason}); {fix}") from None
    for name, array in arrays.items():
        if array.ndim == 0:
            raise DfkdError(f"{what} '{path}': '{name}' is a single value, not an array of samples; {fix}")
    return arrays, found


def to_unit_nchw(x: np.ndarray, input_shape: tuple[int, int, int], path: Path, what: str = "eval data") -> torch.Tensor:
    """float32 ``[N, C, H, W]`` in [0, 1] from an integer or [0, 1]-float array in a known layout,
    fitted to ``input_shape``; errors name the file as ``what`` (eval data, prior data)."""
    channels, height, width = input_shape
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3, 4)):
        raise DfkdError(f"{what} '{path}': 'x' has shape {list(x.shape)}; expected [N,H,W], [N,H,W,C] or [N,C,H,W] with C in 1, 3")
    if x.size == 0:
        raise DfkdError(f"{what} '{path}': 'x' has shape {list(x.shape)}, which holds no pixels; store images of at least 1x1")
    if np.issubdtype(x.dtype, np.integer):
        tensor = torch.from_numpy(np.ascontiguousarray(x).astype(np.float32)) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise DfkdError(f"{what} '{path}': 'x' has dtype {x.dtype}; store uint8 pixels or floats in [0, 1]")
    low, high = float(tensor.min()), float(tensor.max())
    if low < -_FLOAT_RANGE_SLACK or high > 1 + _FLOAT_RANGE_SLACK or not math.isfinite(low + high):
        raise DfkdError(f"{what} '{path}': pixel values span {low:g}..{high:g}; store uint8 0..255 or floats in [0, 1], not normalised data")
    return _fit_spatial(_match_channels(tensor, channels), height, width)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == 4:  # RGBA: drop alpha
        x = x[:, :3]
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # the weights PIL's convert("L") uses
    return (x * luma).sum(1, keepdim=True)


def _fit_spatial(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the shorter side to fit, then centre-crop to ``height x width``."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[..., top : top + height, left : left + width].clamp(0, 1)


def _load_image_folder(
    root: Path, input_shape: tuple[int, int, int], class_names: list[str] | None, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DfkdError(f"eval folder '{root}' has no class sub-folders; put each class's images in a sub-folder named after it")
    label_of, mapping = _folder_labels([f.name for f in folders], class_names)
    per_class = [[(f, label_of[folder.name]) for f in sorted(folder.iterdir()) if is_image_file(f)] for folder in folders]
    # Round-robin over classes so that a limit still yields a class-balanced subset.
    files = [item for item in chain.from_iterable(zip_longest(*per_class)) if item is not None]
    if not files:
        raise DfkdError(f"eval folder '{root}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images to its class sub-folders")
    images, labels, skipped = [], [], 0
    for file, label in files:
        if limit is not None and len(images) >= limit:
            break
        image = read_image(file, input_shape)
        if image is None:
            skipped += 1
            continue
        images.append(image)
        labels.append(label)
    if not images:
        raise DfkdError(f"eval folder '{root}' has no readable images ({skipped} could not be decoded); check the files")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped, mapping


def _folder_labels(names: list[str], class_names: list[str] | None) -> tuple[dict[str, int], str]:
    if class_names is not None and all(name in class_names for name in names):
        return {name: class_names.index(name) for name in names}, "class_names"
    if all(name.isdigit() for name in names) and sorted(int(n) for n in names) == list(range(len(names))):
        return {name: int(name) for name in names}, "digits"
    return {name: index for index, name in enumerate(names)}, "sorted"


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: Path, input_shape: tuple[int, int, int]) -> torch.Tensor | None:
    """``[C, H, W]`` float in [0, 1], or ``None`` when the file cannot be decoded."""
    from PIL import Image

    channels, height, width = input_shape
    try:
        with Image.open(path) as image:
            image = _to_8bit(image).convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's decode failures
        return None
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32).reshape(height, width, -1) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return tensor.expand(channels, -1, -1).contiguous() if tensor.shape[0] != channels else tensor.contiguous()


def _to_8bit(image: Any) -> Any:
    """16-bit grey images (modes I;16*, and I as older Pillow reads 16-bit PNGs) scaled to 8-bit L.

    PIL's own conversion clips them at 255 instead, which turns most 16-bit images white.
    """
    from PIL import Image

    if not image.mode.startswith("I"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.size and pixels.max() > 255:
        pixels = pixels / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))  # 2-D uint8: mode L
