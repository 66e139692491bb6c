"""Benchmarks on real data: every recipe run as a user would, at equal wall-clock cost, in a Markdown table.

Reproduce every table (from the repository root, with the virtual environment's python; teachers
and eval files are made in bench/out/ on first use, so the first run of a suite also trains its
teacher):

    python bench/run_bench.py mnist-lenet --json bench/out/mnist-lenet.json   # DAFL Table 1 setting, 10m/row
    python bench/run_bench.py mnist-bn    --json bench/out/mnist-bn.json      # BN teacher: BN-prior recipes, 5m/row
    python bench/run_bench.py cifar10     --json bench/out/cifar10.json       # resnet20 -> resnet8 on CPU, 5m/row
    python bench/run_bench.py cifar10 --gpu --json bench/out/cifar10-gpu.json # resnet34 -> resnet18 on a GPU
    python bench/run_bench.py mnist-update --json bench/out/mnist-update.json # dfad, dafl x plain/replay/lra, 5m/row
    python bench/run_bench.py cifar-split --json bench/out/cifar-split.json   # AVKD's class split, 5m/row
    python bench/run_bench.py demo                                            # the bundled demo vs noise

Expected duration: rows x (budget + about 20-40 s of loading, export and evaluation on 2 CPU cores):
mnist-lenet 9 rows (kd-mnist, kd-usps and the 7 recipes without BatchNorm, avkd and prior-kd with
USPS as --prior) about 95 min; mnist-update 6 rows about 35 min; cifar-split 5 rows (noise,
prior-kd, avkd, dafl, dfad) about 30 min plus its teacher's training; mnist-bn and
cifar10 11 rows (kd and all 10 recipes) about 60-65 min each; cifar10 --gpu 11 rows at 1h, about
11-12 h plus the teacher's training (60 epochs, minutes on a recent GPU). It needs ../shared/data
beside the checkout (the CIFAR-10 training set is 141 MB). Run one suite at a time on an idle machine:
the numbers are wall-clock, so other load on the CPU lowers every row's step count.

    --budget 20s --recipes noise,dafl   a short check of a few rows (row names: kd-DATA and recipe names;
                                        a suite lists its rows on stderr when it starts)
    --set train.lr=0.01                 an override for every row; --set dafl:train.lr=0.01 for one recipe
    --keep DIR                          keep every row's run folder (default: a temporary folder)
    --json F --update                   re-run some rows (--recipes) into an earlier table in F: rows of the
                                        same name are replaced, new ones added

Teachers (trained by bench/train_teacher.py when missing; the exact arguments are in make_suite):
MNIST LeNet-5 (no BatchNorm, `--epochs 5 --lr 0.05`), the bundled demo resnet8 (BatchNorm, 99.07%),
CIFAR-10 resnet20 (`--epochs 10 --crop-pad 4 --flip`; for cifar-split on classes 0-4 only) and, for
--gpu only, CIFAR-10 cifar_resnet34.

Every row but the teacher's is one process: `dfkd compress TEACHER ... --recipe R --time-budget B
--steps S --format json` for a recipe (the recipes that apply are asked of `dfkd inspect`), or
bench/kd_baselines.py for KD on real images (same student, trainer and budget; the trainer settings
are those of the suite's `kd_train_from` recipe). All rows of a suite get the same --time-budget,
and --steps is so large that the budget is what ends each run, except the default row (`--recipe
auto`), which runs as a user runs it: no --steps, so the policy's recipe's own steps may end it
before the budget. On a CPU, recipes run with their
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkd_cli.config import prior_recipes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import IMAGES, class_subset, save_eval_npz  # noqa: E402
from measures import peak_memory, samples_per_s  # noqa: E402
from suites import BENCH, DATA_NAMES, HUGE_STEPS, KD_TITLES, OUT, ROOT, SUITE_NAMES, Suite, make_suite  # noqa: E402,F401

DFKD = Path(sys.executable).parent / "dfkd"


DEMO_ROWS = [("demo: default path", ["--demo"]), ("demo settings, noise", ["--demo", "--recipe", "noise"])]


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
        if suite.classes:
            x, y = class_subset(x, y, suite.classes)
        save_eval_npz(suite.eval_npz, x[:n], y[:n])
        log(f"wrote {suite.eval_npz} ({len(x[:n])} {dataset} test images)")
    if suite.prior_npz and not suite.prior_npz.is_file():
        x, y = IMAGES[suite.prior]("train")
        if suite.classes:
            x = x[~torch.isin(y, torch.tensor(suite.classes))]
        np.savez(suite.prior_npz, x=x.numpy())
        log(f"wrote {suite.prior_npz} ({len(x)} {suite.prior} train images, no labels)")


def applicable_recipes(suite: Suite) -> list[str]:
    """What `dfkd inspect` says applies to the teacher, the noise baseline first."""
    proc = subprocess.run([str(DFKD), "inspect", *suite.teacher_args(), "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"dfkd inspect failed: {last_line(proc.stderr)}")
    recipes = json.loads(proc.stdout)["recipes"]
    if suite.prior is None:
        recipes = [r for r in recipes if r not in prior_recipes()]
    return sorted(recipes, key=lambda r: r != "noise")


def overrides_for(suite: Suite, recipe: str, extra: list[str], train_only: bool = False) -> list[str]:
    """``-s`` values for a row: the suite's, then the command line's (``key=v`` or ``recipe:key=v``)."""
    items = suite.overrides.get("*", []) + suite.overrides.get(recipe, [])
    if recipe in suite.kd_like and not train_only:
        items = kd_trainer(suite.kd_train_from) + items
    if suite.digits:  # digits are not mirror-symmetric
        mirror = not train_only and recipe != "auto" and "flip" in synth_keys(recipe)
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


def kd_trainer(recipe: str) -> list[str]:
    """The optimiser settings of ``recipe``'s [train] table, as overrides."""
    from dfkd_cli.config import load_recipe

    train = load_recipe(recipe).train
    keys = ("optimizer", "lr", "momentum", "weight_decay", "schedule", "loss", "temperature")
    return [f"train.{key}={json.dumps(getattr(train, key))}" for key in keys]


def synth_keys(recipe: str) -> set[str]:
    """The ``[synth]`` keys of a shipped recipe's synthesizer."""
    from dataclasses import fields

    from dfkd_cli.config import recipe_info
    from dfkd_cli.synth import synthesizer_class

    return {f.name for f in fields(synthesizer_class(recipe_info(recipe).synthesizer).Config)}


def split_settings(settings: list[str]) -> tuple[list[str], list[str]]:
    """A variant's settings as (-s overrides, dfkd compress flags): flags start at the first "--" item."""
    first = next((i for i, item in enumerate(settings) if item.startswith("--")), len(settings))
    return settings[:first], settings[first:]


def compress_cmd(suite: Suite, recipe: str, budget: str, steps: int, extra: list[str], out: Path) -> list[str]:
    """`dfkd compress` for one recipe row. The default row (``auto``) runs as a user runs it, without
    --steps (its recipe's steps or the budget end it), unless the bench was given --steps."""
    as_user = recipe == "auto" and steps == HUGE_STEPS
    return [str(DFKD), "compress", *suite.teacher_args(), "--student", suite.student,
           "--eval-data", str(suite.eval_npz), "--recipe", recipe, "--time-budget", budget,
           *([] if as_user else ["--steps", str(steps)]),
           "--device", suite.device, "--out", str(out), "--overwrite", "--format", "json",
           *(["--prior", str(suite.prior_npz)] if suite.prior_npz and recipe in prior_recipes() else []),
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


def run_row(name: str, cmd: list[str], show_stability: bool = False) -> dict[str, Any]:
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
        if show_stability and report["run"].get("stability"):
            curve = report["run"]["stability"]
            row[STABILITY] = f"{curve['mean']:.2f}% / {curve['variance']:.2f} / {curve['max']:.2f}%"
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
    row = {"run": name, "student acc": real.get("student_accuracy"), "agreement (real)": real.get("top1_agreement"),
            "agreement (synthetic holdout)": synthetic, "steps": run_info["steps"],
            "total s": run_info["wall_clock_s"]["total"], "hardware": run_info["hardware"], "note": note,
            "teacher acc": real.get("teacher_accuracy")}
    speed, memory = samples_per_s(report), peak_memory(report)
    row.update({key: value for key, value in ((SPEED, speed), (MEMORY, memory)) if value is not None})
    if run_info.get("race"):
        row["note"] = f"race winner: {run_info['race']['winner']}"
    int8 = report.get("int8")
    if int8 and int8.get("eval_data"):
        row[INT8] = int8["eval_data"]["int8_top1_agreement"]
        row[LATENCY] = f"{int8['latency_ms']['fp32']:.3g} / {int8['latency_ms']['int8']:.3g}"
    return row


def teacher_row(suite: Suite) -> dict[str, Any]:
    """The teacher's own accuracy on the eval data (the same code as dfkd's reports)."""
    from dfkd_cli.evaluate import predict
    from dfkd_cli.eval_data import load_eval_data
    from dfkd_cli.teacher import load_teacher, parse_input_shape

    teacher = load_teacher(suite.teacher, suite.arch, parse_input_shape(suite.input_shape), normalize=suite.normalize)
    data = load_eval_data(suite.eval_npz, teacher.input_shape, teacher.mean, teacher.std, teacher.class_names)
    teacher.to(suite.device)
    accuracy = float((predict(teacher.model, data.x, device=suite.device).argmax(1) == data.y).float().mean())
    row = error_row(f"teacher: {suite.arch}", "")
    row.update({"student acc": accuracy, "agreement (real)": 1.0})
    return row


PERCENT_COLUMNS = ("teacher acc", "student acc", "agreement (real)", "agreement (synthetic holdout)",
                   "int8 agreement (real)")
STABILITY = "synthetic agreement along the run (mean / variance / max)"
INT8 = "int8 agreement (real)"
LATENCY = "ONNX latency ms fp32 / int8"
SPEED, MEMORY = "student samples/s", "peak MiB"
TABLE_COLUMNS = ("run", "student acc", "agreement (real)", INT8, LATENCY, "agreement (synthetic holdout)", STABILITY,
                 "steps", SPEED, MEMORY, "total s", "published", "hardware", "note")
PUBLISHED_HEADER = "published (GPU, far larger budgets)"


def cell(key: str, value: object) -> str:
    """One Markdown table cell: fractions as percentages, seconds rounded, pipes escaped."""
    if value is None or value == "":
        return "-" if key != "note" else ""
    if key in PERCENT_COLUMNS:
        return f"{100 * float(value):.2f}%"
    if key == SPEED and isinstance(value, float):
        return f"{value:,.0f}"
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
    stop = (f"the budget (--steps {steps:,} is never reached; the default row runs without --steps, as a user "
            "runs it)") if steps == HUGE_STEPS else f"--steps {steps:,} or it"
    which = f" of classes {', '.join(map(str, suite.classes))}" if suite.classes else ""
    text = (f"Accuracy and agreement on {images} {DATA_NAMES[dataset]} test images{which} (never used for selection). "
            f"Every row but the teacher's: `--time-budget {budget}` (for a dfkd row the whole run, export included; "
            f"for a KD row its training), ended by {stop}; \"total s\" "
            "is the row's whole wall clock (loading, distillation, export, evaluation) on the hardware named.")
    kd_like = [name for name in suite.kd_like if (suite.prior or name != "prior-kd")
               and (not suite.only_variants or name in suite.variants)]
    verb = "train" if len(kd_like) > 1 else "trains"
    if kd_like:
        text += (f" {' and '.join(kd_like)} {verb} with the optimiser settings of the {suite.kd_train_from} recipe "
                 f"(those of the KD rows), so {'they differ' if len(kd_like) > 1 else 'it differs'} from KD on real "
                 f"images in {'their' if len(kd_like) > 1 else 'its'} inputs only.")
    if suite.prior:
        others = " of the other classes" if suite.classes else ""
        text += f" avkd and prior-kd get the {DATA_NAMES[suite.prior]} training images{others}, without labels, as --prior."
    if suite.published:
        text += (" Published numbers come from the papers' own runs (a GPU and far larger budgets, and their own "
                 "teachers), shown for orientation, not measured here.")
    return text


def run_suite(suite: Suite, budget: str, steps: int, only: list[str] | None, extra: list[str],
              workdir: Path, kd_train_from: str) -> list[dict[str, Any]]:
    """Every row of ``suite`` (or only the named ones), in order: teacher, KD baselines, recipes."""
    ensure_inputs(suite)
    kd_names = [f"kd-{d}" for d in suite.kd_data]
    recipes = [] if suite.only_variants else applicable_recipes(suite)
    valid = kd_names + recipes + list(suite.variants)
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
        elif name in suite.variants:
            recipe, settings = suite.variants[name]
            overrides, flags = split_settings(settings)
            cmd, title = compress_cmd(suite, recipe, budget, steps, [*overrides, *extra], out) + flags, name
        else:
            cmd, title = compress_cmd(suite, name, budget, steps, extra, out), name
        log(f"[{index}/{len(names)}] {title}: {' '.join(cmd)}")
        row = run_row(title, cmd, suite.show_stability)
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


def merge_rows(earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``earlier`` with each row of ``new`` in place of the row of the same name, or appended."""
    fresh = {row["run"]: row for row in new}
    merged = [fresh.pop(row["run"], row) for row in earlier]
    return merged + [row for row in new if row["run"] in fresh]


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
    parser.add_argument("--update", action="store_true",
                        help="with --json: merge these rows into the rows already in that file (same name: replaced)")
    args = parser.parse_args(argv)
    if args.gpu and args.suite != "cifar10":
        parser.error("--gpu applies to the cifar10 suite only")
    if args.update and not (args.json and args.json.is_file()):
        parser.error("--update needs --json naming an earlier run's file")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        if args.suite == "demo":
            rows, heading, note, meta = run_demo(workdir), "demo: bundled LeNet-5 MNIST teacher -> lenet5_half", "", {}
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
    if args.update:
        rows = merge_rows(json.loads(args.json.read_text(encoding="utf-8"))["rows"], rows)
    print(f"**{heading}**\n\n{table(rows)}\n" + (f"\n{note}\n" if note else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": args.suite, "gpu": args.gpu, "title": heading, **meta,
                                         "footnote": note, "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
