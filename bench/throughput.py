"""Throughput: dfkd's distillation loop against the same algorithm run the way research code runs it.

Reproduce (from the repository root, with the virtual environment's python; the teachers and test
files in bench/out/ are those of run_bench.py's mnist-lenet and cifar10 suites, made by their first run):

    python bench/throughput.py --suite all --json bench/out/throughput.json        # 60 s per loop
    python bench/throughput.py --suite mnist --recipes dfad,dafl,zskt --target 0.9
    python bench/throughput.py --suite cifar10 --recipes dfad,fast,cmi --target 0.5
    OMP_NUM_THREADS=1 python bench/throughput.py --suite mnist --recipes dfad --budget 5s --nproc-budget 5s
    python bench/throughput.py --suite all --recipes dfad,fast --nproc 0 --precision bf16   # dfkd in bf16

Duration: suites x recipes x 2 loops x --budget (plus set-up and the real-data checks, which the
clock leaves out), plus the --nproc section: two `dfkd compress` runs of --nproc-budget plus loading,
export and evaluation (20-40 s each on 2 CPU cores). The numbers are wall clock: run it on an idle
machine. CPU only (dfkd's meter does not synchronise CUDA).

Each recipe runs twice, one loop at a time (dfkd first for the 1st, 3rd, ... recipe, the reference
first for the others), with the same settings (the recipe file with the bench suite's overrides;
train.steps so large that the budget ends each loop and the cosine schedules follow the clock) and
the same seed, so both loops start from the same student and generator:

- dfkd: ``dfkd_cli.distill`` ``Run`` + ``start`` + ``train`` as ``dfkd compress`` runs them (held-out
  synthetic samples and selection included; no checkpoints, export or report); the run's
  ``Throughput`` meter splits its time between synthesis and student steps.
- reference: dfkd's synthesizer class, trainer settings, schedule and KD loss with research code's
  plumbing: the teacher's forward in the student step with autograd on (its logits detached in the
  loss, as DAFL's and DFAD's code do) and its weights left requires_grad=True (so the synthesizer's
  backward passes compute teacher weight gradients too); generator, teacher and student in contiguous
  NCHW, fp32; for pool recipes (fast, cmi, deepinversion: BatchNorm teachers only) every synthesized
  batch is written as PNG files (de-normalised to uint8) and each round the student's batches come
  from a new torch DataLoader over the folder (PIL, ToTensor, Normalize), as Fast-Datafree and CMI do
  (--workers: its worker processes, 0 by default; their scripts use 4). No held-out samples.

The --nproc section (--nproc 0 skips it) runs `dfkd compress` (MNIST teacher, dfad) with 1 and with
--nproc processes, --nproc-budget each, and compares their throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dfkd_cli.config import RecipeConfig, load_recipe
from dfkd_cli.distill import Run, start, train, wire
from dfkd_cli.eval_data import load_eval_data
from dfkd_cli.precision import Precision, channels_last
from dfkd_cli.runtime import Budget, Display, hardware_description, parse_duration, seed_everything
from dfkd_cli.synth import StudentView, SynthContext, Synthesizer, synthesizer_class
from dfkd_cli.teacher import Teacher, build_student, load_teacher, parse_input_shape
from dfkd_cli.trainer import StudentTrainer, augment, kd_loss, predict_classes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import compress_cmd, last_line, log, overrides_for, table  # noqa: E402
from suites import HUGE_STEPS, ROOT, Suite, make_suite  # noqa: E402

CPU = torch.device("cpu")
SUITES = {"mnist": "mnist-lenet", "cifar10": "cifar10"}
DEFAULT_RECIPES = {"mnist": "dfad,dafl", "cifar10": "dfad,fast"}
DEFAULT_TARGETS = {"mnist": 0.9, "cifar10": 0.5}
SYN, STU, TOT = "synthetic samples/s", "student samples/s", "total samples/s"
COLUMNS = ("recipe", "loop", SYN, STU, TOT, "student steps", "agreement (real)", "s to target")
NPROC_COLUMNS = ("processes", "student steps", STU, SYN, TOT, "distill s", "identical students", "hardware", "note")


@dataclass
class Measured:
    """One loop's counts and seconds (synthesis includes sampling; the reference's, PNG writes and loads)."""

    loop: str
    made: int = 0
    synthesis_s: float = 0.0
    trained: int = 0
    student_s: float = 0.0
    steps: int = 0
    wall_s: float = 0.0
    agreement: float = 0.0
    reached_s: float | None = None  # wall clock to the target agreement on real data; None: not reached

    def rates(self) -> dict[str, float]:
        return {SYN: rate(self.made, self.synthesis_s), STU: rate(self.trained, self.student_s),
                TOT: rate(self.trained, self.wall_s)}


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a > 0 and b > 0 else "-"


def agreement(student: nn.Module, x: torch.Tensor, teacher_classes: torch.Tensor) -> float:
    return float((predict_classes(student, x) == teacher_classes).float().mean())


@dataclass
class Probe:
    """Agreement on the real test images every ``every`` student steps until ``target`` is reached:
    measurement only (nothing is selected or stopped on it); the budget's clock is paused meanwhile."""

    x: torch.Tensor
    teacher_classes: torch.Tensor
    target: float
    every: int
    budget: Budget
    reached_s: float | None = None

    def check(self, student: nn.Module, steps: int) -> None:
        if self.reached_s is not None or steps % self.every:
            return
        began, at = time.monotonic(), self.budget.elapsed
        if agreement(student, self.x, self.teacher_classes) >= self.target:
            self.reached_s = at
        self.budget.start += time.monotonic() - began  # pause the clock for the check

    def after_step(self, run: Run, loss: float) -> None:  # all dfkd_cli.distill.train calls of a StepWatch
        self.check(run.trainer.student, run.trainer.steps_done)


def save_pngs(x: torch.Tensor, folder: Path, mean: tuple[float, ...], std: tuple[float, ...], first: int) -> None:
    """De-normalise ``x`` to uint8 and write one PNG per sample (Fast-Datafree's save_image_batch)."""
    shape = (-1, 1, 1)
    pixels = x.detach().cpu() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    pixels = pixels.clamp(0, 1).mul(255).to(torch.uint8)  # truncated, as numpy's astype("uint8") there
    for index, image in enumerate(pixels):
        array = image[0].numpy() if len(image) == 1 else image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{first + index}.png")


class PngFolder(Dataset):
    """Every PNG in a folder, listed anew, read with PIL and normalised (Fast-Datafree's UnlabeledImageDataset)."""

    def __init__(self, folder: Path, teacher: Teacher) -> None:
        self.files = sorted(folder.glob("*.png"))
        self.mode = "L" if teacher.input_shape[0] == 1 else "RGB"
        self.transform = T.Compose([T.ToTensor(), T.Normalize(list(teacher.mean), list(teacher.std))])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert(self.mode))


class PngPool:
    """A pool recipe's data as research code keeps it: each new batch written to disk, and a new
    shuffled DataLoader over the whole folder after every synthesis round."""

    def __init__(self, synth: Synthesizer, folder: Path, teacher: Teacher, batch_size: int, workers: int) -> None:
        self.synth, self.folder, self.teacher = synth, folder, teacher
        self.batch_size, self.workers, self.saved = batch_size, workers, 0
        self.loader: DataLoader | None = None
        self.batches: Iterator[torch.Tensor] = iter(())

    def synthesize(self) -> int:
        self.synth.pool.clear()  # scratch only: the reference trains on what is on disk
        self.synth.synthesize()
        x = self.synth.pool.tensor()
        save_pngs(x, self.folder, self.teacher.mean, self.teacher.std, self.saved)
        self.saved += len(x)
        dataset = PngFolder(self.folder, self.teacher)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.workers)
        self.batches = iter(self.loader)
        return len(x)

    def sample(self) -> torch.Tensor:
        try:
            return next(self.batches)
        except StopIteration:  # the folder's epoch is done: start another (Fast-Datafree's DataIter)
            assert self.loader is not None
            self.batches = iter(self.loader)
            return next(self.batches)


def reference_step(trainer: StudentTrainer, teacher: nn.Module, x: torch.Tensor) -> None:
    """One KD step as research code writes it: the teacher's forward with autograd on, its outputs
    detached in the loss; the trainer's optimizer, schedule, augmentation and attention settings."""
    cfg, attention = trainer.cfg, trainer.attention
    x = augment(x, cfg.crop_pad, cfg.flip)
    for group in trainer.optimizer.param_groups:
        group["lr"] = trainer._lr_at(trainer.steps_done)  # the trainer's own schedule
    with attention.teacher_outputs() as teacher_blocks:
        teacher_logits = teacher(x)
    with attention.student_outputs() as student_blocks:
        student_logits = trainer.student(x)
    loss = kd_loss(student_logits, teacher_logits.detach(), cfg.loss, cfg.temperature)
    if attention.active:
        teacher_blocks.outputs = [o.detach() for o in teacher_blocks.outputs]
        extra = attention.loss(student_blocks, teacher_blocks)
        loss = loss if extra is None else loss + extra
    trainer.optimizer.zero_grad()
    loss.backward()
    trainer.optimizer.step()
    trainer.steps_done += 1


@dataclass
class Bench:
    """One suite: its teacher, student and real test images, and the loops' shared settings."""

    suite: Suite
    x: torch.Tensor
    teacher_classes: torch.Tensor
    target: float
    eval_every: int
    seed: int
    extra: list[str]
    precision: str = "fp32"  # dfkd's loop only; the reference is fp32

    def teacher(self) -> Teacher:
        s = self.suite
        return load_teacher(s.teacher, s.arch, parse_input_shape(s.input_shape), normalize=s.normalize)

    def recipe(self, name: str) -> RecipeConfig:
        return load_recipe(name, [*overrides_for(self.suite, name, self.extra)[1::2], f"train.steps={HUGE_STEPS}"])

    def build(self, name: str, teacher: Teacher) -> tuple[RecipeConfig, Synthesizer, StudentTrainer]:
        """Student, synthesizer and trainer in the pipeline's order, from the same seed."""
        recipe = self.recipe(name)
        seed_everything(self.seed)
        student = build_student(self.suite.student, teacher)
        context = SynthContext(teacher, CPU, student=StudentView(student))  # the trainer trains this module
        synth = synthesizer_class(recipe.recipe.synthesizer)(context, recipe.synth, recipe.loss)
        trainer = StudentTrainer(student, teacher.model, recipe.train, CPU, input_shape=teacher.input_shape,
                                 precision=Precision(self.precision, CPU))
        return recipe, synth, trainer

    def probe(self, budget: Budget) -> Probe:
        return Probe(self.x, self.teacher_classes, self.target, self.eval_every, budget)

    def finish(self, measured: Measured, student: nn.Module, budget: Budget, probe: Probe) -> Measured:
        measured.wall_s, measured.reached_s = budget.elapsed, probe.reached_s
        measured.agreement = agreement(student, self.x, self.teacher_classes)
        return measured


def run_dfkd(bench: Bench, name: str, seconds: float) -> Measured:
    """dfkd's own loop: start (held-out samples) and train, for ``seconds`` of wall clock."""
    teacher = bench.teacher()
    if bench.recipe(name).train.channels_last:
        channels_last(teacher.model)  # as the pipeline does
    recipe, synth, trainer = bench.build(name, teacher)
    run, budget = Run(name, recipe, synth, trainer, autocast=Precision(bench.precision, CPU).autocast), Budget(seconds)
    probe = bench.probe(budget)
    start(run, budget, Display())
    train(run, budget, Display(), HUGE_STEPS, probe)
    meter = run.meter
    measured = Measured("dfkd", meter.made, meter.synthesis_s, meter.trained, meter.student_s, trainer.steps_done)
    return bench.finish(measured, trainer.student, budget, probe)


def run_reference(bench: Bench, name: str, seconds: float, folder: Path, workers: int) -> Measured:
    """The research-code loop: the same rounds of synthesis and student steps, with naive plumbing."""
    teacher = bench.teacher()
    teacher.model.requires_grad_(True).to(memory_format=torch.contiguous_format)  # as a naive script leaves it
    recipe, synth, trainer = bench.build(name, teacher)
    trainer.student.to(memory_format=torch.contiguous_format)
    generator = synth.generator_module()
    if generator is not None:  # dfkd's Generator is channels_last
        generator.to(memory_format=torch.contiguous_format)
    cfg, budget = recipe.train, Budget(seconds)
    wire(Run(name, recipe, synth, trainer), budget)
    folder.mkdir(parents=True, exist_ok=True)
    pool = None if synth.capabilities.online else PngPool(synth, folder, teacher, cfg.batch_size, workers)
    probe, measured, round_left = bench.probe(budget), Measured("reference"), 0
    while not budget.expired():
        began = time.perf_counter()
        if round_left <= 0:
            if pool is None:
                synth.synthesize()  # an online recipe's generator update; its batches count when sampled
            else:
                measured.made += pool.synthesize()
            round_left = cfg.steps_per_round
        x = synth.sample(cfg.batch_size) if pool is None else pool.sample()
        measured.made += 0 if synth.capabilities.keeps_pool else len(x)  # online recipes make every batch fresh
        sampled = time.perf_counter()
        reference_step(trainer, teacher.model, x)
        measured.synthesis_s += sampled - began
        measured.student_s += time.perf_counter() - sampled
        measured.trained += len(x)
        round_left -= 1
        probe.check(trainer.student, trainer.steps_done)
    measured.steps = trainer.steps_done
    return bench.finish(measured, trainer.student, budget, probe)


def rows_for(name: str, results: dict[str, Measured]) -> list[dict[str, Any]]:
    """Table rows of one recipe: dfkd, the reference, and dfkd / reference for the samples/s columns."""
    rows = []
    for m in (results["dfkd"], results["reference"]):
        reached = f"{m.reached_s:.1f}" if m.reached_s is not None else "not reached"
        rows.append({"recipe": name, "loop": m.loop, **m.rates(), "student steps": m.steps,
                     "agreement (real)": m.agreement, "s to target": reached})
    ours, theirs = results["dfkd"].rates(), results["reference"].rates()
    rows.append({"recipe": name, "loop": "dfkd / reference", **{k: ratio(ours[k], theirs[k]) for k in ours}})
    return rows


def make_bench(key: str, target: float | None, eval_every: int, seed: int, extra: list[str],
               precision: str = "fp32") -> Bench:
    """The suite's teacher's classes on its real test images (existing files of bench/out/)."""
    suite = make_suite(SUITES[key])
    missing = [str(p) for p in (suite.teacher, suite.eval_npz) if not p.is_file()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing: `python bench/run_bench.py {suite.name}` makes them")
    teacher = load_teacher(suite.teacher, suite.arch, parse_input_shape(suite.input_shape), normalize=suite.normalize)
    data = load_eval_data(suite.eval_npz, teacher.input_shape, teacher.mean, teacher.std, teacher.class_names)
    return Bench(suite, data.x, predict_classes(teacher.model, data.x),
                 DEFAULT_TARGETS[key] if target is None else target, eval_every, seed, extra, precision)


def run_suite(bench: Bench, recipes: list[str], seconds: float, workdir: Path,
              workers: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Both loops of every recipe that applies to the teacher, alternating which goes first: the
    table's rows and every loop's raw measurements."""
    has_bn, rows, measured = bench.teacher().has_bn, [], []
    for index, name in enumerate(recipes):
        if synthesizer_class(load_recipe(name).recipe.synthesizer).capabilities.requires_bn and not has_bn:
            log(f"{bench.suite.name} {name}: skipped, it needs a BatchNorm teacher and {bench.suite.arch} has none")
            continue
        results: dict[str, Measured] = {}
        for loop in ("dfkd", "reference") if index % 2 == 0 else ("reference", "dfkd"):
            log(f"{bench.suite.name} {name}: {loop} loop for {seconds:g} s")
            results[loop] = (run_dfkd(bench, name, seconds) if loop == "dfkd"
                             else run_reference(bench, name, seconds, workdir / f"{bench.suite.name}-{name}", workers))
            rates = ", ".join(f"{value:.0f} {key}" for key, value in results[loop].rates().items())
            log(f"{bench.suite.name} {name}: {loop}: {results[loop].steps} student steps, {rates}")
        rows += rows_for(name, results)
        measured += [{"recipe": name, **asdict(m)} for m in results.values()]
    return rows, measured


def nproc_rows(nproc: int, budget: str, workdir: Path) -> list[dict[str, Any]]:
    """`dfkd compress` (MNIST LeNet-5 teacher, dfad) with 1 and with ``nproc`` processes, and their ratio."""
    suite, rows = make_suite("mnist-lenet"), []
    for count in (1, nproc):
        cmd = compress_cmd(suite, "dfad", budget, HUGE_STEPS, [], workdir / f"nproc{count}")
        cmd += ["--nproc", str(count)] if count > 1 else []
        log(f"--nproc section, {count} process(es): {' '.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode not in (0, 1):
            rows.append({"processes": count, "note": f"exit {proc.returncode}: {last_line(proc.stderr)}"})
            continue
        run = json.loads(proc.stdout)["run"]
        meter, processes, distill_s = run["throughput"], run.get("processes") or {}, run["wall_clock_s"]["distill"]
        size = processes.get("count", 1)  # the ranks step in lockstep, each on its own batch
        rows.append({"processes": size, "student steps": run["steps"], STU: size * meter["student_samples_per_s"],
                     SYN: size * meter["synthetic_samples_per_s"],
                     TOT: rate(size * meter["student_samples"], distill_s),
                     "distill s": distill_s, "identical students": processes.get("identical_students"),
                     "hardware": run["hardware"]})
    if all(STU in row for row in rows):
        rows.append({"processes": f"{nproc} / 1", **{k: ratio(rows[1][k], rows[0][k]) for k in (STU, SYN, TOT)}})
    return rows


def footer(bench: Bench, seconds: float, workers: int) -> str:
    return (f"Each loop: {seconds:g} s of wall clock, one loop at a time, on {hardware_description(CPU)}, "
            f"{torch.get_num_threads()} torch threads, dfkd's loop in {bench.precision}, the reference in fp32. synthetic samples/s: new synthetic inputs / seconds in "
            "synthesis (synthesize() and sample(); for the reference also writing and loading PNGs); student "
            "samples/s: inputs trained on / seconds in student steps; total samples/s: inputs trained on / the loop's "
            "wall clock (dfkd's includes making its held-out synthetic samples, which the reference does not make). "
            f"agreement (real): the last weights (no held-out selection) against the teacher on {len(bench.x):,} real "
            f"test images. s to target: wall clock until the student first agrees with the teacher on "
            f"{100 * bench.target:.0f}% of them, checked every {bench.eval_every} student steps: measurement only, "
            "never used to select or stop, and the clock is paused while it runs. Reference: the same synthesizer, "
            "trainer settings and KD loss, with the teacher's forward under autograd (requires_grad weights), "
            f"contiguous NCHW, and for pool recipes PNG files read by a new DataLoader each round ({workers} workers).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=[*SUITES, "all", "none"], default="all", help="none: the --nproc section only")
    parser.add_argument("--recipes", help=f"comma-separated recipes (default: {DEFAULT_RECIPES})")
    parser.add_argument("--budget", default="60s", help="wall clock of each loop (default 60s)")
    parser.add_argument("--target", type=float, help=f"agreement for 's to target' (default: {DEFAULT_TARGETS})")
    parser.add_argument("--eval-every", type=int, default=50, help="student steps between real-data checks")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference's PNG pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], dest="extra",
                        help="override for both loops (train.lr=0.01) or one recipe (dfad:train.lr=0.01)")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the --nproc section (0: skip it)")
    parser.add_argument("--nproc-budget", help="--time-budget of the --nproc section's runs (default: --budget)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="autocast of dfkd's loop (the reference stays fp32); bf16 pays off on CPUs with AVX512-BF16 or AMX")
    parser.add_argument("--json", type=Path, help="also write the rows and raw measurements to this file")
    args = parser.parse_args(argv)
    if args.eval_every < 1 or args.workers < 0 or args.nproc == 1 or args.nproc < 0:
        parser.error("--eval-every must be >= 1, --workers >= 0, --nproc 0 (skip) or >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seconds = parse_duration(args.budget)
    out: dict[str, Any] = {"budget_s": seconds, "hardware": hardware_description(CPU),
                           "torch_threads": torch.get_num_threads(), "suites": []}
    with tempfile.TemporaryDirectory(prefix="dfkd-throughput-") as tmp:
        for key in {"all": list(SUITES), "none": []}.get(args.suite, [args.suite]):
            bench = make_bench(key, args.target, args.eval_every, args.seed, args.extra, args.precision)
            recipes = [r.strip() for r in (args.recipes or DEFAULT_RECIPES[key]).split(",") if r.strip()]
            rows, measured = run_suite(bench, recipes, seconds, Path(tmp), args.workers)
            heading = (f"**{bench.suite.title}: dfkd against the research-code loop ({seconds:g} s per loop; "
                       f"s to target: {100 * bench.target:.0f}% agreement)**")
            note = footer(bench, seconds, args.workers)
            print(f"{heading}\n\n{table(rows, COLUMNS)}\n\n{note}\n", flush=True)
            out["suites"].append({"suite": bench.suite.name, "target": bench.target, "title": heading,
                                  "footnote": note, "rows": rows, "measured": measured})
        if args.nproc:
            budget = args.nproc_budget or args.budget
            rows = nproc_rows(args.nproc, budget, Path(tmp))
            note = (f"`dfkd compress` of the MNIST LeNet-5 teacher with dfad, --time-budget {budget}, with 1 and "
                    f"{args.nproc} processes; samples/s summed over the processes (each trains its own batch, in "
                    "lockstep); distill s: the distillation stage's wall clock; hardware: each process's threads. "
                    f"This machine has {os.cpu_count()} CPU cores: on a 2-core machine two processes share the cores "
                    "that one process already uses, so they cannot be faster there.")
            print(f"**--nproc: 1 against {args.nproc} processes**\n\n{table(rows, NPROC_COLUMNS)}\n\n{note}\n")
            out["nproc"] = {"budget": budget, "rows": rows, "footnote": note}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
