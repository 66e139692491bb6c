"""samples.png: a grid of synthesized inputs, one row per class as the teacher labels them.

Example:
    >>> n = grid_sample_size(teacher.num_classes)
    >>> x = synth.preview(n)
    >>> save_sample_grid(x, predict_classes(teacher.model, x), teacher.mean, teacher.std,
    ...                  teacher.class_names, run_dir / "samples.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd_cli.atomic import replace, temporary_sibling

__all__ = ["grid_sample_size", "save_sample_grid"]

MAX_GRID_CLASSES = 100
_GRID_PAD = 2
_THUMBNAIL_MAX = 96  # larger images are shrunk so a 100-class grid stays a reasonable PNG


def grid_sample_size(num_classes: int) -> int:
    """Training samples the teacher labels for samples.png: enough to fill a row of each class it
    shows (16 per class: classes are not equally common), at most 1,024 (a large teacher's
    labelling cost counts against the budget)."""
    return min(1024, 16 * min(num_classes, MAX_GRID_CLASSES))


def save_sample_grid(
    x: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: list[str],
    path: Path,
    per_class: int = 8,
) -> None:
    """Save a PNG grid: one row per class (first 100), up to ``per_class`` images of that class each.

    ``x`` are normalised inputs and ``labels`` the teacher's predicted classes. Images are
    de-normalised to [0, 1]; tiny ones (under 64 px) are doubled in size, large ones shrunk to 96 px.
    Rows of classes with no sample stay blank, and each row is labelled with its class name on the left.
    Row ``r`` spans pixels ``[pad + r * (h + pad), pad + r * (h + pad) + h)`` with ``pad = 2``.

    Example:
        >>> save_sample_grid(synthetic_x, teacher_pred, mean, std, class_names, run_dir / "samples.png")
    """
    from torchvision.utils import make_grid

    classes = class_names[:MAX_GRID_CLASSES]
    images = _displayable(x.detach().to("cpu", torch.float32), mean, std)
    labels = labels.detach().to("cpu")
    blank = torch.ones_like(images[0]) if len(images) else None
    tiles: list[torch.Tensor] = []
    for index in range(len(classes)):
        chosen = list(images[labels == index][:per_class])
        tiles += chosen + [blank] * (per_class - len(chosen))
    grid = make_grid(torch.stack(tiles), nrow=per_class, padding=_GRID_PAD, pad_value=1.0)
    canvas = _label_rows(grid, classes, tile_height=images.shape[-2])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_sibling(path, ".png") as temporary:
        canvas.save(temporary, format="PNG")
        replace(temporary, path)


def _displayable(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """De-normalise to [0, 1] and bring the images to a size that is comfortable to look at."""
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"need images [N>0, C, H, W], got {list(x.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (x * std_t + mean_t).clamp(0, 1)
    side = max(x.shape[-2:])
    if side < 64:
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    elif side > _THUMBNAIL_MAX:
        scale = _THUMBNAIL_MAX / side
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True).clamp(0, 1)
    return x


def _label_rows(grid: torch.Tensor, classes: list[str], tile_height: int) -> Any:
    """A PIL image of ``grid`` with a white margin on the left holding each row's class name."""
    from PIL import Image, ImageDraw, ImageFont

    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    body = Image.fromarray(pixels)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(body)
    try:
        boxes = [measure.textbbox((0, 0), name, font=font) for name in classes]
    except UnicodeError:  # Pillow without FreeType has a latin-1 bitmap font only: leave rows unlabelled
        return body
    margin = 8 + max(right for _, _, right, _ in boxes)
    canvas = Image.new("RGB", (body.width + margin, body.height), "white")
    canvas.paste(body, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (name, (_, upper, _, lower)) in enumerate(zip(classes, boxes)):
        top = _GRID_PAD + row * (tile_height + _GRID_PAD) + (tile_height - (lower - upper)) // 2 - upper
        draw.text((4, top), name, fill="black", font=font)
    return canvas
