"""The gap to real data: dfkd's default path against KD on the teacher's real training images, at equal budgets.

    python bench/gap.py                                   # cifar10 suite, budgets 10m and 30m (about 85 min on a CPU)
    python bench/gap.py --budgets 90s --teacher T.safetensors --device cuda --json bench/out/gap.json
    python bench/gap.py --smoke                           # toy scale: MNIST LeNet-5, 20 s, 1,000 test images
    python bench/gap.py --budgets 10m --seeds 0-4 -s train.mixup=1.0   # a variant over five seeds, KD once

A single CPU run of the default path moves by several points with the seed and the machine's speed
(the budget's clock takes part in the schedule), so --seeds runs it once per seed (KD once per
budget) and adds a row with the mean, its ratio to KD and the spread; -s passes settings to the
default path only, to measure a variant against the same KD row.

For each budget B, two processes (run_bench.py's rows, same student, same real test images):

- the default path: `dfkd compress TEACHER --arch A --student S --time-budget B` with no --recipe
  (the policy picks the recipe, or races several), where B bounds the whole run;
- KD on the real training images of the teacher's data set (bench/kd_baselines.py, labels never
  used): the suite's KD trainer (cifar10: the deepinversion recipe's [train] table, SGD with a cosine
  schedule that follows the budget, random crops with 4 pixels of padding and flips; MNIST suites:
  their KD rows' settings, no flips), trained for B (loading and evaluation come on top).

The table: each side's agreement with the teacher and accuracy on the real test images, the ratio of
the agreements (default / KD: how much of what real data gives the default path recovers), student
samples/s (default path: report.json run.throughput.student_samples_per_s; KD: steps x batch size /
its distillation seconds, as kd_baselines reports them) and peak memory (report.json
run.peak_memory_mb over all stages; kd_baselines reports none). It needs ../shared/data beside the
checkout. Teachers and eval files are those of run_bench.py's suites (made in bench/out/ on first use,
or $DFKD_BENCH_OUT); --teacher replaces the suite's teacher (same architecture).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as bench_data  # noqa: E402
from measures import peak_memory, samples_per_s  # noqa: E402
from run_bench import DFKD, ensure_inputs, kd_cmd, log, run_row, table  # noqa: E402
from suites import HUGE_STEPS, Suite, make_suite  # noqa: E402

from dfkd_cli.errors import DfkdError  # noqa: E402
from dfkd_cli.runtime import parse_duration  # noqa: E402

SUITES = ("cifar10", "mnist-bn", "mnist-lenet")
SMOKE = {"suite": "mnist-lenet", "budgets": "20s", "eval_images": 1_000}
DEFAULT, KD = "default path", "KD on real images"
COLUMNS = ("budget", "seed", "default recipe", "default agreement", "default acc", "KD agreement", "KD acc",
           "agreement default / KD", "default samples/s", "KD samples/s", "default peak MiB", "KD peak MiB",
           "hardware", "note")


def gap_suite(name: str, teacher: Path | None, device: str, eval_images: int | None) -> Suite:
    """run_bench's suite ``name`` with ``teacher`` (if given), ``device`` and the first ``eval_images`` test images."""
    suite = make_suite(name)
    if teacher is not None:
        if not teacher.is_file():
            raise DfkdError(f"--teacher {teacher} does not exist; give a {suite.arch} .safetensors file")
        suite = dataclasses.replace(suite, teacher=teacher.resolve())
    dataset, n = suite.eval_data
    return dataclasses.replace(suite, device=device, prior=None, eval_data=(dataset, eval_images or n),
                               train_teacher=[*suite.train_teacher, "--device", device])


def check_data(suite: Suite, root: Path) -> None:
    """Refuse early when the real images the gap needs are not in ``root`` (../shared/data)."""
    folder = root / suite.eval_data[0]
    if not folder.is_dir():
        raise DfkdError(f"{folder} is missing: gap.py needs the real {suite.eval_data[0]} images in "
                        "../shared/data beside the checkout")


def default_cmd(suite: Suite, budget: str, out: Path, seed: int = 0, settings: tuple[str, ...] = ()) -> list[str]:
    """The default path: `dfkd compress` with no --recipe and no --steps, ``budget`` for the whole run,
    at ``seed``, with ``-s`` for each of ``settings``."""
    return [str(DFKD), "compress", *suite.teacher_args(), "--student", suite.student, "--eval-data",
            str(suite.eval_npz), "--time-budget", budget, "--device", suite.device, "--out", str(out),
            "--overwrite", "--format", "json", "--seed", str(seed), *(arg for setting in settings for arg in ("-s", setting))]


def parse_seeds(text: str) -> list[int]:
    """``"0-2,7"`` -> ``[0, 1, 2, 7]``; ValueError when a part is not a seed or a range of them."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(text)
    return seeds


def read_report(out: Path) -> dict[str, Any] | None:
    """A run's report.json, or None when the run wrote none."""
    path = out / "report.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def agreement_ratio(default: float | None, kd: float | None) -> float | None:
    """Default path's agreement over KD's: 1.0 means real data buys nothing; None without both."""
    if default is None or kd is None or kd <= 0:
        return None
    return default / kd


def gap_row(budget: str, default: dict[str, Any], kd: dict[str, Any],
            default_report: dict[str, Any] | None, kd_report: dict[str, Any] | None) -> dict[str, Any]:
    """One budget's numbers from both sides' run_row rows and reports (None where a side failed)."""
    recipe = ((default_report or {}).get("run") or {}).get("recipe")
    notes = [f"{name}: {row['note']}" for name, row in ((DEFAULT, default), (KD, kd)) if row["student acc"] is None]
    return {"budget": budget, "seed": None, "default recipe": recipe,
            "default agreement": default["agreement (real)"], "default acc": default["student acc"],
            "KD agreement": kd["agreement (real)"], "KD acc": kd["student acc"],
            "agreement default / KD": agreement_ratio(default["agreement (real)"], kd["agreement (real)"]),
            "default samples/s": samples_per_s(default_report), "KD samples/s": samples_per_s(kd_report),
            "default peak MiB": peak_memory(default_report), "KD peak MiB": peak_memory(kd_report),
            "hardware": default["hardware"] or kd["hardware"], "note": "; ".join(notes),
            "default total s": default["total s"], "KD total s": kd["total s"]}


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over one budget's seeds: each side's agreement and accuracy, the ratio of the mean
    agreement to KD's, and the default path's range and standard deviation (in points) as a note."""
    done = [row for row in rows if row["default agreement"] is not None]
    mean = {key: statistics.fmean(r[key] for r in done) if done else None
            for key in ("default agreement", "default acc", "default samples/s")
            if all(r[key] is not None for r in done)}
    agreements = [100 * row["default agreement"] for row in done]
    spread = (f"{len(done)} of {len(rows)} seeds: range {min(agreements):.2f}-{max(agreements):.2f}%, "
              f"sd {statistics.stdev(agreements):.2f} points" if len(done) > 1 else f"{len(done)} of {len(rows)} seeds")
    first = rows[0]
    return {**first, "seed": "mean", **mean, "default peak MiB": None, "default total s": None,
            "agreement default / KD": agreement_ratio(mean.get("default agreement"), first["KD agreement"]),
            "note": spread}


def shown(row: dict[str, Any]) -> dict[str, str]:
    """A gap row's cells as text: fractions as percentages, the ratio as 0.00x, rates rounded."""
    def text(key: str, value: Any) -> str:
        if value is None or value == "":
            return "" if key == "note" else "-"
        if key.endswith(("agreement", "acc")):
            return f"{100 * value:.2f}%"
        if key == "agreement default / KD":
            return f"{value:.3f}x"
        if key.endswith("samples/s"):
            return f"{value:,.0f}"
        return str(value)
    return {key: text(key, row.get(key)) for key in COLUMNS}


def gap_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the gap rows."""
    return table([shown(row) for row in rows], COLUMNS)


def run_side(name: str, cmd: list[str], out: Path, budget: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One process of the gap: its run_row row and its report (None when it failed)."""
    log(f"{budget} {name}: {' '.join(cmd)}")
    row = run_row(name, cmd)
    agreement = row["agreement (real)"]
    log(f"{budget} {name}: {f'agreement {100 * agreement:.2f}%' if agreement is not None else row['note']} "
        f"in {row['process_s']} s")
    return row, read_report(out) if row["student acc"] is not None else None


def run_budget(suite: Suite, budget: str, workdir: Path, seeds: Sequence[int] = (0,),
               settings: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """KD once and the default path at each seed, one process after another; with several seeds a
    last row holds their mean."""
    kd, kd_report = run_side(KD, kd_cmd(suite, suite.eval_data[0], budget, HUGE_STEPS, [], workdir / "kd",
                                        suite.kd_train_from), workdir / "kd", budget)
    rows = []
    for seed in seeds:
        out = workdir / f"default-{seed}"
        default, report = run_side(f"{DEFAULT} (seed {seed})", default_cmd(suite, budget, out, seed, settings), out, budget)
        rows.append({**gap_row(budget, default, kd, report, kd_report), "seed": seed})
    return rows + [mean_row(rows)] if len(rows) > 1 else rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", help="comma-separated --time-budget values (default 10m,30m; --smoke: 20s)")
    parser.add_argument("--suite", choices=SUITES, help="teacher, student and data (default cifar10; --smoke: mnist-lenet)")
    parser.add_argument("--teacher", type=Path, help="use this teacher file instead of the suite's (same --arch)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    parser.add_argument("--eval-images", type=int, help="the first N real test images (default: the suite's)")
    parser.add_argument("--seeds", default="0", help="the default path's seeds, e.g. 0-4 or 0,3 (default 0); KD runs once")
    parser.add_argument("-s", "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the default path only (repeatable), as dfkd compress -s takes it")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true", help="toy scale: MNIST LeNet-5, 20 s, 1,000 test images")
    args = parser.parse_args(argv)
    if args.smoke:
        args.suite, args.budgets = args.suite or SMOKE["suite"], args.budgets or SMOKE["budgets"]
        args.eval_images = args.eval_images or SMOKE["eval_images"]
    args.suite, args.budgets = args.suite or "cifar10", [b.strip() for b in (args.budgets or "10m,30m").split(",")]
    for budget in args.budgets:
        try:
            if parse_duration(budget) <= 0:
                raise ValueError
        except (ValueError, DfkdError):
            parser.error(f"--budgets: '{budget}' is not a duration such as 90s, 10m or 1h")
    try:
        args.seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds: '{args.seeds}' is not a list of seeds such as 0-4 or 0,3")
    if args.eval_images is not None and (args.eval_images < 1000 or args.eval_images % 1000):
        parser.error("--eval-images must be a multiple of 1000 (the eval file is named by thousands)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        suite = gap_suite(args.suite, args.teacher, args.device, args.eval_images)
        check_data(suite, bench_data.SHARED_DATA)
    except DfkdError as err:
        print(f"error: {err.message}", file=sys.stderr)
        raise SystemExit(2) from None
    ensure_inputs(suite)
    with tempfile.TemporaryDirectory(prefix="dfkd-gap-") as tmp:
        rows = [row for budget in args.budgets
                for row in run_budget(suite, budget, Path(tmp) / budget, args.seeds, tuple(args.settings))]
    heading = f"**The gap to real data: {suite.title}, default path against KD on real images ({suite.name})**"
    note = (f"Agreement and accuracy on the first {suite.eval_data[1]:,} {suite.eval_data[0]} test images. The default "
            f"path's budget bounds its whole run; KD trains for the budget ({suite.kd_train_from} recipe's [train] "
            "table, schedule following the budget) with loading and evaluation on top. Peak MiB: the highest over "
            "the run's stages." + (f" Default path settings: {', '.join(args.settings)}." if args.settings else ""))
    print(f"{heading}\n\n{gap_table(rows)}\n\n{note}\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"suite": suite.name, "teacher": str(suite.teacher), "device": suite.device,
                                         "eval_images": suite.eval_data[1], "seeds": args.seeds,
                                         "settings": args.settings, "rows": rows, "footnote": note},
                                        indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
