"""Train the bundled demo teacher: a CIFAR-style resnet8 (with BatchNorm) on real MNIST at 1x32x32.

Writes dfkd_cli/demo/mnist_resnet8.safetensors and dfkd_cli/demo/mnist_heldout.npz (the first
1,000 digits of the MNIST test set, never used for training). Run from the repository root:

    python bench/train_demo_teacher.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist  # noqa: E402

from dfkd_cli.archs import NORMALIZE_PRESETS, create_model  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "dfkd_cli" / "demo"
MEAN, STD = (v[0] for v in NORMALIZE_PRESETS["mnist"])


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN) / STD


def main(epochs: int = 3, batch_size: int = 128, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    model = create_model("resnet8", 10, (1, 32, 32))
    steps = epochs * (len(x_train) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(len(x_train) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(normalise(x_train[idx])), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = torch.cat([model(normalise(x_test[i : i + 1000])).argmax(1) for i in range(0, 10000, 1000)]).eq(y_test).float().mean()
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - start:.0f} s)", flush=True)
    DEMO.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(DEMO / "mnist_resnet8.safetensors"))
    np.savez_compressed(DEMO / "mnist_heldout.npz", x=x_test[:1000, 0].numpy(), y=y_test[:1000].numpy().astype(np.uint8))
    print(f"wrote {DEMO}")


if __name__ == "__main__":
    main()
