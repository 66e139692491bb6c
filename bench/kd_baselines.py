"""KD with real images: the upper-bound and alternative-data rows of the benchmark tables.

The student is distilled from the teacher on real images (the teacher's own training set, or
another data set such as USPS for an MNIST teacher: DAFL's "alternative data" row) with dfkd's own
``StudentTrainer``, so the trainer, loss, schedule and time budget are exactly those of a
``dfkd compress`` row; only the batches differ. The trainer settings are the ``[train]`` table of a
named recipe (``--train-from``, plus ``-s train.key=value`` overrides). Labels are never used: the
teacher's soft outputs are the targets.

The student is selected, as in ``dfkd compress``, on teacher agreement over images held out of the
training source (never on the test set), saved as ``student.safetensors`` with dfkd's metadata and
measured on ``--eval-data`` with the code of ``dfkd eval`` (``dfkd_cli.measure.evaluate_student``).
The report (``report.json`` in ``--out`` and on stdout) has the same ``run`` and ``eval_data``
sections as a compress report.

    python bench/kd_baselines.py bench/out/mnist_lenet5.safetensors --arch lenet5 --student lenet5_half \\
        --input-shape 1x32x32 --normalize mnist --data usps --eval-data bench/out/mnist_test10k.npz \\
        --train-from dafl --steps 1000000 --time-budget 10m --device cpu --out /tmp/kd-usps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import IMAGES  # noqa: E402

from dfkd_cli import __version__  # noqa: E402
from dfkd_cli.config import TrainConfig, load_recipe  # noqa: E402
from dfkd_cli.errors import DfkdError  # noqa: E402
from dfkd_cli.export import StudentMeta, save_student  # noqa: E402
from dfkd_cli.measure import evaluate_student  # noqa: E402
from dfkd_cli.runtime import Budget, hardware_description, parse_duration, resolve_device, seed_everything  # noqa: E402
from dfkd_cli.teacher import Teacher, build_student, load_teacher, parse_input_shape  # noqa: E402
from dfkd_cli.trainer import StudentTrainer, predict_classes  # noqa: E402


def normalise(x: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """uint8 images to the teacher's normalised input space (float32)."""
    mean = torch.tensor(teacher.mean).view(1, -1, 1, 1)
    std = torch.tensor(teacher.std).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


def split_holdout(x: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, ``n`` held-out images for selection), split at random."""
    if not 0 < n < len(x):
        raise DfkdError(f"train.holdout {n} must be between 1 and {len(x) - 1} for {len(x)} images; "
                        "set -s train.holdout=N")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[n:]], x[order[:n]]


def batches(x: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches (a new permutation every epoch)."""
    if not 0 < batch_size <= len(x):
        raise DfkdError(f"train.batch_size {batch_size} must be between 1 and the {len(x)} training images")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield x[order[i : i + batch_size]]


def distil(trainer: StudentTrainer, teacher: Teacher, x_train: torch.Tensor, x_select: torch.Tensor,
           cfg: TrainConfig, budget: Budget, device: torch.device, seed: int) -> None:
    """KD steps on real uint8 batches until ``cfg.steps`` or the time budget, selecting on the
    normalised ``x_select`` every ``eval_every`` steps. The schedule follows the budget as in ``dfkd compress``."""
    trainer.follow_clock(budget.fraction)
    t_select = predict_classes(trainer.teacher, x_select)
    for batch in batches(x_train, cfg.batch_size, seed):
        if trainer.steps_done >= cfg.steps or budget.expired():
            break
        trainer.step(normalise(batch, teacher).to(device))
        if trainer.steps_done % cfg.eval_every == 0:
            trainer.select(x_select, t_select)
    trainer.select(x_select, t_select)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, distil under the time budget, save and evaluate; the report."""
    started = time.perf_counter()
    device = resolve_device(args.device)
    seed_everything(args.seed)
    teacher = load_teacher(args.teacher, args.arch, parse_input_shape(args.input_shape), normalize=args.normalize,
                           mean=args.mean, std=args.std)
    cfg = load_recipe(args.train_from, args.set).train
    if args.steps is not None:
        cfg.steps = args.steps
    images, _ = IMAGES[args.data]("train")  # the labels are never used
    if tuple(images.shape[1:]) != teacher.input_shape:
        raise DfkdError(f"{args.data} images are {list(images.shape[1:])} but the teacher takes "
                        f"{list(teacher.input_shape)}; pick data that matches the teacher's input")
    x_train, x_select = split_holdout(images, cfg.holdout, args.seed)
    student = build_student(args.student, teacher)
    teacher.to(device)
    trainer = StudentTrainer(student, teacher.model, cfg, device)
    loaded = time.perf_counter()

    x_select = normalise(x_select, teacher).to(device)
    distil(trainer, teacher, x_train, x_select, cfg, Budget(args.time_budget), device, args.seed)
    student = trainer.restore_best().cpu()
    trained = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    meta = StudentMeta(arch=args.student, num_classes=teacher.num_classes, input_shape=teacher.input_shape,
                       mean=teacher.mean, std=teacher.std, class_names=teacher.class_names,
                       recipe=f"kd-{args.data}", teacher_arch=teacher.arch, teacher_sha256=teacher.sha256,
                       dfkd_version=__version__)
    save_student(student, meta, args.out / "student.safetensors")
    report = evaluate_student(args.out / "student.safetensors", args.teacher, args.arch, args.eval_data, None, None)
    done = time.perf_counter()
    report["run"].update(
        recipe=f"kd-{args.data}", train_from=args.train_from, train=dataclasses.asdict(cfg), device=str(device),
        hardware=hardware_description(device), steps=trainer.steps_done, best_step=trainer.kept.step,
        selection={"source": f"{args.data} train images held out of training", "n": len(x_select),
                   "top1_agreement": trainer.kept.agreement},
        wall_clock_s={"load": round(loaded - started, 3), "distill": round(trained - loaded, 3),
                      "evaluate": round(done - trained, 3), "total": round(done - started, 3)})
    (args.out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--input-shape", required=True, help="CxHxW, e.g. 1x32x32")
    parser.add_argument("--normalize", help="normalisation preset: mnist, cifar10, imagenet")
    parser.add_argument("--mean", type=floats, help="per-channel mean, comma separated (instead of --normalize)")
    parser.add_argument("--std", type=floats, help="per-channel std, comma separated")
    parser.add_argument("--data", choices=sorted(IMAGES), required=True, help="real images to distil on")
    parser.add_argument("--eval-data", type=Path, required=True, help=".npz of labelled real test images")
    parser.add_argument("--train-from", required=True, help="recipe whose [train] settings the student trainer uses")
    parser.add_argument("--set", "-s", action="append", default=[], help="override, e.g. -s train.lr=0.01")
    parser.add_argument("--steps", type=int, help="student steps (overrides train.steps)")
    parser.add_argument("--time-budget", type=parse_duration, help="wall-clock budget for training, e.g. 10m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main() -> None:
    try:
        report = run(parse_args())
    except DfkdError as err:
        print(f"error: {err.message}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
