"""Real data from ../shared/data as uint8 tensors (no download, no pickle). Benchmarks only."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzip-compressed."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist(split: str, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, size, size] (bilinear resize from 28x28, as in DAFL) and int64 labels."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(SHARED_DATA / "mnist" / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(SHARED_DATA / "mnist" / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().unsqueeze(1)
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8), torch.from_numpy(labels.astype(np.int64))


def load_cifar10(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, 32, 32] and int64 labels."""
    data = np.load(SHARED_DATA / "cifar10" / f"{split}.npz")
    return torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(data["y"].astype(np.int64))


LOADERS = {"mnist": (load_mnist, "mnist"), "cifar10": (load_cifar10, "cifar10")}
