"""LeNet-5 as in DAFL (``conv1..conv3``, ``fc1``, ``fc2``; no BatchNorm; 32x32 inputs).

Fast-Datafree saves the same network as ``features.0/3/6`` and ``fc.0/2``;
:func:`remap_fast_datafree_keys` renames such a state dict to the canonical DAFL names.

Example:
    >>> model = LeNet5(num_classes=10)
    >>> model(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

LENET_WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "lenet5": (6, 16, 120, 84),
    "lenet5_half": (3, 8, 60, 42),
}

_FAST_DATAFREE_TO_DAFL = {
    "features.0.": "conv1.", "features.3.": "conv2.", "features.6.": "conv3.",
    "fc.0.": "fc1.", "fc.2.": "fc2.",
}


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; ``widths`` are (conv1, conv2, conv3, fc1) channels.

    Example:
        >>> LeNet5(widths=LENET_WIDTHS["lenet5_half"]).fc1.out_features
        42
    """

    classifier_name = "fc2"

    def __init__(self, num_classes: int = 10, in_chans: int = 1,
                 widths: tuple[int, int, int, int] = LENET_WIDTHS["lenet5"]) -> None:
        super().__init__()
        c1, c2, c3, f1 = widths
        self.conv1 = nn.Conv2d(in_chans, c1, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=5)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(c3, f1)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(f1, num_classes)
        self.num_features = f1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool1(self.relu1(self.conv1(x)))
        out = self.maxpool2(self.relu2(self.conv2(out)))
        out = self.relu3(self.conv3(out))
        # A 32x32 input leaves a 1x1 map; other sizes fail at fc1, as in the reference.
        out = torch.flatten(out, 1)
        return self.relu4(self.fc1(out))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def is_fast_datafree_layout(keys: list[str]) -> bool:
    """True when the keys are LeNet-5 in the Fast-Datafree ``features.*`` / ``fc.*`` layout."""
    return bool(keys) and all(k.startswith(tuple(_FAST_DATAFREE_TO_DAFL)) for k in keys)


def remap_fast_datafree_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``features.0.weight`` -> ``conv1.weight`` etc.; other layouts are returned as is.

    Example:
        >>> sorted(remap_fast_datafree_keys({"fc.2.bias": torch.zeros(10)}))
        ['fc2.bias']
    """
    if not is_fast_datafree_layout(list(state)):
        return state
    renamed = {}
    for key, value in state.items():
        prefix = next(p for p in _FAST_DATAFREE_TO_DAFL if key.startswith(p))
        renamed[_FAST_DATAFREE_TO_DAFL[prefix] + key[len(prefix):]] = value
    return renamed
