"""Measure a student against its teacher: agreement, accuracy, eval-data loading, latency and size.

Example:
    >>> data = load_eval_data(Path("cifar10_test.npz"), (3, 32, 32), mean, std, class_names)
    >>> report = agreement_report(predict(teacher, data.x), predict(student, data.x), class_names, data.y)
    >>> round(report["top1_agreement"], 3)
    0.912
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.errors import DfkdError

__all__ = [
    "EvalData",
    "agreement_report",
    "count_params",
    "file_size_bytes",
    "load_eval_data",
    "onnx_latency_ms",
    "predict",
    "torch_latency_ms",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
# Float pixels may stray this far outside [0, 1] (rounding in whatever wrote them) and still count as [0, 1].
_FLOAT_RANGE_SLACK = 1e-3
# A latency measurement stops early past this many seconds, after _MIN_TIMED timed passes: a teacher at
# ~1 s a pass (vit_b_16 on 2 CPU cores) is timed 3 times instead of 23 calls in all (27 s -> ~5 s).
LATENCY_BUDGET_S = 3.0
_MIN_TIMED = 3


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits of ``model`` (already on ``device``) for ``x``, in eval mode, batched, returned as float32 on CPU.

    The model's train/eval mode is restored afterwards.

    Example:
        >>> predict(teacher, torch.zeros(3, 3, 32, 32)).shape
        torch.Size([3, 10])
    """
    was_training = model.training
    model.eval()
    try:
        outputs = [model(batch.to(device)).float().cpu() for batch in x.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def agreement_report(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    class_names: list[str],
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Top-1 agreement of student with teacher, overall and per class (keyed by the teacher's prediction).

    With ``labels`` the report also holds ``teacher_accuracy``, ``student_accuracy`` and, per class
    (keyed by the true label), ``n_labelled`` and ``student_accuracy``. Classes never predicted (or
    never present) get ``None`` for the undefined fraction.

    Example:
        >>> t = torch.tensor([[2.0, 0.0], [0.0, 1.0]]); s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> agreement_report(t, s, ["cat", "dog"])["per_class"]["dog"]
        {'n': 1, 'agreement': 0.0}
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.ndim != 2 or len(teacher_logits) == 0:
        raise ValueError(f"need two equal [N>0, K] logit tensors, got {list(teacher_logits.shape)} and {list(student_logits.shape)}")
    if len(class_names) != teacher_logits.shape[1] or len(set(class_names)) != len(class_names):
        raise ValueError(f"need {teacher_logits.shape[1]} distinct class names, got {len(class_names)}")
    teacher_pred, student_pred = teacher_logits.argmax(1).cpu(), student_logits.argmax(1).cpu()
    agree = teacher_pred == student_pred
    report: dict[str, Any] = {"n": len(agree), "top1_agreement": _mean(agree)}
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(class_names):
        predicted_here = teacher_pred == index
        per_class[name] = {"n": int(predicted_here.sum()), "agreement": _mean(agree[predicted_here])}
    if labels is not None:
        labels = labels.cpu()
        if labels.shape != agree.shape:
            raise ValueError(f"labels shape {list(labels.shape)} does not match {len(agree)} samples")
        report["teacher_accuracy"] = _mean(teacher_pred == labels)
        report["student_accuracy"] = _mean(student_pred == labels)
        for index, name in enumerate(class_names):
            labelled_here = labels == index
            per_class[name]["n_labelled"] = int(labelled_here.sum())
            per_class[name]["student_accuracy"] = _mean((student_pred == labels)[labelled_here])
    report["per_class"] = per_class
    return report


def _mean(hits: torch.Tensor) -> float | None:
    return float(hits.float().mean()) if hits.numel() else None


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


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def file_size_bytes(path: Path) -> int:
    """Size of the file at ``path`` in bytes."""
    return os.path.getsize(path)


def torch_latency_ms(
    model: nn.Module, input_shape: tuple[int, int, int], batch_size: int = 1, warmup: int = 3, iters: int = 20
) -> float:
    """Median wall-clock milliseconds per forward pass of one batch on the CPU (threads as configured).

    A model on another device is measured on a CPU copy; the caller's module is not moved.

    Example:
        >>> torch_latency_ms(student, (3, 32, 32)) > 0
        True
    """
    on_cpu = all(p.device.type == "cpu" for p in chain(model.parameters(), model.buffers()))
    module = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = module.training
    module.eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            return median_ms(lambda: module(x), warmup, iters)
    finally:
        module.train(was_training)


def onnx_latency_ms(
    path: Path, input_shape: tuple[int, int, int], batch_size: int = 1, warmup: int = 3, iters: int = 20
) -> float:
    """Median wall-clock milliseconds per batch for an ONNX model in onnxruntime on the CPU.

    Example:
        >>> onnx_latency_ms(Path("student.onnx"), (3, 32, 32)) > 0
        True
    """
    from dfkd_cli.export import onnx_session

    session = onnx_session(Path(path))
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch_size, *input_shape), dtype=np.float32)}
    return median_ms(lambda: session.run(None, feed), warmup, iters)


def median_ms(run: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of up to ``iters`` timed calls after up to ``warmup`` untimed ones; once
    ``LATENCY_BUDGET_S`` has passed, warm-up stops (after one call) and so does timing (after three)."""
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    deadline = time.perf_counter() + LATENCY_BUDGET_S
    for _ in range(warmup):
        run()
        if time.perf_counter() > deadline:
            break
    timings: list[float] = []
    while len(timings) < iters and not (len(timings) >= _MIN_TIMED and time.perf_counter() > deadline):
        start = time.perf_counter()
        run()
        timings.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(timings))
