"""Benchmarks on real data: run `dfkd compress` on teacher/recipe pairs and print a Markdown table.

    python bench/run_bench.py demo            # the bundled MNIST demo vs the noise baseline
    python bench/run_bench.py cifar10         # CIFAR-10 resnet20 -> resnet8 (train the teacher first:
                                              #   see bench/train_teacher.py), DeepInversion vs noise

Every number comes from the run's report.json: accuracy on real held-out test images (never used to
select the student), agreement with the teacher, and total wall-clock time including loading,
synthesis, training, ONNX export and evaluation.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import load_cifar10  # noqa: E402

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
CIFAR_TEACHER = OUT / "cifar10_resnet20.safetensors"

SUITES: dict[str, list[tuple[str, list[str]]]] = {
    "demo": [
        ("demo: deepinversion", ["--demo"]),
        ("demo settings, noise", ["--demo", "--recipe", "noise"]),
    ],
    "cifar10": [
        ("deepinversion 200 steps", ["--recipe", "deepinversion", "--steps", "200", "-s", "synth.iterations=200",
                                     "-s", "synth.batch_size=64", "-s", "train.batch_size=64", "-s", "train.holdout=128"]),
        ("noise 200 steps", ["--recipe", "noise", "--steps", "200", "-s", "train.batch_size=64", "-s", "train.holdout=128"]),
    ],
}


def cifar_args() -> list[str]:
    if not CIFAR_TEACHER.is_file():
        sys.exit(f"{CIFAR_TEACHER} missing: train it with bench/train_teacher.py (see its docstring)")
    eval_npz = OUT / "cifar10_test1k.npz"
    if not eval_npz.is_file():
        x, y = load_cifar10("test")
        np.savez_compressed(eval_npz, x=x[:1000].permute(0, 2, 3, 1).numpy(), y=y[:1000].numpy())
    return [str(CIFAR_TEACHER), "--arch", "resnet20", "--student", "resnet8", "--normalize", "cifar10",
            "--eval-data", str(eval_npz), "--device", "cpu"]


def run(name: str, args: list[str], base: list[str], workdir: Path) -> dict:
    out = workdir / name.replace(" ", "_").replace(":", "")
    cmd = ["dfkd", "compress", *base, *args, "--out", str(out), "--format", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"{name} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    report = json.loads(proc.stdout)
    real, run_info = report.get("eval_data") or {}, report["run"]
    return {"run": name, "teacher": report["teacher"]["arch"], "student": report["student"]["arch"],
            "steps": run_info["steps"], "teacher acc": real.get("teacher_accuracy"),
            "student acc": real.get("student_accuracy"), "agreement (real)": real.get("top1_agreement"),
            "agreement (synthetic holdout)": report["synthetic_holdout"]["top1_agreement"],
            "total s": run_info["wall_clock_s"]["total"], "hardware": run_info["hardware"]}


PERCENT_COLUMNS = ("teacher acc", "student acc", "agreement (real)", "agreement (synthetic holdout)")


def table(rows: list[dict]) -> str:
    def cell(key: str, v: object) -> str:
        if v is None:
            return "-"
        if key in PERCENT_COLUMNS:
            return f"{100 * v:.1f}%"
        return f"{v:.0f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell(k, v) for k, v in row.items()) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    suite = sys.argv[1] if len(sys.argv) > 1 else "demo"
    base = cifar_args() if suite == "cifar10" else []
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as tmp:
        rows = [run(name, args, base, Path(tmp)) for name, args in SUITES[suite]]
    print(table(rows))


if __name__ == "__main__":
    main()
