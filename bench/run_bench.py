"""Benchmarks on real data: every recipe run as a user would, at equal wall-clock cost, in a Markdown table.

Reproduce every table (from the repository root, with the virtual environment's python; teachers
and eval files are made in bench/out/ on first use, so the first run of a suite also trains its
teacher):

    python bench/run_bench.py mnist-lenet --json bench/out/mnist-lenet.json   # DAFL Table 1 setting, 10m/row
    python bench/run_bench.py mnist-bn    --json bench/out/mnist-bn.json      # BN teacher: BN-prior recipes, 5m/row
    python bench/run_bench.py cifar10     --json bench/out/cifar10.json       # resnet20 -> resnet8 on CPU, 5m/row
    python bench/run_bench.py cifar10 --gpu --json bench/out/cifar10-gpu.json # resnet34 -> resnet18 on a GPU
    python bench/run_bench.py demo                                            # the bundled demo vs noise

Expected duration: rows x (budget + about 20-40 s of loading, export and evaluation on 2 CPU cores):
mnist-lenet 7 rows (kd-mnist, kd-usps and the 5 recipes without BatchNorm) about 75 min; mnist-bn and
cifar10 11 rows (kd and all 10 recipes) about 60-65 min each; cifar10 --gpu 11 rows at 1h, about
11-12 h plus the teacher's training (60 epochs, minutes on a recent GPU). It needs ../shared/data
beside the checkout (the CIFAR-10 training set is 141 MB). Run one suite at a time on an idle machine:
the numbers are wall-clock, so other load on the CPU lowers every row's step count.

    --budget 20s --recipes noise,dafl   a short check of a few rows (row names: kd-DATA and recipe names;
                                        a suite lists its rows on stderr when it starts)
    --set train.lr=0.01                 an override for every row; --set dafl:train.lr=0.01 for one recipe
    --keep DIR                          keep every row's run folder (default: a temporary folder)

Teachers (trained by bench/train_teacher.py when missing; the exact arguments are in make_suite):
MNIST LeNet-5 (no BatchNorm, `--epochs 5 --lr 0.05`), the bundled demo resnet8 (BatchNorm, 99.07%),
CIFAR-10 resnet20 (`--epochs 10 --crop-pad 4 --flip`) and, for --gpu only, CIFAR-10 cifar_resnet34.

Every row but the teacher's is one process: `dfkd compress TEACHER ... --recipe R --time-budget B
--steps S --format json` for a recipe (the recipes that apply are asked of `dfkd inspect`), or
bench/kd_baselines.py for KD on real images (same student, trainer and budget; the trainer settings
are those of the suite's `kd_train_from` recipe). All rows of a suite get the same --time-budget,
and --steps is so large that the budget is what ends each run. On a CPU, recipes run with their
files' settings except where a suite says otherwise (make_suite: DeepInversion/ADI at fewer pixel
iterations, no mirrored digits); `--gpu` restores the papers' synthesis settings where a recipe
file ships CPU-sized ones, and gives each row an hour. Accuracy and teacher
agreement are measured on real test images never used for selection (students are selected on
held-out synthetic samples, or held-out training images for the KD rows). "total s" is the row's
whole wall-clock time as its report records it (loading, distillation, export, evaluation; Python's
start-up comes on top) on the hardware named in the row. The table goes to stdout, progress to
stderr; a row that fails shows its one-line error instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import IMAGES, save_eval_npz  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
DFKD = Path(sys.executable).parent / "dfkd"
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
    published: dict[str, str] = field(default_factory=dict)

    @property
    def eval_npz(self) -> Path:
        dataset, n = self.eval_data
        return OUT / f"{dataset}_test{n // 1000}k.npz"

    def teacher_args(self) -> list[str]:
        return [str(self.teacher), "--arch", self.arch, "--input-shape", self.input_shape,
                "--normalize", self.normalize]


# The demo's settings for DeepInversion-style recipes on this MNIST pair (dfkd_cli/demo/demo.toml):
# the recipes' CIFAR-10 settings would spend the whole budget on one batch.
_MNIST_PIXEL_OPT = ["synth.batch_size=128", "synth.iterations=200", "synth.lr=0.1",
                    "synth.first_bn_multiplier=10.0", "synth.loss.bn=10.0", "synth.loss.tv_l1=0.05",
                    "synth.loss.tv_l2=0.0", "train.optimizer=adam", "train.lr=0.001", "train.weight_decay=0.0",
                    "train.crop_pad=2"]
_CPU_CIFAR_PIXEL_OPT = ["synth.iterations=200", "synth.batch_size=64"]
# The papers' CIFAR-10 settings where a recipe file ships CPU-sized ones (each file's header says so).
_PAPER_CIFAR = {
    "cmi": ["synth.iterations=200", "synth.batch_size=256", "synth.ngf=64"],
    "fast": ["synth.batch_size=256", "synth.ngf=64"],
    "zskd": ["synth.iterations=1500", "synth.lr=0.01"],
    "dafl": ["synth.lr=0.02", "synth.latent_dim=1000", "synth.batch_size=1024", "synth.loss.oh=0.05",
             "synth.loss.act=0.01", "synth.loss.ie=5.0", "train.optimizer=sgd", "train.lr=0.1"],
}
_MNIST_TEACHER = ["--dataset", "mnist", "--arch", "lenet5", "--epochs", "5", "--lr", "0.05"]
_DAFL_TABLE_1 = {"kd-mnist": "98.91% (DAFL)", "kd-usps": "94.56% (DAFL)", "noise": "88.01% (DAFL)",
                 "dafl": "98.20% (DAFL)", "dfad": "98.3% (DFAD)", "zskd": "98.77% (ZSKD)"}


def make_suite(name: str, gpu: bool = False) -> Suite:
    """The suite called ``name`` (``gpu``: the cifar10 suite at the papers' scale on CUDA)."""
    if name == "mnist-lenet":
        return Suite(name, "MNIST, DAFL Table 1 setting: LeNet-5 -> LeNet-5-half", OUT / "mnist_lenet5.safetensors",
                     "lenet5", "lenet5_half", "1x32x32", "mnist", ("mnist", 10_000), _MNIST_TEACHER,
                     ("mnist", "usps"), "dafl", "10m", digits=True, published=_DAFL_TABLE_1)
    if name == "mnist-bn":
        return Suite(name, "MNIST with a BatchNorm teacher: resnet8 -> LeNet-5-half",
                     ROOT / "dfkd_cli" / "demo" / "mnist_resnet8.safetensors", "resnet8", "lenet5_half", "1x32x32",
                     "mnist", ("mnist", 10_000), ["--dataset", "mnist", "--arch", "resnet8", "--epochs", "3"],
                     ("mnist",), "dafl", "5m", digits=True,
                     overrides={"deepinversion": _MNIST_PIXEL_OPT, "adi": _MNIST_PIXEL_OPT})
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
                     overrides={"deepinversion": _CPU_CIFAR_PIXEL_OPT, "adi": _CPU_CIFAR_PIXEL_OPT})
    raise SystemExit(f"unknown suite '{name}'; choose one of: {', '.join(SUITE_NAMES)}")


SUITE_NAMES = ("mnist-lenet", "mnist-bn", "cifar10", "demo")
DATA_NAMES = {"mnist": "MNIST", "usps": "USPS", "cifar10": "CIFAR-10"}
KD_TITLES = {"mnist": "KD on MNIST train images (upper bound)", "usps": "KD on USPS train images (alternative data)",
             "cifar10": "KD on CIFAR-10 train images (upper bound)"}
DEMO_ROWS = [("demo: deepinversion", ["--demo"]), ("demo settings, noise", ["--demo", "--recipe", "noise"])]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_inputs(suite: Suite) -> None:
    """Train the teacher and write the eval .npz when missing."""
    if not suite.teacher.is_file():
        cmd = [sys.executable, str(BENCH / "train_teacher.py"), *suite.train_teacher, "--out", str(suite.teacher)]
        log(f"training the teacher: {' '.join(cmd)}")
        subprocess.run(cmd, check=True, stdout=sys.stderr, cwd=ROOT)
    if not suite.eval_npz.is_file():
        dataset, n = suite.eval_data
        x, y = IMAGES[dataset]("test")
        save_eval_npz(suite.eval_npz, x[:n], y[:n])
        log(f"wrote {suite.eval_npz} ({len(x[:n])} {dataset} test images)")


def applicable_recipes(suite: Suite) -> list[str]:
    """What `dfkd inspect` says applies to the teacher, the noise baseline first."""
    proc = subprocess.run([str(DFKD), "inspect", *suite.teacher_args(), "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"dfkd inspect failed: {last_line(proc.stderr)}")
    recipes = json.loads(proc.stdout)["recipes"]
    return sorted(recipes, key=lambda r: r != "noise")


def overrides_for(suite: Suite, recipe: str, extra: list[str], train_only: bool = False) -> list[str]:
    """``-s`` values for a row: the suite's, then the command line's (``key=v`` or ``recipe:key=v``)."""
    items = suite.overrides.get("*", []) + suite.overrides.get(recipe, [])
    if suite.digits:  # digits are not mirror-symmetric
        mirror = not train_only and "flip" in synth_keys(recipe)
        items = ["train.flip=false"] + (["synth.flip=false"] if mirror else []) + items
    for item in extra:
        target, sep, rest = item.partition(":")
        if not sep or "=" in target:
            items.append(item)
        elif target == recipe:
            items.append(rest)
    if train_only:
        items = [item for item in items if item.startswith("train.")]
    return [arg for item in items for arg in ("-s", item)]


def synth_keys(recipe: str) -> set[str]:
    """The ``[synth]`` keys of a shipped recipe's synthesizer."""
    from dataclasses import fields

    from dfkd_cli.config import recipe_info
    from dfkd_cli.synth import synthesizer_class

    return {f.name for f in fields(synthesizer_class(recipe_info(recipe).synthesizer).Config)}


def compress_cmd(suite: Suite, recipe: str, budget: str, steps: int, extra: list[str], out: Path) -> list[str]:
    """`dfkd compress` for one recipe row."""
    return [str(DFKD), "compress", *suite.teacher_args(), "--student", suite.student,
           "--eval-data", str(suite.eval_npz), "--recipe", recipe, "--time-budget", budget, "--steps", str(steps),
           "--device", suite.device, "--out", str(out), "--overwrite", "--format", "json",
           *overrides_for(suite, recipe, extra)]


def kd_cmd(suite: Suite, data: str, budget: str, steps: int, extra: list[str], out: Path,
           train_from: str) -> list[str]:
    """bench/kd_baselines.py for one KD-on-real-images row."""
    return [sys.executable, str(BENCH / "kd_baselines.py"), *suite.teacher_args(), "--student", suite.student,
           "--data", data, "--eval-data", str(suite.eval_npz), "--train-from", train_from, "--time-budget", budget,
           "--steps", str(steps), "--device", suite.device, "--out", str(out),
           *overrides_for(suite, train_from, extra, train_only=True)]


def last_line(text: str) -> str:
    """The last non-empty line of a process's stderr: dfkd's one-line error."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


def run_row(name: str, cmd: list[str]) -> dict[str, Any]:
    """Run one row's process; its report as a table row, or a row holding its one-line error."""
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    try:
        report = json.loads(proc.stdout) if proc.returncode in (0, 1) else None
    except json.JSONDecodeError:
        report = None
    if report is None and proc.returncode < 0:
        row = error_row(name, f"killed by {signal.Signals(-proc.returncode).name}")
    elif report is None:
        row = error_row(name, f"exit {proc.returncode}: {last_line(proc.stderr)}")
    else:
        row = row_from_report(name, report)
    row["command"] = cmd
    row["process_s"] = round(time.monotonic() - started, 1)
    return row


def error_row(name: str, message: str) -> dict[str, Any]:
    """A row without numbers; ``message`` shows in its note."""
    return {"run": name, "student acc": None, "agreement (real)": None, "agreement (synthetic holdout)": None,
            "steps": None, "total s": None, "hardware": None, "note": message}


def row_from_report(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """The table's columns from a `dfkd compress` (or kd_baselines) report."""
    real, run_info = report.get("eval_data") or {}, report["run"]
    synthetic = (report.get("synthetic_holdout") or {}).get("top1_agreement")
    selection = run_info.get("selection")
    note = f"selected on {selection['n']} held-out train images" if selection else ""
    return {"run": name, "student acc": real.get("student_accuracy"), "agreement (real)": real.get("top1_agreement"),
            "agreement (synthetic holdout)": synthetic, "steps": run_info["steps"],
            "total s": run_info["wall_clock_s"]["total"], "hardware": run_info["hardware"], "note": note,
            "teacher acc": real.get("teacher_accuracy")}


def teacher_row(suite: Suite) -> dict[str, Any]:
    """The teacher's own accuracy on the eval data (the same code as dfkd's reports)."""
    from dfkd_cli.evaluate import load_eval_data, predict
    from dfkd_cli.teacher import load_teacher, parse_input_shape

    teacher = load_teacher(suite.teacher, suite.arch, parse_input_shape(suite.input_shape), normalize=suite.normalize)
    data = load_eval_data(suite.eval_npz, teacher.input_shape, teacher.mean, teacher.std, teacher.class_names)
    teacher.to(suite.device)
    accuracy = float((predict(teacher.model, data.x, device=suite.device).argmax(1) == data.y).float().mean())
    row = error_row(f"teacher: {suite.arch}", "")
    row.update({"student acc": accuracy, "agreement (real)": 1.0})
    return row


PERCENT_COLUMNS = ("teacher acc", "student acc", "agreement (real)", "agreement (synthetic holdout)")
TABLE_COLUMNS = ("run", "student acc", "agreement (real)", "agreement (synthetic holdout)", "steps", "total s",
                 "published", "hardware", "note")
PUBLISHED_HEADER = "published (GPU, far larger budgets)"


def cell(key: str, value: object) -> str:
    """One Markdown table cell: fractions as percentages, seconds rounded, pipes escaped."""
    if value is None or value == "":
        return "-" if key != "note" else ""
    if key in PERCENT_COLUMNS:
        return f"{100 * float(value):.2f}%"
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """Markdown table of ``rows`` (only the columns some row has; missing cells are "-")."""
    shown = [c for c in columns if any(c in row for row in rows)]
    header = [PUBLISHED_HEADER if c == "published" else c for c in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in shown) + " |" for row in rows]
    return "\n".join(lines)


def footer(suite: Suite, budget: str, steps: int) -> str:
    """What the numbers are, under the table."""
    dataset, n = suite.eval_data
    images = f"all {n:,}" if n == 10_000 else f"the first {n:,}"
    stop = f"the budget (--steps {steps:,} is never reached)" if steps == HUGE_STEPS else f"--steps {steps:,} or it"
    text = (f"Accuracy and agreement on {images} {DATA_NAMES[dataset]} test images (never used for selection). "
            f"Every row but the teacher's: `--time-budget {budget}` for distillation, ended by {stop}; \"total s\" "
            "is the row's whole wall clock (loading, distillation, export, evaluation) on the hardware named.")
    if suite.published:
        text += (" Published numbers come from the papers' own runs (a GPU and far larger budgets, and their own "
                 "teachers), shown for orientation, not measured here.")
    return text


def run_suite(suite: Suite, budget: str, steps: int, only: list[str] | None, extra: list[str],
              workdir: Path, kd_train_from: str) -> list[dict[str, Any]]:
    """Every row of ``suite`` (or only the named ones), in order: teacher, KD baselines, recipes."""
    ensure_inputs(suite)
    kd_names = [f"kd-{d}" for d in suite.kd_data]
    recipes = applicable_recipes(suite)
    valid = kd_names + recipes
    unknown = sorted(set(only or []) - set(valid))
    if unknown:
        raise SystemExit(f"{', '.join(unknown)}: not a row of {suite.name}; rows: {', '.join(valid)}")
    names = [n for n in valid if only is None or n in only]
    log(f"{suite.name}: rows {', '.join(valid)}; running {', '.join(names)} at --time-budget {budget} each "
        "(plus loading, export and evaluation)")
    rows = [teacher_row(suite)]
    for index, name in enumerate(names, 1):
        out = workdir / name
        if name in kd_names:
            data = name.removeprefix("kd-")
            cmd, title = kd_cmd(suite, data, budget, steps, extra, out, kd_train_from), KD_TITLES[data]
        else:
            cmd, title = compress_cmd(suite, name, budget, steps, extra, out), name
        log(f"[{index}/{len(names)}] {title}: {' '.join(cmd)}")
        row = run_row(title, cmd)
        if suite.published:
            row["published"] = suite.published.get(name)
        done = f"{cell('student acc', row['student acc'])} in {row['process_s']} s"
        log(f"[{index}/{len(names)}] {title}: " + (done if row["student acc"] is not None else row["note"]))
        rows.append(row)
    return rows


def run_demo(workdir: Path) -> list[dict[str, Any]]:
    """The bundled demo (`dfkd compress --demo`) and the same settings with the noise baseline."""
    rows = []
    for name, args in DEMO_ROWS:
        log(f"{name} ...")
        cmd = [str(DFKD), "compress", *args, "--out", str(workdir / name.replace(" ", "_").replace(":", "")),
               "--overwrite", "--format", "json"]
        rows.append(run_row(name, cmd))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=SUITE_NAMES)
    parser.add_argument("--gpu", action="store_true",
                        help="cifar10 only: resnet34 -> resnet18 on CUDA with the papers' synthesis settings")
    parser.add_argument("--budget", help="--time-budget of every row (default: the suite's, e.g. 10m)")
    parser.add_argument("--steps", type=int, help=f"--steps of every row (default {HUGE_STEPS:,}: budget-bound)")
    parser.add_argument("--recipes", help="comma-separated rows to run, e.g. noise,dafl,kd-mnist (default: all)")
    parser.add_argument("--set", action="append", default=[], dest="extra",
                        help="override for every row (train.lr=0.01) or one recipe (dafl:train.lr=0.01)")
    parser.add_argument("--kd-train-from", help="recipe whose [train] table the KD rows use (default: the suite's)")
    parser.add_argument("--json", type=Path, help="also write the rows (with each row's command) to this file")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.gpu and args.suite != "cifar10":
        parser.error("--gpu applies to the cifar10 suite only")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        if args.suite == "demo":
            rows, heading, note, meta = run_demo(workdir), "demo: bundled resnet8 MNIST teacher -> lenet5_half", "", {}
        else:
            suite = make_suite(args.suite, args.gpu)
            budget = args.budget or suite.budget
            steps = args.steps if args.steps is not None else suite.steps
            only = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else None
            train_from = args.kd_train_from or suite.kd_train_from
            rows = run_suite(suite, budget, steps, only, args.extra, workdir, train_from)
            heading = f"{suite.title} ({suite.name}, --time-budget {budget} per row)"
            note, meta = footer(suite, budget, steps), {"budget": budget, "steps": steps, "device": suite.device,
                                                        "eval_data": str(suite.eval_npz), "teacher": str(suite.teacher)}
    print(f"**{heading}**\n\n{table(rows)}\n" + (f"\n{note}\n" if note else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": args.suite, "gpu": args.gpu, "title": heading, **meta,
                                         "footnote": note, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
