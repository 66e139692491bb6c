"""The benchmark suites: for each table its teacher, student, real eval data and rows' settings.

See run_bench.py for how the suites run; `make_suite(name)` is the one place a suite is defined.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = Path(os.environ.get("DFKD_BENCH_OUT") or BENCH / "out")  # teachers and eval files; bench/gpu.sh --smoke: a temporary folder
HUGE_STEPS = 1_000_000  # never reached on a CPU: the time budget ends each run


@dataclass
class Suite:
    """One table: a teacher, a student, real eval data, and the rows' shared settings."""

    name: str
    title: str
    teacher: Path
    arch: str
    student: str
    input_shape: str
    normalize: str
    eval_data: tuple[str, int]  # the first N images of this data set's test split
    train_teacher: list[str]  # bench/train_teacher.py arguments that make the teacher
    kd_data: tuple[str, ...]  # real data sets for KD rows
    kd_train_from: str  # recipe whose [train] table the KD rows use
    budget: str
    steps: int = HUGE_STEPS
    device: str = "cpu"
    overrides: dict[str, list[str]] = field(default_factory=dict)  # "*": every row; else a recipe name
    digits: bool = False  # no mirrored images: train.flip and (where a recipe has it) synth.flip off
    prior: str | None = None  # data set whose training images (no labels) are --prior for avkd, prior-kd
    classes: tuple[int, ...] | None = None  # the teacher's classes (eval data: these; the prior: the others)
    # Rows that are plain KD on inputs nobody optimises: they train like the KD rows (the trainer of
    # kd_train_from), so these baselines differ from the KD rows only in their inputs.
    kd_like: tuple[str, ...] = ("noise", "prior-kd")
    # Extra rows: name -> (recipe, settings), e.g. "dfad+lra" -> ("dfad", ['train.update="lra"']); settings
    # starting with "--" are dfkd compress flags (with their values), e.g. ["--quantize", "int8"].
    variants: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    only_variants: bool = False  # rows are the variants alone (no KD rows, no plain recipe rows)
    show_stability: bool = False  # a column with the agreement's mean / variance / max along the run
    published: dict[str, str] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return "_classes" + "".join(map(str, self.classes)) if self.classes else ""

    @property
    def eval_npz(self) -> Path:
        dataset, n = self.eval_data
        return OUT / f"{dataset}{self.split}_test{n // 1000}k.npz"

    @property
    def prior_npz(self) -> Path | None:
        if not self.prior:
            return None
        return OUT / f"{self.prior}{'_other_than' + self.split if self.classes else ''}_train_unlabelled.npz"

    def teacher_args(self) -> list[str]:
        return [str(self.teacher), "--arch", self.arch, "--input-shape", self.input_shape,
                "--normalize", self.normalize]


# The demo's settings for DeepInversion-style recipes on this MNIST pair (dfkd_cli/demo/demo.toml):
# the recipes' CIFAR-10 settings would spend the whole budget on one batch.
_MNIST_PIXEL_OPT = ["synth.batch_size=128", "synth.iterations=200", "synth.lr=0.1",
                    "synth.first_bn_multiplier=10.0", "synth.loss.bn=10.0", "synth.loss.tv_l1=0.05",
                    "synth.loss.tv_l2=0.0", "train.optimizer=adam", "train.lr=0.001", "train.weight_decay=0.0",
                    "train.crop_pad=2"]
# LeNet-5-half stalls at the CIFAR ResNet setting (SGD lr 0.1) of the cmi and fast recipe files.
_SMALL_STUDENT = ["train.optimizer=adam", "train.lr=0.001", "train.weight_decay=0.0"]
_CPU_CIFAR_PIXEL_OPT = ["synth.iterations=200", "synth.batch_size=64"]
# The papers' CIFAR-10 settings where a recipe file ships CPU-sized ones (each file's header says so).
_PAPER_CIFAR = {
    "cmi": ["synth.iterations=200", "synth.batch_size=256", "synth.ngf=64"],
    "fast": ["synth.batch_size=256", "synth.ngf=64"],
    "zskd": ["synth.iterations=1500", "synth.lr=0.01"],
    "dafl": ["synth.lr=0.02", "synth.latent_dim=1000", "synth.batch_size=1024", "synth.loss.oh=0.05",
             "synth.loss.act=0.01", "synth.loss.ie=5.0", "train.optimizer=sgd", "train.lr=0.1"],
}
_UPDATE_VARIANTS = {f"{recipe}{'' if update == 'plain' else '+' + update}": (recipe, [f'train.update="{update}"'])
                    for recipe in ("dfad", "dafl") for update in ("plain", "replay", "lra")}
# The default path (no --recipe: the policy's pick, or its race) at the suite's budget, and an int8 student.
_RACE_AND_INT8 = {"default (auto)": ("auto", []), "dfad + int8": ("dfad", ["--quantize", "int8"])}
_MNIST_TEACHER = ["--dataset", "mnist", "--arch", "lenet5", "--epochs", "5", "--lr", "0.05"]
_MNIST_LENET5 = ROOT / "dfkd_cli" / "demo" / "mnist_lenet5.safetensors"  # bundled: the demo's teacher
_DAFL_TABLE_1 = {"kd-mnist": "98.91% (DAFL)", "kd-usps": "94.56% (DAFL)", "noise": "88.01% (DAFL)",
                 "dafl": "98.20% (DAFL)", "dfad": "98.3% (DFAD)", "zskd": "98.77% (ZSKD)"}


def make_suite(name: str, gpu: bool = False) -> Suite:
    """The suite called ``name`` (``gpu``: the cifar10 suite at the papers' scale on CUDA)."""
    if name == "mnist-lenet":
        return Suite(name, "MNIST, DAFL Table 1 setting: LeNet-5 -> LeNet-5-half", _MNIST_LENET5,
                     "lenet5", "lenet5_half", "1x32x32", "mnist", ("mnist", 10_000), _MNIST_TEACHER,
                     ("mnist", "usps"), "dafl", "10m", digits=True, prior="usps", published=_DAFL_TABLE_1,
                     variants=_RACE_AND_INT8)
    if name == "mnist-bn":
        return Suite(name, "MNIST with a BatchNorm teacher: resnet8 -> LeNet-5-half",
                     ROOT / "dfkd_cli" / "demo" / "mnist_resnet8.safetensors", "resnet8", "lenet5_half", "1x32x32",
                     "mnist", ("mnist", 10_000), ["--dataset", "mnist", "--arch", "resnet8", "--epochs", "3"],
                     ("mnist",), "dafl", "5m", digits=True,
                     overrides={"deepinversion": _MNIST_PIXEL_OPT, "adi": _MNIST_PIXEL_OPT,
                                "cmi": _SMALL_STUDENT, "fast": _SMALL_STUDENT},
                     variants={"default (auto)": ("auto", [])})
    if name == "mnist-update":
        return Suite(name, "Retention updates on MNIST: LeNet-5 -> LeNet-5-half, trainer.update plain / replay / lra",
                     _MNIST_LENET5, "lenet5", "lenet5_half", "1x32x32", "mnist", ("mnist", 10_000),
                     _MNIST_TEACHER, (), "dafl", "5m", digits=True, variants=_UPDATE_VARIANTS, only_variants=True,
                     show_stability=True)
    if name == "cifar-split":
        return Suite(name, "CIFAR-10 split by class (AVKD's idea): a resnet20 teacher on classes 0-4 -> resnet8, "
                     "the other five classes' training images as --prior", OUT / "cifar10_first5_resnet20.safetensors",
                     "resnet20", "resnet8", "3x32x32", "cifar10", ("cifar10", 2_000),
                     ["--dataset", "cifar10", "--classes", "0,1,2,3,4", "--arch", "resnet20", "--epochs", "10",
                      "--crop-pad", "4", "--flip"], (), "dafl", "5m", prior="cifar10", classes=(0, 1, 2, 3, 4),
                     variants={name: (name, []) for name in ("noise", "prior-kd", "avkd", "dafl", "dfad")},
                     only_variants=True)
    if name == "cifar10" and gpu:
        return Suite(name, "CIFAR-10 at the papers' scale: resnet34 -> resnet18 (GPU)",
                     OUT / "cifar10_resnet34.safetensors", "cifar_resnet34", "cifar_resnet18", "3x32x32", "cifar10",
                     ("cifar10", 10_000), ["--dataset", "cifar10", "--arch", "cifar_resnet34", "--epochs", "60",
                                         "--crop-pad", "4", "--flip", "--device", "cuda"],
                     ("cifar10",), "deepinversion", "1h", device="cuda", overrides=_PAPER_CIFAR)
    if name == "cifar10":
        return Suite(name, "CIFAR-10 on a CPU: resnet20 -> resnet8", OUT / "cifar10_resnet20.safetensors", "resnet20",
                     "resnet8", "3x32x32", "cifar10", ("cifar10", 2_000),
                     ["--dataset", "cifar10", "--arch", "resnet20", "--epochs", "10", "--crop-pad", "4", "--flip"],
                     ("cifar10",), "deepinversion", "5m",
                     overrides={"deepinversion": _CPU_CIFAR_PIXEL_OPT, "adi": _CPU_CIFAR_PIXEL_OPT},
                     variants={"default (auto)": ("auto", []), "fast + int8": ("fast", ["--quantize", "int8"])})
    raise SystemExit(f"unknown suite '{name}'; choose one of: {', '.join(SUITE_NAMES)}")


SUITE_NAMES = ("mnist-lenet", "mnist-bn", "cifar10", "mnist-update", "cifar-split", "demo")
DATA_NAMES = {"mnist": "MNIST", "usps": "USPS", "cifar10": "CIFAR-10"}
KD_TITLES = {"mnist": "KD on MNIST train images (upper bound)", "usps": "KD on USPS train images (alternative data)",
             "cifar10": "KD on CIFAR-10 train images (upper bound)"}
