"""Validate before work, one validation for every source, numbers that say what happened (issue #17).

Every bad value, from a flag, a run's config.toml, a student's metadata, an ``.npz`` file, a
synthetic set or a teacher checkpoint, is refused with one ``error:`` line, exit 2, no traceback and
nothing written, before any synthesis starts. A student loss that explodes rolls the run back like a
non-finite one, and the ONNX parity gate blames a broken student on training, not on itself. The
property tests feed random [run] tables, student metadata and ``-s`` items to the parsers: each
either parses into sane values or raises DfkdError.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import kit
from dfkd_cli.archs import create_model
from dfkd_cli.config import build_recipe, parse_override, read_toml, recipe_path
from dfkd_cli.errors import DfkdError, ExportError
from dfkd_cli.export import StudentMeta, export_onnx
from dfkd_cli.runconfig import _RUN_KEYS, resolve_compress
from dfkd_cli.synth.base import Synthesizer
from dfkd_cli.synthetic_set import save_synthetic_set
from dfkd_cli.teacher import load_teacher

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECONDS = 10.0  # every refusal comes while loading inputs: a teacher load and a few file reads
TINY = ["--arch", "resnet8", "--input-shape", "1x16x16", "--mean", "0.5", "--std", "0.5", "--student", "resnet8"]
GOOD_META = {"arch": "resnet8", "num_classes": "4", "input_shape": "[1, 16, 16]", "mean": "[0.5]", "std": "[0.5]",
             "class_names": '["a", "b", "c", "d"]', "recipe": "noise", "teacher_arch": "resnet8",
             "teacher_sha256": "0" * 64, "dfkd_version": "0.1.0"}


def _teachers(root: Path, good: Path) -> None:
    """Teacher checkpoints that load into resnet8 but must be refused, and labels with repeated names."""
    state = torch.load(good, weights_only=True)
    changed = {
        "nan": {"fc.weight": state["fc.weight"] * float("nan")},
        "complex": {"fc.weight": state["fc.weight"].to(torch.complex64)},
        "integer": {"fc.weight": (state["fc.weight"] * 100).to(torch.int32)},
        "zeros": {k: torch.zeros_like(v) for k, v in state.items() if v.is_floating_point()},
        "overflow": {"conv1.weight": state["conv1.weight"] * 3e38, "fc.weight": state["fc.weight"] * 3e38},
    }
    for name, values in changed.items():
        torch.save({**state, **values}, root / f"{name}.pt")
    torch.save(create_model("resnet8", 1, (1, 16, 16)).state_dict(), root / "one_class.pt")
    torch.save(create_model("resnet8", 3, (1, 16, 16)).state_dict(), root / "three_class.pt")
    (root / "dup.txt").write_text("cat\ndog\ncat\nbird\n")
    (root / "dup_spaces.txt").write_text("cat\n cat \ndog\nbird\n")


CONFIGS = {
    "steps_text": ('steps = "ten"', r"\[run\] steps must be a whole number above 0, got 'ten'"),
    "seed_float": ("seed = 1.5", r"\[run\] seed must be a whole number of at least 0, got 1.5"),
    "seed_65_bits": (f"seed = {2**64}", r"\[run\] seed must be at most 2\*\*63-1"),
    "mean_text": ('mean = "x"', r"\[run\] mean must be comma-separated numbers, got 'x'"),
    "std_zero": ("std = [0.0]", r"\[run\] std values must be positive"),
    "std_length": ("std = [0.5, 0.5]", r"\[run\] std has 2 values but the input has 1 channels"),
    "budget_negative": ("time_budget_s = -1", r"\[run\] time_budget_s must be a positive number, got -1"),
    "budget_text": ('time_budget_s = "soon"', r"\[run\] time_budget_s must be a duration"),
    "shape_short": ("input_shape = [1, 16]", r"\[run\] input_shape must be CxHxW"),
    "precision": ('precision = "fp8"', r"\[run\] precision must be one of auto"),
    "compile_text": ('compile = "yes"', r"\[run\] compile must be true or false"),
    "race_share": ("race_share = 2", r"\[run\] race_share must be between 0 and 1"),
    "min_agreement": ("min_agreement = 1.5", r"\[run\] min_agreement must be between 0 and 1"),
    "labels_number": ("labels = 5", r"\[run\] labels must be a non-empty line of text, got 5"),
}


def _configs(root: Path, teacher: Path) -> None:
    """config.toml files whose [run] table holds one wrong value each (the rest is a valid run)."""
    for name, (line, _) in CONFIGS.items():
        key = line.split(" = ")[0]
        base = {"teacher": f'"{teacher}"', "arch": '"resnet8"', "student": '"resnet8"', "recipe": '"noise"',
                "input_shape": "[1, 16, 16]", "mean": "[0.5]", "std": "[0.5]"}
        base.pop(key, None)
        (root / f"config_{name}.toml").write_text("[run]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()) + line + "\n")
    (root / "config_run_not_table.toml").write_text("run = 5\n")


STUDENTS = {
    "std_zero": ({"std": "[0.0]"}, "'dfkd.std' values must be positive"),
    "std_nan": ({"std": "[NaN]"}, "'dfkd.std' must be finite numbers"),
    "mean_length": ({"mean": "[0.1, 0.2]"}, "'dfkd.mean' has 2 values but the input has 1 channels"),
    "shape_zero": ({"input_shape": "[0, 16, 16]"}, "'dfkd.input_shape' must be CxHxW with positive sizes"),
    "shape_short": ({"input_shape": "[16, 16]"}, "'dfkd.input_shape' must be CxHxW"),
    "classes_mismatch": ({"num_classes": "5"}, "'dfkd.class_names' has 4 names but the teacher has 5 classes"),
    "classes_float": ({"num_classes": "4.5"}, "'dfkd.num_classes' must be a whole number of at least 2"),
    "names_twice": ({"class_names": '["a", "b", "a", "d"]'}, "'dfkd.class_names' names class 'a' twice"),
    "names_numbers": ({"class_names": "[1, 2, 3, 4]"}, "'dfkd.class_names' must be a list of class names"),
}


def _students(root: Path) -> None:
    """student.safetensors files whose dfkd metadata holds one bad value each."""
    state = {k: v.contiguous() for k, v in create_model("resnet8", 4, (1, 16, 16)).state_dict().items()}
    for name, (changes, _) in {"good": ({}, ""), **STUDENTS}.items():
        metadata = {"format": "pt", **{f"dfkd.{k}": v for k, v in {**GOOD_META, **changes}.items()}}
        save_file(state, str(root / f"student_{name}.safetensors"), metadata=metadata)


def _npz_files(root: Path) -> None:
    """Files named .npz that are not .npz archives."""
    (root / "text.npz").write_text("x = [1, 2, 3]\n")
    np.save(root / "array.npy", np.zeros((3, 16, 16), np.uint8))
    (root / "array.npy").rename(root / "array.npz")
    (root / "empty.npz").write_bytes(b"")
    np.savez(root / "scalar.npz", x=np.array(5))


def _synthetic_sets(root: Path, teacher_path: Path) -> None:
    """A valid synthetic set for the tiny teacher, and copies damaged in one way each."""
    teacher = load_teacher(teacher_path, "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])
    good = root / "synthetic"
    save_synthetic_set(good, torch.randn(8, 1, 16, 16), torch.randn(4, 1, 16, 16), teacher, "noise", "test")
    manifest = json.loads((good / "manifest.json").read_text())

    def damaged(name: str, manifest_changes: dict | None = None, shard: dict | str | None = None) -> None:
        folder = root / f"synthetic_{name}"
        shutil.copytree(good, folder)
        changed = {k: v for k, v in {**manifest, **(manifest_changes or {})}.items() if v is not None}
        (folder / "manifest.json").write_text(json.dumps(changed))
        if isinstance(shard, str):
            (folder / "train-00000.npz").write_text(shard)
        elif shard is not None:
            np.savez(folder / "train-00000.npz", **shard)

    damaged("no_recipe", {"recipe": None})
    damaged("std_zero", {"std": [0.0]})
    damaged("names_twice", {"class_names": ["a", "a", "b", "c"]})
    damaged("shard_text", shard="not an archive")
    damaged("shard_nan", shard={"x": np.full((8, 1, 16, 16), np.nan, np.float16)})
    damaged("shard_shape", shard={"x": np.zeros((8, 3, 16, 16), np.float16)})


@pytest.fixture(scope="module")
def files(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    _teachers(root, tiny_teacher["path"])
    _configs(root, tiny_teacher["path"])
    _students(root)
    _npz_files(root)
    _synthetic_sets(root, tiny_teacher["path"])
    return root


def _cases(files: Path, teacher: Path, eval_npz: Path) -> dict[str, tuple[list, str]]:
    """Case name -> (command line, regex the one error line must match)."""
    run = ["compress", teacher, *TINY, "--recipe", "noise"]

    def with_teacher(name: str) -> list:
        return ["compress", files / f"{name}.pt", *TINY, "--recipe", "noise"]

    cases = {
        # teachers and class names: refused at load, not after training
        "labels name a class twice": ([*run, "--labels", files / "dup.txt"], "names class 'cat' twice"),
        "labels twice once trimmed": ([*run, "--labels", files / "dup_spaces.txt"], "names class 'cat' twice"),
        "teacher weights NaN": (with_teacher("nan"), r"key 'fc.weight' holds 256 NaN or infinite value"),
        "teacher weights complex": (with_teacher("complex"), "key 'fc.weight' holds complex64 values"),
        "teacher weights integer": (with_teacher("integer"), "key 'fc.weight' holds int32 values"),
        "teacher outputs constant": (with_teacher("zeros"), "gives the same outputs for every input"),
        "teacher outputs overflow": (with_teacher("overflow"), "gives NaN or infinite outputs on random inputs"),
        "single-class teacher": (with_teacher("one_class"), "is a 1-output network.*at least 2 classes"),
        "inspect a NaN teacher": (["inspect", files / "nan.pt", "--arch", "resnet8", "--input-shape", "1x16x16"],
                                  "holds 256 NaN"),
        # flags
        "seed beyond 64 bits": ([*run, "--seed", str(2**64)], r"--seed must be at most 2\*\*63-1"),
        "seed negative": ([*run, "--seed", "-1"], "--seed must be a whole number of at least 0"),
        "mean not numbers": ([*run, "--mean", "1,x"], "--mean must be comma-separated numbers, got '1,x'"),
        "std zero": ([*run, "--std", "0"], r"--std values must be positive, got \[0.0\]"),
        "std one value too many": ([*run, "--std", "0.5,0.5"], "--std has 2 values but the input has 1 channels"),
        "config run not a table": (["compress", "--config", files / "config_run_not_table.toml"], r"\[run\] in .* must be a table"),
        # eval data and prior files that are not .npz archives
        "eval data is text": ([*run, "--eval-data", files / "text.npz"], "is not a zip archive, not an .npz archive"),
        "eval data is .npy": ([*run, "--eval-data", files / "array.npz"], "is a single .npy array, not an .npz archive"),
        "eval data is empty": ([*run, "--eval-data", files / "empty.npz"], r"is empty \(0 bytes\), not an .npz"),
        "eval data x is a scalar": ([*run, "--eval-data", files / "scalar.npz"], "'x' is a single value"),
        "prior is .npy": (["compress", teacher, *TINY, "--recipe", "prior-kd", "--prior", files / "array.npz"],
                          "prior '.*' is a single .npy array"),
        "eval command, data is text": (["eval", files / "student_good.safetensors", "--eval-data", files / "text.npz"],
                                       "eval data '.*' is not a zip archive"),
        "eval teacher with other classes": (["eval", files / "student_good.safetensors", "--teacher",
                                             files / "three_class.pt", "--eval-data", eval_npz],
                                            "has 3 classes but student .* has 4; pass the teacher"),
    }
    for name, (_, pattern) in CONFIGS.items():
        cases[f"config {name}"] = (["compress", "--config", files / f"config_{name}.toml"], f"config_{name}.toml' {pattern}")
    for name, (_, pattern) in STUDENTS.items():
        cases[f"student metadata {name}"] = (["eval", files / f"student_{name}.safetensors", "--eval-data", eval_npz],
                                             f"student_{name}.safetensors': dfkd student metadata {pattern}")
    synthetic = {"no_recipe": "key 'recipe' must be a non-empty line of text, got None",
                 "std_zero": "key 'std' values must be positive", "names_twice": "names class 'a' twice",
                 "shard_text": "is not a zip archive", "shard_nan": "holds NaN or infinite inputs",
                 "shard_shape": r"must hold float inputs 'x' of shape \[N, 1, 16, 16\], got float16 \[8, 3, 16, 16\]"}
    for name, pattern in synthetic.items():
        cases[f"synthetic set {name}"] = ([*run[:-2], "--from-synthetic", files / f"synthetic_{name}"], pattern)
    return cases


CASES = list(_cases(Path("files"), Path("teacher.pt"), Path("eval.npz")))


def _never_synthesize(self, *args, **kwargs):
    raise AssertionError("a synthesizer was built before the inputs were checked")


@pytest.mark.parametrize("case", CASES)
def test_bad_values_are_refused_before_any_work(case, files, tiny_teacher, tmp_path, monkeypatch):
    """One error line, exit 2, no traceback, nothing written, within seconds and before any synthesizer exists."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Synthesizer, "__init__", _never_synthesize)
    before = sorted(p.name for p in files.iterdir())
    args, pattern = _cases(files, tiny_teacher["path"], tiny_teacher["eval"])[case]
    started = time.perf_counter()
    result = kit.cli(*args)
    seconds = time.perf_counter() - started
    assert result.exit_code == 2, (case, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and re.search(pattern, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == [], "something was written"
    assert sorted(p.name for p in files.iterdir()) == before, "something was written next to the inputs"
    assert seconds < SECONDS, f"{case}: refused only after {seconds:.1f} s"


def test_the_valid_inputs_of_the_suite_are_accepted(files, tiny_teacher, tmp_path, monkeypatch):
    """Guards the cases above against vacuity: the unchanged student, set and teacher go through."""
    result = kit.cli("eval", files / "student_good.safetensors", "--teacher", tiny_teacher["path"], "--eval-data",
                     tiny_teacher["eval"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    monkeypatch.chdir(tmp_path)
    run = kit.cli("compress", tiny_teacher["path"], *TINY, "--from-synthetic", files / "synthetic", "--steps", "2",
                  *kit.train(batch_size=4, holdout=4, eval_every=1), "--device", "cpu", "--format", "json",
                  "--out", tmp_path / "run")
    assert run.exit_code == 0, run.stderr


# ---- numbers that say what happened -----------------------------------------------------------------


def test_an_exploding_student_loss_rolls_back_and_aborts_with_the_fix(tiny_teacher, tmp_path):
    """-s train.lr=1e9 sends the loss from ~0.1 to ~1e16 in one step: finite, but a divergence all the same."""
    result = kit.cli(*kit.compress_args(tiny_teacher, tmp_path / "run", "noise", 2, *kit.train(batch_size=8, holdout=8,
                     eval_every=1, max_retries=1, lr=1e9), *kit.synth(batch_size=8)))
    assert result.exit_code == 3, (result.stderr, result.exception)
    assert re.search(r"student loss \S+ exploded \(above \S+, 10000x its median over the first steps\) at student "
                     r"step 2: rolled back to step \d+, student learning rate x0.5", result.stderr), result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: student loss") and "lower train.lr" in last, last
    assert "report this as a bug" not in result.stderr


class _Tiny(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv, self.head, self.scale = nn.Conv2d(1, 2, 3), nn.Linear(2, 3), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3))) * self.scale


@pytest.mark.parametrize("damage", [float("nan"), 1e30])
def test_the_parity_gate_blames_a_broken_student_on_training(damage, tmp_path):
    model = _Tiny()
    with torch.no_grad():
        model.conv.weight.mul_(damage)
    with pytest.raises(ExportError) as info:
        export_onnx(model, tmp_path / "student.onnx", (1, 8, 8), torch.randn(4, 1, 8, 8))
    message = info.value.message
    assert "training failed (not the ONNX export): lower train.lr" in message, message
    assert "report this as a bug" not in message and list(tmp_path.iterdir()) == []


def test_a_failed_parity_check_with_huge_outputs_is_a_training_failure(tmp_path, monkeypatch):
    """Healthy weights, logits near 1e9 (a diverging student's): when parity fails, training is to blame."""
    from dfkd_cli import export

    monkeypatch.setattr(export, "_measure_parity", lambda *args: (math.inf, 0.5, 1e9))
    with pytest.raises(ExportError, match=r"outputs on held-out inputs reach \S+; training failed"):
        export_onnx(_Tiny(scale=1e9), tmp_path / "student.onnx", (1, 8, 8), torch.randn(4, 1, 8, 8))
    # the same failure for a model of ordinary outputs stays the exporter's
    with pytest.raises(ExportError, match="ONNX parity check failed.*report this as a bug"):
        export_onnx(_Tiny(), tmp_path / "student.onnx", (1, 8, 8), torch.randn(4, 1, 8, 8))


# ---- property tests: any input parses into sane values or raises DfkdError -------------------------

PLAIN = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
VALUES = PLAIN | st.lists(PLAIN, max_size=4) | st.dictionaries(st.text(max_size=3), PLAIN, max_size=2)
TOML_VALUES = st.sampled_from(["1", "-1", "1.5", "0", "nan", "-inf", "1e400", str(2**64), "true", '"x"', '"none"',
                               '"1x16x16"', "[1, 16, 16]", "[0.5, nan]", "[]", '["a"]', "{a = 1}", "1979-05-27"])


@FUZZ
@given(table=st.dictionaries(st.sampled_from(_RUN_KEYS) | st.text(max_size=6), TOML_VALUES | st.text(max_size=10),
                             max_size=5))
def test_any_run_table_is_read_or_refused(table: dict[str, str]) -> None:
    fixed = {"teacher": '"t.pt"', "arch": '"resnet8"', "student": '"resnet8"', "recipe": '"noise"'}
    lines = [f"{key} = {value}" for key, value in fixed.items()]
    lines += [f"{json.dumps(key)} = {value}" for key, value in table.items() if key not in fixed]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.toml"
        path.write_text("[run]\n" + "\n".join(lines) + "\n", encoding="utf-8")
        try:
            opts, recipes = resolve_compress({}, [], path)
        except DfkdError as err:
            assert err.message and "\n" not in err.message, err.message
            return
    assert isinstance(opts.seed, int) and 0 <= opts.seed < 2**63 and recipes
    assert opts.steps is None or (isinstance(opts.steps, int) and opts.steps >= 1)
    for values in (opts.mean, opts.std):
        assert values is None or all(math.isfinite(v) for v in values)
    assert opts.time_budget_s is None or 0 < opts.time_budget_s < math.inf


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(GOOD_META)), VALUES.map(json.dumps) | st.text(max_size=20),
                               max_size=4))
def test_any_student_metadata_is_read_or_refused(changes: dict[str, str]) -> None:
    metadata = {f"dfkd.{k}": v for k, v in {**GOOD_META, **changes}.items()}
    try:
        meta = StudentMeta.from_metadata(metadata)
    except DfkdError as err:
        assert err.message and "\n" not in err.message, err.message
        return
    assert len(meta.mean) == len(meta.std) == meta.input_shape[0] and min(meta.input_shape) >= 1
    assert all(math.isfinite(v) for v in meta.mean) and min(meta.std) > 0
    assert len(meta.class_names) == len(set(meta.class_names)) == meta.num_classes >= 2


NOISE = read_toml(recipe_path("noise"))


@FUZZ
@given(item=st.text(max_size=30) | st.builds("{}={}".format, st.sampled_from(["train.lr", "train.steps", "synth.batch_size",
                                                                                 "recipe.name", "train"]), st.text(max_size=12)))
def test_any_set_item_is_parsed_or_refused(item: str) -> None:
    try:
        key, _ = parse_override(item)
        config = build_recipe(NOISE, [item], default_name="noise")
    except DfkdError as err:
        assert err.message and "\n" not in err.message, err.message
        return
    assert key and config.train.lr > 0 and config.train.steps >= 1


def test_the_fuzzed_parsers_accept_valid_input(tmp_path):
    """Guards the properties above against vacuity."""
    path = tmp_path / "config.toml"
    path.write_text('[run]\nteacher = "t.pt"\narch = "resnet8"\nstudent = "resnet8"\nrecipe = "noise"\nseed = 3\nmean = [0.5]\n')
    opts, _ = resolve_compress({}, [], path)
    assert opts.seed == 3 and list(opts.mean) == [0.5]
    meta = StudentMeta.from_metadata({f"dfkd.{k}": v for k, v in GOOD_META.items()})
    assert meta.std == (0.5,) and meta.class_names == ["a", "b", "c", "d"]
    assert build_recipe(NOISE, ["train.lr=0.5"], default_name="noise").train.lr == 0.5
