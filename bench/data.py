"""Real data from ../shared/data as uint8 tensors (no download, no pickle). Benchmarks only.

Every loader returns uint8 images ``[N, C, H, W]`` (0..255, what ``dfkd --eval-data`` reads from an
.npz) and int64 labels ``[N]``:

- MNIST (IDX files), bilinear-resized from 28x28 to 32x32 as in DAFL;
- USPS (Hull 1994; the Elements of Statistical Learning text release: ``label v1 .. v256`` per
  line, pixels in [-1, 1]), mapped to [0, 1] (-1 is the black background, as in MNIST) and
  bilinear-resized from 16x16 to 32x32: the "alternative data" of DAFL's Table 1;
- CIFAR-10 (npz).

Text loaders return plain Python lists: SST-2 sentences with their 0/1 labels, and WikiText-2
detokenised into short sentences (the unlabelled out-of-domain text of the SST-2 benchmark).
"""

from __future__ import annotations

import csv
import gzip
import re
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


def read_usps(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Float pixels in [-1, 1] ``[N, 16, 16]`` and int64 labels from a (gzipped) USPS text file."""
    table = np.loadtxt(path, dtype=np.float32, ndmin=2)  # np.loadtxt reads .gz transparently
    if table.shape[1] != 257:
        raise ValueError(f"{path}: expected 257 numbers per line (label + 16x16 pixels), got {table.shape[1]}")
    labels = table[:, 0]
    if not np.all(labels == np.round(labels)) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must be the digits 0..9")
    return table[:, 1:].reshape(-1, 16, 16), labels.astype(np.int64)


def usps_to_uint8(pixels: np.ndarray, size: int = 32) -> torch.Tensor:
    """USPS pixels in [-1, 1] ``[N, 16, 16]`` as uint8 ``[N, 1, size, size]`` (bilinear resize)."""
    x = (torch.from_numpy(pixels).float().unsqueeze(1) + 1) * 127.5
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def load_usps(split: str, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, size, size] (7,291 train, 2,007 test) and int64 labels."""
    pixels, labels = read_usps(SHARED_DATA / "usps" / f"zip.{'train' if split == 'train' else 'test'}.gz")
    return usps_to_uint8(pixels, size), torch.from_numpy(labels)


def class_subset(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of ``classes``, relabelled 0..len(classes)-1 in the order given."""
    keep = torch.isin(y, torch.tensor(classes))
    relabel = torch.full((int(y.max()) + 1,), -1, dtype=torch.int64)
    relabel[list(classes)] = torch.arange(len(classes))
    return x[keep], relabel[y[keep]]


def save_eval_npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """uint8 ``[N, C, H, W]`` images and labels as the .npz ``dfkd --eval-data`` reads (x: [N, H, W]
    for grey images, [N, H, W, C] for colour; y: uint8)."""
    images = x.permute(0, 2, 3, 1).numpy()
    if images.shape[-1] == 1:
        images = images[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=images, y=y.numpy().astype(np.uint8))


def load_sst2(split: str) -> tuple[list[str], list[int]]:
    """SST-2 sentences (stripped) and labels (0 = negative, 1 = positive); split "train" or "dev"."""
    with open(SHARED_DATA / "sst2" / f"{split}.tsv", encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if next(rows) != ["sentence", "label"]:
            raise ValueError(f"sst2/{split}.tsv: expected the header 'sentence<TAB>label'")
        pairs = [(sentence.strip(), int(label)) for sentence, label in rows]
    return [s for s, _ in pairs], [y for _, y in pairs]


WIKITEXT_DETOKENISE = (
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" 's", "'s"),
    (" ; ", "; "), (" : ", ": "), ("( ", "("), (" )", ")"), (" n't", "n't"),
)
"""WikiText's tokenisation artefacts and their plain-text forms, applied in this order."""


def detokenise_wikitext(text: str) -> str:
    """One tokenised WikiText span as plain text (" @-@ " -> "-", " , " -> ", ", ...)."""
    text = f" {text.strip()} "
    for old, new in WIKITEXT_DETOKENISE:
        text = text.replace(old, new)
    return re.sub(r" ([.!?])$", r"\1", text.strip())


def split_wikitext_line(line: str, max_words: int) -> list[str]:
    """A tokenised paragraph cut after each " . ", " ! " or " ? " token; a sentence longer than
    ``max_words`` tokens is cut into the fewest near-equal pieces of at most ``max_words``."""
    sentences, current = [], []
    for token in line.split():
        current.append(token)
        if token in {".", "!", "?"}:
            sentences.append(current)
            current = []
    pieces = []
    for words in sentences + [current]:
        n = -(-len(words) // max_words)
        pieces += [" ".join(words[i * len(words) // n : (i + 1) * len(words) // n]) for i in range(n)]
    return pieces


def wikitext_sentences(max_words: int = 40, min_words: int = 3, drop_unk: bool = False) -> list[str]:
    """WikiText-2 valid + test detokenised into sentences of ``min_words`` to ``max_words`` words, in
    file order. Heading (" = Title = ") and blank lines are dropped. WikiText writes rare words as
    ``<unk>`` (6% of tokens, in two thirds of the sentences); ``drop_unk`` drops those sentences."""
    sentences = []
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        for line in (SHARED_DATA / "wikitext2" / name).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("="):
                continue
            for piece in split_wikitext_line(line, max_words):
                if (drop_unk and "<unk>" in piece) or len(piece.split()) < min_words:
                    continue
                sentences.append(detokenise_wikitext(piece))
    return sentences


LOADERS = {"mnist": (load_mnist, "mnist"), "cifar10": (load_cifar10, "cifar10")}
"""Datasets a teacher can be trained on: loader and normalisation preset."""

IMAGES = {"mnist": load_mnist, "usps": load_usps, "cifar10": load_cifar10}
"""Every image dataset the benchmarks read, by name."""
