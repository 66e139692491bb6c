"""Train a teacher on real data from ../shared/data, for the demo and the benchmarks.

    python bench/train_teacher.py --dataset mnist --arch resnet8 --epochs 3 --out dfkd_cli/demo/mnist_resnet8.safetensors \
        --heldout dfkd_cli/demo/mnist_heldout.npz      # the bundled demo teacher (99.07% test accuracy)
    python bench/train_teacher.py --dataset cifar10 --arch resnet20 --epochs 10 --crop-pad 4 --flip \
        --out bench/out/cifar10_resnet20.safetensors
    python bench/train_teacher.py --dataset mnist --arch lenet5 --epochs 5 --lr 0.05 \
        --out dfkd_cli/demo/mnist_lenet5.safetensors  # the bundled demo teacher: DAFL's LeNet-5 (99.36%)
    python bench/train_teacher.py --dataset cifar10 --arch cifar_resnet34 --epochs 60 --crop-pad 4 --flip \
        --device cuda --out bench/out/cifar10_resnet34.safetensors   # GPU only: the papers' CIFAR-10 teacher
    python bench/train_teacher.py --dataset cifar10 --classes 0,1,2,3,4 --arch resnet20 --epochs 10 \
        --crop-pad 4 --flip --out bench/out/cifar10_first5_resnet20.safetensors  # AVKD's class split

`bench/run_bench.py` runs these itself when a suite's teacher is missing.

SGD with Nesterov momentum and a one-cycle schedule, optional random crops (--crop-pad) and flips
(--flip). Prints the
test accuracy after each epoch. ``--heldout`` saves the first 1,000 test images (never trained on).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import LOADERS, class_subset  # noqa: E402

from dfkd_cli.archs import NORMALIZE_PRESETS, create_model  # noqa: E402
from dfkd_cli.runtime import resolve_device  # noqa: E402
from dfkd_cli.trainer import augment  # noqa: E402


def normaliser(preset: str, device: torch.device = torch.device("cpu")):
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in NORMALIZE_PRESETS[preset])
    return lambda x: (x.float() / 255 - mean) / std


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm) -> float:
    model.eval()
    preds = torch.cat([model(norm(x[i : i + 1000])).argmax(1) for i in range(0, len(x), 1000)])
    return float((preds.cpu() == y.cpu()).float().mean())


def train(dataset: str, arch: str, epochs: int, batch_size: int, lr: float, seed: int, crop_pad: int = 0,
          flip: bool = False, device: torch.device = torch.device("cpu"),
          classes: tuple[int, ...] | None = None) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(seed)
    load, preset = LOADERS[dataset]
    (x_train, y_train), (x_test, y_test) = load("train"), load("test")
    if classes:
        (x_train, y_train), (x_test, y_test) = class_subset(x_train, y_train, classes), class_subset(x_test, y_test, classes)
    x_train, y_train, x_test = x_train.to(device), y_train.to(device), x_test.to(device)
    norm = normaliser(preset, device)
    model = create_model(arch, len(classes) if classes else 10, tuple(x_train.shape[1:])).to(device)
    steps = epochs * (len(x_train) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start, acc = time.time(), 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), device=device)
        for i in range(len(x_train) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = augment(norm(x_train[idx]), crop_pad, flip)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, x_test, y_test, norm)
        print(f"epoch {epoch + 1}/{epochs}: test accuracy {acc:.4f} ({time.time() - start:.0f} s)", flush=True)
    return model.eval(), acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(LOADERS), required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-pad", type=int, default=0, help="random-crop padding in pixels (0: off)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout", type=Path, help="also save the first 1,000 test images as .npz (x, y)")
    parser.add_argument("--classes", help="train on these classes only, relabelled 0..K-1, e.g. 0,1,2,3,4")
    args = parser.parse_args()
    classes = tuple(int(c) for c in args.classes.split(",")) if args.classes else None
    model, _ = train(args.dataset, args.arch, args.epochs, args.batch_size, args.lr, args.seed,
                     args.crop_pad, args.flip, resolve_device(args.device), classes)
    model = model.cpu()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    if args.heldout:
        x, y = LOADERS[args.dataset][0]("test")
        images = x[:1000].permute(0, 2, 3, 1).squeeze(-1).numpy()
        np.savez_compressed(args.heldout, x=images, y=y[:1000].numpy().astype(np.uint8))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
