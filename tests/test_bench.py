"""The benchmark's own helpers: USPS parsing, eval files, KD-on-real-data rows, overrides and the table."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import quadrant_task
from dfkd_cli.config import load_recipe
from dfkd_cli.errors import DfkdError
from dfkd_cli.eval_data import load_eval_data
from dfkd_cli.race import race_entrants

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import data as bench_data  # noqa: E402
import gap  # noqa: E402
import kd_baselines  # noqa: E402
import run_bench  # noqa: E402
import throughput  # noqa: E402
import train_teacher  # noqa: E402


def write_usps(path: Path, rows: list[tuple[int, np.ndarray]]) -> None:
    lines = [" ".join([f"{label:.4f}", *(f"{v:.4f}" for v in pixels.ravel())]) + " " for label, pixels in rows]
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")


def test_usps_parser_reads_labels_and_row_major_pixels(tmp_path):
    ramp = np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16)
    write_usps(tmp_path / "zip.gz", [(7, ramp), (0, -np.ones((16, 16), np.float32))])
    pixels, labels = bench_data.read_usps(tmp_path / "zip.gz")
    assert labels.tolist() == [7, 0] and labels.dtype == np.int64
    assert pixels.shape == (2, 16, 16)
    np.testing.assert_allclose(pixels[0], ramp, atol=1e-4)  # v1..v16 is the first row


def test_usps_pixels_map_to_uint8_and_resize_bilinearly():
    flat = np.stack([-np.ones((16, 16)), np.ones((16, 16)), np.zeros((16, 16))]).astype(np.float32)
    x = bench_data.usps_to_uint8(flat)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.uint8
    assert x[0].unique().tolist() == [0] and x[1].unique().tolist() == [255]  # -1 is the black background
    assert x[2].unique().tolist() == [128]
    edge = np.full((16, 16), -1, np.float32)
    edge[:, 8:] = 1
    row = bench_data.usps_to_uint8(edge[None])[0, 0, 0].tolist()
    assert row[:14] == [0] * 14 and row[-14:] == [255] * 14 and 0 < row[15] < 255  # interpolated, not nearest


def test_usps_parser_rejects_lines_of_the_wrong_length(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wt") as handle:
        handle.write("3 " + " ".join(["0"] * 100) + "\n")
    with pytest.raises(ValueError, match="257 numbers"):
        bench_data.read_usps(tmp_path / "bad.gz")


@pytest.mark.skipif(not (bench_data.SHARED_DATA / "usps").is_dir(), reason="../shared/data/usps is absent")
def test_real_usps_test_split_has_its_published_class_counts():
    x, y = bench_data.load_usps("test")
    assert x.shape == (2007, 1, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]  # zip.info.txt
    assert x.float().mean() > 20 and int(x.max()) == 255


def test_eval_npz_is_read_back_by_dfkd_unchanged(tmp_path):
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 3, 9, 1, 2])
    bench_data.save_eval_npz(tmp_path / "e.npz", x, y)
    data = load_eval_data(tmp_path / "e.npz", (1, 8, 8), [0.5], [0.25])
    torch.testing.assert_close(data.x, (x.float() / 255 - 0.5) / 0.25)
    assert data.y.tolist() == y.tolist()


@pytest.mark.slow
def test_kd_baseline_distils_on_real_images_and_reports_like_dfkd(tiny_teacher, tmp_path, monkeypatch):
    def quadrants(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = quadrant_task(1200, seed=5)
        return (x * 255).round().to(torch.uint8), y

    monkeypatch.setitem(kd_baselines.IMAGES, "quadrants", quadrants)
    args = kd_baselines.parse_args([
        str(tiny_teacher["path"]), *tiny_teacher["args"], "--student", "resnet8", "--data", "quadrants",
        "--eval-data", str(tiny_teacher["eval"]), "--train-from", "noise", "--steps", "30", "--out", str(tmp_path),
        "-s", "train.batch_size=32", "-s", "train.holdout=64", "-s", "train.eval_every=10",
        "-s", "train.optimizer=adam", "-s", "train.lr=0.003", "-s", "train.temperature=4.0"])
    report = kd_baselines.run(args)
    assert report["run"]["steps"] == 30 and report["run"]["recipe"] == "kd-quadrants"
    assert report["run"]["selection"]["n"] == 64
    assert report["eval_data"]["student_accuracy"] > 0.8  # chance is 0.25
    assert (tmp_path / "student.safetensors").is_file() and (tmp_path / "report.json").is_file()
    assert set(report["run"]["wall_clock_s"]) == {"load", "distill", "evaluate", "total"}


def test_train_teacher_learns_a_labelled_data_set(monkeypatch):
    def quadrants(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = quadrant_task(640 if split == "train" else 200, seed=7 if split == "train" else 8)
        return (x * 255).round().to(torch.uint8), y

    monkeypatch.setitem(train_teacher.LOADERS, "quadrants", (quadrants, "mnist"))
    model, accuracy = train_teacher.train("quadrants", "resnet8", epochs=2, batch_size=32, lr=0.05, seed=0,
                                          crop_pad=1, device=torch.device("cpu"))
    assert accuracy > 0.9 and not model.training  # chance is 0.25


def test_kd_holdout_is_disjoint_from_training_images():
    x = torch.arange(100).view(100, 1, 1, 1)
    train, held = kd_baselines.split_holdout(x, 10, seed=0)
    assert len(train) == 90 and len(held) == 10
    assert not set(held.flatten().tolist()) & set(train.flatten().tolist())
    batch = next(kd_baselines.batches(train, 32, seed=0))
    assert batch.shape == (32, 1, 1, 1) and set(batch.flatten().tolist()) <= set(train.flatten().tolist())
    with pytest.raises(DfkdError, match="train.holdout"):
        kd_baselines.split_holdout(x, 100, seed=0)
    with pytest.raises(DfkdError, match="train.batch_size"):
        next(kd_baselines.batches(train, 91, seed=0))


def test_overrides_reach_every_row_or_only_their_recipe():
    suite = run_bench.make_suite("mnist-bn")
    extra = ["train.lr=0.01", "dafl:train.steps=5", "synth.lr=0.2"]
    di = run_bench.overrides_for(suite, "deepinversion", extra)
    assert di[:4] == ["-s", "train.flip=false", "-s", "synth.flip=false"] and "synth.iterations=200" in di
    assert "train.lr=0.01" in di and "train.steps=5" not in di
    dafl = run_bench.overrides_for(suite, "dafl", extra, train_only=True)
    assert dafl == ["-s", "train.flip=false", "-s", "train.lr=0.01", "-s", "train.steps=5"]


def test_every_row_of_a_suite_gets_the_same_budget_and_huge_steps(tmp_path):
    suite = run_bench.make_suite("mnist-lenet")
    cmds = [run_bench.compress_cmd(suite, "noise", "20s", 1000, [], tmp_path),
            run_bench.kd_cmd(suite, "usps", "20s", 1000, [], tmp_path, "dafl")]
    for cmd in cmds:
        assert cmd[cmd.index("--time-budget") + 1] == "20s" and cmd[cmd.index("--steps") + 1] == "1000"
        assert cmd[cmd.index("--eval-data") + 1].endswith("mnist_test10k.npz")
    assert "--recipe" in cmds[0] and cmds[0][cmds[0].index("--format") + 1] == "json"
    gpu = run_bench.make_suite("cifar10", gpu=True)
    cmd = run_bench.compress_cmd(gpu, "cmi", "1h", gpu.steps, [], tmp_path)
    assert cmd[cmd.index("--steps") + 1] == str(run_bench.HUGE_STEPS) and cmd[cmd.index("--device") + 1] == "cuda"
    assert "synth.iterations=200" in cmd  # the paper's, not the recipe file's CPU-sized setting
    assert cmd[cmd.index("--arch") + 1] == "cifar_resnet34" and cmd[cmd.index("--student") + 1] == "cifar_resnet18"


@pytest.mark.parametrize("name,gpu", [("mnist-lenet", False), ("mnist-bn", False), ("cifar10", False),
                                      ("cifar10", True), ("mnist-update", False), ("cifar-split", False)])
def test_suite_overrides_are_valid_settings_of_the_shipped_recipes(name, gpu):
    suite = run_bench.make_suite(name, gpu)
    for recipe in sorted(set(suite.overrides) - {"*"} | {"noise", "prior-kd"}):
        items = run_bench.overrides_for(suite, recipe, [])[1::2]
        load_recipe(recipe, items)  # raises DfkdError on an unknown key or a wrong type
    for recipe, settings in suite.variants.values():
        overrides, flags = run_bench.split_settings(settings)
        assert all(not item.startswith("-s") for item in flags)
        for name in race_entrants(False) if recipe == "auto" else [recipe]:
            load_recipe(name, run_bench.overrides_for(suite, recipe, overrides)[1::2])
    assert suite.teacher.name.endswith(".safetensors") and suite.eval_npz.parent == run_bench.OUT


def test_table_shows_percentages_and_a_failed_row_keeps_its_error():
    report = {"eval_data": {"student_accuracy": 0.98123, "top1_agreement": 0.99, "teacher_accuracy": 0.993},
              "synthetic_holdout": {"top1_agreement": 0.5}, "run": {"steps": 120, "hardware": "CPU: x (2 threads)",
                                                                    "wall_clock_s": {"total": 61.4}}}
    rows = [run_bench.row_from_report("dafl", report), run_bench.error_row("zskt", "exit 2: error: bad | setting")]
    rows[0]["published"] = "98.20% (DAFL)"
    lines = run_bench.table(rows).splitlines()
    assert lines[0].startswith("| run | student acc |") and run_bench.PUBLISHED_HEADER in lines[0]
    assert "| dafl | 98.12% | 99.00% | 50.00% | 120 | 61 | 98.20% (DAFL) | CPU: x (2 threads) |  |" == lines[2]
    assert lines[3].startswith("| zskt | - | - | - | - | - | - | - |") and "bad \\| setting" in lines[3]
    assert len({line.count(" | ") for line in lines if not line.startswith("|---")}) == 1


def test_rows_show_student_samples_per_second_and_peak_memory_beside_the_accuracy():
    run = {"steps": 120, "hardware": "CPU", "wall_clock_s": {"total": 61.4, "distill": 50.0}}
    dfkd = {"eval_data": {"student_accuracy": 0.9, "top1_agreement": 0.91},
            "run": {**run, "throughput": {"student_samples_per_s": 1234.4},
                    "peak_memory_mb": {"load": {"rss": 900.0}, "distill": {"rss": 1100.4, "cuda_allocated": 512.0}}}}
    kd = {"eval_data": {"student_accuracy": 0.95, "top1_agreement": 0.96}, "run": {**run, "train": {"batch_size": 64}}}
    lines = run_bench.table([run_bench.row_from_report("fast", dfkd), run_bench.row_from_report("KD", kd)]).splitlines()
    assert lines[0] == ("| run | student acc | agreement (real) | agreement (synthetic holdout) | steps | student samples/s "
                        "| peak MiB | total s | hardware | note |")
    assert lines[2] == "| fast | 90.00% | 91.00% | - | 120 | 1,234 | CUDA 512 / RSS 1,100 | 61 | CPU |  |"
    assert lines[3] == "| KD | 95.00% | 96.00% | - | 120 | 154 | - | 61 | CPU |  |"  # 120 x 64 / 50 s


def test_run_row_turns_a_failing_process_into_an_error_row():
    row = run_bench.run_row("broken", [sys.executable, "-c", "import sys; sys.exit('error: no such teacher')"])
    assert row["student acc"] is None and row["note"] == "exit 1: error: no such teacher"
    killed = run_bench.run_row("killed", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert killed["note"] == "killed by SIGTERM"


def test_kd_like_baselines_train_like_the_kd_rows_and_prior_recipes_get_the_prior(tmp_path):
    suite = run_bench.make_suite("mnist-lenet")
    noise = run_bench.overrides_for(suite, "noise", [])[1::2]
    dafl_train = load_recipe("dafl").train
    assert 'train.optimizer="adam"' in noise and f"train.lr={dafl_train.lr}" in noise
    assert load_recipe("noise", noise).train.optimizer == dafl_train.optimizer
    avkd = run_bench.compress_cmd(suite, "avkd", "1m", 10, [], tmp_path)
    assert avkd[avkd.index("--prior") + 1].endswith("usps_train_unlabelled.npz")
    assert "--prior" not in run_bench.compress_cmd(suite, "dfad", "1m", 10, [], tmp_path)


def test_the_default_row_runs_without_steps_as_a_user_runs_it(tmp_path):
    suite = run_bench.make_suite("mnist-lenet")
    assert "--steps" not in run_bench.compress_cmd(suite, "auto", "1m", run_bench.HUGE_STEPS, [], tmp_path)
    assert "--steps" in run_bench.compress_cmd(suite, "auto", "1m", 10, [], tmp_path)  # the bench was given --steps
    assert "--steps" in run_bench.compress_cmd(suite, "dfad", "1m", run_bench.HUGE_STEPS, [], tmp_path)


def test_variant_rows_carry_their_settings_and_a_split_suite_separates_classes():
    update = run_bench.make_suite("mnist-update")
    recipe, settings = update.variants["dafl+lra"]
    assert recipe == "dafl" and load_recipe("dafl", settings).train.update == "lra"
    assert update.variants["dfad"] == ("dfad", ['train.update="plain"'])
    split = run_bench.make_suite("cifar-split")
    assert "classes01234" in split.eval_npz.name and "other_than" in split.prior_npz.name
    x, y = torch.arange(10).view(10, 1), torch.tensor([0, 5, 1, 6, 2, 7, 3, 8, 4, 9])
    kept, labels = bench_data.class_subset(x, y, (5, 1))
    assert kept.flatten().tolist() == [1, 2] and labels.tolist() == [0, 1]


def test_update_merges_rerun_rows_into_an_earlier_table():
    earlier = [{"run": "teacher"}, {"run": "noise", "v": 1}, {"run": "dafl", "v": 1}]
    merged = run_bench.merge_rows(earlier, [{"run": "teacher"}, {"run": "dafl", "v": 2}, {"run": "avkd", "v": 2}])
    assert [(r["run"], r.get("v")) for r in merged] == [("teacher", None), ("noise", 1), ("dafl", 2), ("avkd", 2)]


def test_variant_flags_reach_the_command_line_and_rows_show_int8(tmp_path):
    assert run_bench.split_settings(['train.lr=0.1', "--quantize", "int8"]) == (["train.lr=0.1"], ["--quantize", "int8"])
    report = {"eval_data": {"student_accuracy": 0.9, "top1_agreement": 0.91},
              "int8": {"eval_data": {"int8_top1_agreement": 0.905}, "latency_ms": {"fp32": 0.5, "int8": 0.25}},
              "run": {"steps": 10, "hardware": "CPU", "wall_clock_s": {"total": 3.0}, "race": {"winner": "dfad"}}}
    row = run_bench.row_from_report("auto (race)", report)
    assert row[run_bench.INT8] == 0.905 and row["note"] == "race winner: dfad"
    assert "90.50%" in run_bench.table([row]) and "0.5 / 0.25" in run_bench.table([row])


def test_throughput_png_pool_round_trips_and_rows_show_dfkd_over_reference(tmp_path):
    from types import SimpleNamespace

    from dfkd_cli.runtime import Budget

    for channels in (1, 3):
        teacher = SimpleNamespace(input_shape=(channels, 4, 4), mean=(0.5, 0.4, 0.3)[:channels],
                                  std=(0.2, 0.25, 0.3)[:channels])
        mean, std = torch.tensor(teacher.mean).view(-1, 1, 1), torch.tensor(teacher.std).view(-1, 1, 1)
        x = (torch.rand(3, channels, 4, 4) - mean) / std
        folder = tmp_path / str(channels)
        folder.mkdir()
        throughput.save_pngs(x, folder, teacher.mean, teacher.std, first=5)
        data = throughput.PngFolder(folder, teacher)
        assert [p.name for p in data.files] == ["5.png", "6.png", "7.png"]
        back = torch.stack([data[i] for i in range(len(data))])  # read back normalised, as the reference trains
        assert back.shape == x.shape and float((back - x).abs().max()) <= 1.01 / (255 * min(teacher.std))
    dfkd = throughput.Measured("dfkd", made=200, synthesis_s=2.0, trained=400, student_s=1.0, steps=4, wall_s=4.0,
                               agreement=0.5, reached_s=3.31)
    reference = throughput.Measured("reference", made=100, synthesis_s=2.0, trained=200, student_s=1.0, steps=2,
                                    wall_s=4.0, agreement=0.4)
    lines = run_bench.table(throughput.rows_for("dfad", {"dfkd": dfkd, "reference": reference}),
                            throughput.COLUMNS).splitlines()
    assert lines[2] == "| dfad | dfkd | 100 | 400 | 100 | 4 | 50.00% | 3.3 |"
    assert lines[3].endswith("| 2 | 40.00% | not reached |")
    assert lines[4] == "| dfad | dfkd / reference | 2.00x | 2.00x | 2.00x | - | - | - |"
    student, points = torch.nn.Linear(2, 3), torch.randn(8, 2)
    budget = Budget(100.0)
    probe = throughput.Probe(points, throughput.predict_classes(student, points), 0.9, 50, budget)
    began = budget.start
    probe.check(student, 49)
    assert probe.reached_s is None and budget.start == began  # checks every 50 steps only
    probe.check(student, 50)
    assert probe.reached_s is not None and budget.start > began  # reached, and the clock paused for it


def test_gap_table_shows_both_sides_their_ratio_and_a_failed_side():
    def side(agreement, acc, note=""):
        return {"agreement (real)": agreement, "student acc": acc, "hardware": "CPU: x", "total s": 30.0, "note": note}

    report = {"run": {"recipe": "dfad", "throughput": {"student_samples_per_s": 1234.4},
                      "peak_memory_mb": {"load": {"rss": 900.0, "cuda_allocated": None},
                                         "distill": {"rss": 1100.4, "cuda_allocated": 512.0}}}}
    kd_report = {"run": {"steps": 100, "train": {"batch_size": 64}, "wall_clock_s": {"distill": 4.0}}}
    row = gap.gap_row("10m", side(0.45, 0.44), side(0.9, 0.88), report, kd_report)
    assert row["agreement default / KD"] == pytest.approx(0.5) and row["KD samples/s"] == pytest.approx(1600)
    failed = gap.gap_row("30m", side(None, None, "exit 2: error: bad"), side(0.9, 0.88), None, kd_report)
    lines = gap.gap_table([row, failed]).splitlines()
    assert lines[0].startswith("| budget | seed | default recipe | default agreement |")
    assert lines[2] == ("| 10m | - | dfad | 45.00% | 44.00% | 90.00% | 88.00% | 0.500x | 1,234 | 1,600 | CUDA 512 / RSS 1,100 "
                        "| - | CPU: x |  |")
    assert lines[3].startswith("| 30m | - | - | - | - | 90.00% | 88.00% | - |") and "default path: exit 2: error: bad" in lines[3]
    assert gap.agreement_ratio(0.5, 0.0) is None and gap.agreement_ratio(None, 0.9) is None


def test_gap_over_seeds_reports_the_mean_its_ratio_and_the_spread(tmp_path):
    def row(seed, agreement):
        default = {"agreement (real)": agreement, "student acc": agreement and agreement - 0.05, "hardware": "x",
                   "total s": 1.0, "note": ""}
        return {**gap.gap_row("10m", default,
                              {"agreement (real)": 0.9, "student acc": 0.85, "hardware": "x", "total s": 1.0, "note": ""},
                              {"run": {"throughput": {"student_samples_per_s": 1000.0 + 10 * seed**2}}}, None), "seed": seed}

    # Skewed values, so that a median or a population sd would not pass; seed 3 failed and is left out.
    mean = gap.mean_row([row(0, 0.70), row(1, 0.71), row(2, 0.84), row(3, None)])
    assert mean["seed"] == "mean" and mean["default agreement"] == pytest.approx(0.75)
    assert mean["agreement default / KD"] == pytest.approx(0.75 / 0.9) and mean["default samples/s"] == pytest.approx(3050 / 3)
    assert mean["note"] == "3 of 4 seeds: range 70.00-84.00%, sd 7.81 points"
    assert gap.gap_table([mean]).splitlines()[2].startswith("| 10m | mean | - | 75.00% | 70.00% | 90.00% | 85.00% | 0.833x |")
    assert gap.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("x", "1,1", "-1", ""):
        with pytest.raises(ValueError):
            gap.parse_seeds(bad)
    cmd = gap.default_cmd(gap.gap_suite("mnist-lenet", None, "cpu", 1000), "20s", tmp_path, 3, ("train.mixup=1.0",))
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd[-2:] == ["-s", "train.mixup=1.0"]


def test_gap_arguments_smoke_defaults_and_refusals(tmp_path, capsys):
    args = gap.parse_args([])
    assert args.suite == "cifar10" and args.budgets == ["10m", "30m"] and args.eval_images is None and args.seeds == [0]
    assert gap.parse_args(["--seeds", "0-4", "-s", "train.mixup=1.0"]).settings == ["train.mixup=1.0"]
    with pytest.raises(SystemExit):
        gap.parse_args(["--seeds", "a"])
    smoke = gap.parse_args(["--smoke"])
    assert (smoke.suite, smoke.budgets, smoke.eval_images) == ("mnist-lenet", ["20s"], 1000)
    with pytest.raises(SystemExit):
        gap.parse_args(["--budgets", "10m,soon"])
    suite = gap.gap_suite("mnist-lenet", None, "cuda", 1000)
    assert suite.eval_npz.name == "mnist_test1k.npz" and suite.prior is None and suite.device == "cuda"
    cmd = gap.default_cmd(suite, "20s", tmp_path)
    assert "--recipe" not in cmd and "--steps" not in cmd and cmd[cmd.index("--time-budget") + 1] == "20s"
    with pytest.raises(DfkdError, match="shared/data"):
        gap.check_data(suite, tmp_path)
    (tmp_path / "mnist").mkdir()
    gap.check_data(suite, tmp_path)  # present: no error


def test_gap_refuses_a_missing_data_folder_or_teacher_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gap.bench_data, "SHARED_DATA", tmp_path / "no-data")
    cases = ((["--smoke"], "no-data/mnist is missing"),
             (["--smoke", "--teacher", str(tmp_path / "t.safetensors")], "--teacher"))
    for argv, says in cases:
        with pytest.raises(SystemExit) as exit_info:
            gap.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written before the refusal
