"""Bad input: one line on stderr naming the problem and the fix, exit 2, no traceback, nothing written.

Every case fails while loading and checking inputs, before any training, so the suite stays fast.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from dfkd_cli.archs import create_model
from dfkd_cli.cli import app
from dfkd_cli.eval_data import read_image

from conftest import quadrant_task

runner = CliRunner()
MARKER = "PWNED"  # what the malicious pickles would create next to themselves if they ever ran


class _Exploit:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _write_checkpoints(root: Path, good: Path) -> None:
    """Damaged, foreign, malicious and empty checkpoints."""
    (root / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "random.pt").write_bytes(bytes(range(256)) * 10)
    (root / "empty.pt").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(root / "image.png")
    (root / "image.png").rename(root / "image.pt")
    (root / "notes.pt").write_text("weights are on the shared drive\n")
    (root / "config.json.pt").write_text(json.dumps({"arch": "resnet8", "num_classes": 4}))
    torch.save(create_model("resnet8", 4, (1, 16, 16)), root / "pickled.pt")
    torch.save(create_model("lenet5", 10, (1, 32, 32)).state_dict(), root / "lenet.pt")
    (root / "exploit.pkl").write_bytes(pickle.dumps(_Exploit(root / MARKER), protocol=2))
    torch.save({"state_dict": _Exploit(root / MARKER)}, root / "exploit.pt")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(root / "bad_data_pkl.pt", "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:12] + b"\xff\xfe not a pickle" + data[40:] if name.endswith("data.pkl") else data)
    (root / "huge_header.safetensors").write_bytes(struct.pack("<Q", 2**62) + b'{"a": 1}' + bytes(64))
    (root / "bad_json.safetensors").write_bytes(struct.pack("<Q", 12) + b'{"w": [1,, 2' + bytes(64))
    save_file({}, str(root / "no_tensors.safetensors"))
    torch.save({"epoch": 3, "best_acc": 0.9}, root / "no_tensors.pt")
    resnet20 = create_model("resnet20", 4, (1, 16, 16)).state_dict()
    save_file({k: v.contiguous() for k, v in resnet20.items()}, str(root / "resnet20.safetensors"))
    (root / "three_labels.txt").write_text("cat\ndog\nbird\n")


def _write_priors(root: Path) -> None:
    """Prior folders and .npz files that hold no usable image."""
    (root / "prior_empty").mkdir()
    for name, content in [("prior_corrupt", lambda i: os.urandom(300)), ("prior_zero", lambda i: b"")]:
        (root / name).mkdir()
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(content(i))
    (root / "prior_no_images").mkdir()
    (root / "prior_no_images" / "readme.txt").write_text("images are elsewhere")
    (root / "prior_no_images" / "labels.csv").write_text("0,1\n")
    np.savez(root / "prior_no_x.npz", images=np.zeros((4, 16, 16), np.uint8))


def _write_recipes(root: Path) -> None:
    """Recipe files that are invalid TOML, unknown, mistyped, out of range or trying to name code."""
    recipes = {
        "unknown_key": "[train]\nlrr = 0.1\n",
        "wrong_type": '[train]\nsteps = "many"\n',
        "negative_lr": "[train]\nlr = -0.1\n",
        "negative_steps": "[train]\nsteps = -5\n",
        "zero_batch": "[train]\nbatch_size = 0\n",
        "nan": "[train]\nlr = nan\n",
        "inf": "[train]\ntemperature = inf\n",
        "syntax": "[train\nlr = 0.1\n",
        "names_code": '[recipe]\nsynthesizer = "os.system"\n',
        "import_value": f"[train]\noptimizer = \"__import__('os').system('touch {root / MARKER}')\"\n",
        "unknown_synth": '[recipe]\nsynthesizer = "stylegan"\n',
        "synth_not_table": "synth = 5\n",
        "newline_key": '[train]\n"l\\nr" = 0.1\n',
        "negative_loss": '[recipe]\nsynthesizer = "deepinversion"\n[synth.loss]\nbn = -1.0\n',
        "deep": "x = " + "[" * 5000 + "]" * 5000 + "\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.toml").write_text(text)
    (root / "folder.toml").mkdir()
    (root / "mine.toml").write_text("[train]\nlr = 0.1\n")


def _write_eval_data(root: Path) -> None:
    """Eval .npz files with missing arrays, bad labels and bad shapes."""
    x = np.zeros((3, 16, 16), np.uint8)
    arrays = {
        "eval_no_x": {"y": np.array([0, 1, 2])},
        "eval_label_high": {"x": x, "y": np.array([0, 1, 4])},
        "eval_label_negative": {"x": x, "y": np.array([0, -1, 2])},
        "eval_x_2d": {"x": np.zeros((3, 16), np.uint8), "y": np.array([0, 1, 2])},
        "eval_x_5d": {"x": np.zeros((3, 1, 2, 16, 16), np.uint8), "y": np.array([0, 1, 2])},
        "eval_x_no_pixels": {"x": np.zeros((3, 0, 16), np.uint8), "y": np.array([0, 1, 2])},
        "eval_empty": {"x": np.zeros((0, 16, 16), np.uint8), "y": np.zeros(0, np.int64)},
        "eval_length_mismatch": {"x": x, "y": np.array([0, 1])},
        "eval_float_labels": {"x": x, "y": np.array([0.0, 1.0, 2.0])},
        "eval_nan_pixels": {"x": np.full((3, 16, 16), np.nan, np.float32), "y": np.array([0, 1, 2])},
        "eval_no_y": {"x": x},
    }
    for name, contents in arrays.items():
        np.savez(root / f"{name}.npz", **contents)
    (root / "empty_eval").mkdir()


@pytest.fixture(scope="module")
def files(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _write_checkpoints(root, tiny_teacher["path"])
    _write_priors(root)
    _write_recipes(root)
    _write_eval_data(root)
    (root / "existing").mkdir()
    (root / "a_file").write_text("not a folder")
    read_only = root / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    return root


def _cases(files: Path, teacher: Path) -> dict[str, tuple[list, str]]:
    """Case name -> (command line, regex the one error line must match)."""
    base = ["--arch", "resnet8", "--input-shape", "1x16x16", "--student", "resnet8"]
    run = ["compress", teacher, *base]
    prior = [*run, "--recipe", "prior-kd", "--prior"]
    validate = ["recipes", "validate"]
    return {
        # checkpoints
        "missing teacher": (["compress", files / "nope.pt", *base], "not found"),
        "teacher is a directory": (["compress", files, *base], "directory"),
        "truncated checkpoint": (["compress", files / "truncated.pt", *base], "truncated|not a"),
        "random bytes": (["compress", files / "random.pt", *base], "not a"),
        "empty checkpoint": (["compress", files / "empty.pt", *base], r"is empty \(0 bytes\); re-save"),
        "image renamed .pt": (["compress", files / "image.pt", *base], "is a PNG image, not a PyTorch"),
        "text renamed .pt": (["compress", files / "notes.pt", *base], "is a text file, not a PyTorch"),
        "json renamed .pt": (["compress", files / "config.json.pt", *base], "is JSON text, not a PyTorch"),
        "pickled module": (["compress", files / "pickled.pt", *base], "--trust-pickle"),
        "malicious pickle": (["compress", files / "exploit.pkl", *base], "arbitrary code.*--trust-pickle"),
        "malicious pickle in torch zip": (["compress", files / "exploit.pt", *base], "arbitrary code.*--trust-pickle"),
        "damaged data.pkl": (["compress", files / "bad_data_pkl.pt", *base], "corrupted: re-save or re-download"),
        "safetensors header too large": (["compress", files / "huge_header.safetensors", *base], "header too large"),
        "safetensors header not JSON": (["compress", files / "bad_json.safetensors", *base], "invalid JSON in header"),
        "safetensors without tensors": (["compress", files / "no_tensors.safetensors", *base], "contains no tensors"),
        "pt without tensors": (["compress", files / "no_tensors.pt", *base], r"no tensors \(top-level keys: epoch"),
        "state dict does not fit": (["compress", files / "lenet.pt", *base], "lenet5"),
        "checkpoint of another resnet": (["compress", files / "resnet20.safetensors", *base],
                                         "does not fit resnet8.*did you mean --arch resnet20"),
        "labels count differs": ([*run, "--labels", files / "three_labels.txt"], "has 3 names but the teacher has 4"),
        "labels file is binary": ([*run, "--labels", files / "image.pt"], "not UTF-8 text"),
        # architecture and shapes
        "unknown arch": (["compress", teacher, "--arch", "resnet9"], "unknown architecture 'resnet9'; did you mean"),
        "unknown student arch": ([*run[:-2], "--student", "resnet9"], "unknown architecture 'resnet9'"),
        "input shape too small": (["compress", files / "lenet.pt", "--arch", "lenet5", "--input-shape", "1x8x8"],
                                  "cannot take input shape"),
        "input shape 1x1 for lenet": (["compress", files / "lenet.pt", "--arch", "lenet5", "--input-shape", "1x1x1"],
                                      "cannot take input shape 1x1x1"),
        "input shape not CxHxW": (["compress", teacher, "--arch", "resnet8", "--input-shape", "16x16"], "CxHxW"),
        "input shape 0 channels": (["compress", teacher, "--arch", "resnet8", "--input-shape", "0x16x16"], "positive sizes"),
        "input shape negative": (["compress", teacher, "--arch", "resnet8", "--input-shape", "1x-16x16"], "positive sizes"),
        "input shape not numbers": (["compress", teacher, "--arch", "resnet8", "--input-shape", "gray"], "CxHxW"),
        "input channels differ": (["compress", teacher, "--arch", "resnet8", "--input-shape", "3x16x16"],
                                  "has 3 channels but the checkpoint.s conv1.* takes 1; pass --input-shape 1x16x16"),
        "mean is nan": ([*run, "--mean", "nan", "--std", "0.5"], "must be finite"),
        # prior images
        "prior folder empty": ([*prior, files / "prior_empty"], "has no images"),
        "prior images corrupt": ([*prior, files / "prior_corrupt"], r"no readable image \(3 files"),
        "prior images zero bytes": ([*prior, files / "prior_zero"], r"no readable image \(3 files"),
        "prior without image files": ([*prior, files / "prior_no_images"], r"has no images \(.bmp"),
        "prior missing": ([*prior, files / "nope"], "not found"),
        "prior npz without x": ([*prior, files / "prior_no_x.npz"], "has no array 'x' \\(found: images\\)"),
        "prior with a recipe that ignores it": ([*run, "--recipe", "noise", "--prior", files / "prior_empty"],
                                                "does not use --prior.*prior-kd"),
        "prior recipe without prior": ([*run, "--recipe", "prior-kd"], "needs --prior"),
        # recipes: files, `recipes validate` and -s overrides
        "unknown recipe": ([*run, "--recipe", "deepinversio"], "did you mean: deepinversion"),
        "unknown recipe key": ([*run, "-s", "train.lrr=1"], "valid keys"),
        "wrong recipe type": ([*run, "-s", "train.steps=many"], "must be int"),
        "recipe needs BatchNorm": (["compress", files / "lenet.pt", "--arch", "lenet5", "--recipe", "deepinversion"],
                                   "recipes that apply:"),
        "recipe file unknown key": ([*run, "--recipe", files / "unknown_key.toml"], "unknown key 'train.lrr'; did you mean"),
        "recipe file wrong type": ([*validate, files / "wrong_type.toml"], "'train.steps' must be int, got 'many'"),
        "recipe file negative lr": ([*validate, files / "negative_lr.toml"], "'train.lr' must be positive, got -0.1"),
        "recipe file negative steps": ([*run, "--recipe", files / "negative_steps.toml"], "'train.steps' must be positive"),
        "recipe file zero batch": ([*validate, files / "zero_batch.toml"], "'train.batch_size' must be positive, got 0"),
        "recipe file nan": ([*validate, files / "nan.toml"], "'train.lr' must be a finite number, got nan"),
        "recipe file inf": ([*run, "--recipe", files / "inf.toml"], "'train.temperature' must be a finite number"),
        "recipe file bad syntax": ([*validate, files / "syntax.toml"], "is not valid TOML.*fix the file"),
        "recipe names code": ([*validate, files / "names_code.toml"], "unknown synthesizer 'os.system'.*available: noise"),
        "recipe value is code": ([*validate, files / "import_value.toml"], "'train.optimizer' must be one of sgd, adam"),
        "recipe unknown synthesizer": ([*validate, files / "unknown_synth.toml"], "unknown synthesizer 'stylegan'"),
        "recipe synth not a table": ([*validate, files / "synth_not_table.toml"], r"\[synth\] must be a table"),
        "recipe key with a newline": ([*validate, files / "newline_key.toml"], r"unknown key 'train.l\\nr'"),
        "recipe negative loss weight": ([*validate, files / "negative_loss.toml"], "'synth.loss.bn' must not be negative"),
        "recipe nested too deeply": ([*validate, files / "deep.toml"], "nested too deeply"),
        "recipe file is a folder": ([*validate, files / "folder.toml"], "is a folder"),
        "recipe file missing": ([*validate, files / "nope.toml"], "not found"),
        "override nan": ([*run, "--recipe", "noise", "-s", "train.lr=nan"], "'train.lr' must be a finite number"),
        "override negative": ([*run, "--recipe", "noise", "-s", "train.batch_size=-8"], "'train.batch_size' must be positive"),
        "override negative weight decay": ([*run, "--recipe", "noise", "-s", "train.weight_decay=-1e-4"],
                                           "'train.weight_decay' must not be negative"),
        "override inf loss weight": ([*run, "--recipe", "deepinversion", "-s", "synth.loss.bn=inf"],
                                     "'synth.loss.bn' must be a finite number"),
        "override not key=value": ([*run, "--recipe", "noise", "-s", "train.lr"], "is not key=value"),
        # eval data
        "eval data empty": ([*run, "--eval-data", files / "empty_eval"], "empty_eval"),
        "eval data missing": ([*run, "--eval-data", files / "nothing.npz"], "not found|does not exist"),
        "eval data without x": ([*run, "--eval-data", files / "eval_no_x.npz"], "has no array 'x'"),
        "eval labels too high": ([*run, "--eval-data", files / "eval_label_high.npz"], "labels 0..4 but the teacher's classes are 0..3"),
        "eval labels negative": ([*run, "--eval-data", files / "eval_label_negative.npz"], "labels -1..2"),
        "eval x 2-D": ([*run, "--eval-data", files / "eval_x_2d.npz"], r"'x' has shape \[3, 16\]; expected"),
        "eval x 5-D": ([*run, "--eval-data", files / "eval_x_5d.npz"], r"'x' has shape \[3, 1, 2, 16, 16\]"),
        "eval x without pixels": ([*run, "--eval-data", files / "eval_x_no_pixels.npz"], "holds no pixels"),
        "eval arrays empty": ([*run, "--eval-data", files / "eval_empty.npz"], "holds no samples"),
        "eval x and y lengths differ": ([*run, "--eval-data", files / "eval_length_mismatch.npz"], "'y' must be 3 integer labels"),
        "eval labels not integers": ([*run, "--eval-data", files / "eval_float_labels.npz"], "got float64"),
        "eval pixels nan": ([*run, "--eval-data", files / "eval_nan_pixels.npz"], "pixel values span nan"),
        # output
        "out exists": ([*run, "--out", files / "existing"], "already exists"),
        "out is a file": ([*run, "--out", files / "a_file", "--overwrite"], "is a file, not a folder"),
        "out under a file": ([*run, "--out", files / "a_file" / "run"], "is a file; pick another --out"),
        "out not writable": ([*run, "--out", files / "read_only" / "run"], "not writable; pick another --out"),
        # other flags
        "min agreement not a fraction": ([*run, "--min-agreement", "95"], "between 0 and 1"),
        "bad time budget": ([*run, "--time-budget", "soon"], "90s, 10m or 2h"),
        "no teacher": (["compress", "--arch", "resnet8"], "--demo"),
        "eval without teacher or data": (["eval", files / "nope.safetensors"], "nothing to measure"),
        "eval student missing": (["eval", files / "nope.safetensors", "--eval-data", teacher], "not found|does not exist"),
    }


CASES = list(_cases(Path("files"), Path("teacher.pt")))
NEEDS_NON_ROOT = {"out not writable"}  # root writes into a 0o500 folder all the same


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, tiny_teacher, tmp_path, monkeypatch):
    if case in NEEDS_NON_ROOT and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    monkeypatch.chdir(tmp_path)
    args, pattern = _cases(files, tiny_teacher["path"])[case]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (case, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == [], "something was written"
    assert not (files / MARKER).exists(), "a pickle or recipe ran code"
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".")) == [], "a staging folder was left"


def test_the_suite_is_big_enough():
    assert len(CASES) >= 45


def test_the_exploit_would_leave_its_marker(tmp_path):
    """Guards the marker check above: unpickling the exploit does run its command."""
    pickle.loads(pickle.dumps(_Exploit(tmp_path / MARKER)))
    assert (tmp_path / MARKER).exists()


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps", "many"], ["--bogus"]])
def test_usage_errors_are_one_line(args, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compress", str(tiny_teacher["path"]), "--arch", "resnet8", *args])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_eval_data_without_labels_and_no_teacher_is_refused(files, tmp_path):
    from dfkd_cli.export import StudentMeta, save_student

    meta = StudentMeta("resnet8", 4, (1, 16, 16), (0.5,), (0.5,), ["a", "b", "c", "d"], "noise", "resnet8", "0" * 64, "0")
    save_student(create_model("resnet8", 4, (1, 16, 16)), meta, tmp_path / "student.safetensors")
    result = runner.invoke(app, ["eval", str(tmp_path / "student.safetensors"), "--eval-data", str(files / "eval_no_y.npz")])
    assert result.exit_code == 2 and "label" in result.stderr, (result.exit_code, result.stdout)


def test_valid_partial_recipe_file_validates(files):
    result = runner.invoke(app, ["recipes", "validate", str(files / "mine.toml")])
    assert result.exit_code == 0


def test_trust_pickle_loads_a_pickled_module(files, tmp_path):
    result = runner.invoke(app, ["inspect", str(files / "pickled.pt"), "--arch", "resnet8", "--input-shape", "1x16x16",
                                 "--trust-pickle", "--format", "json"])
    assert result.exit_code == 0, result.stderr


# ---- odd but valid input is accepted ---------------------------------------------------------------


def _odd_images(folder: Path) -> int:
    """Images in every mode and size a prior folder may hold, and files that cannot be decoded;
    returns how many files were written."""
    folder.mkdir()
    x, _ = quadrant_task(24, seed=7)
    for i, image in enumerate(x):
        Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(folder / f"good{i}.png")
    Image.fromarray(np.full((20, 20), 30000, np.uint16)).save(folder / "sixteen_bit.png")
    Image.new("CMYK", (20, 20), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    palette = Image.new("P", (20, 20), 3)
    palette.putpalette([v % 256 for v in range(768)])
    palette.save(folder / "palette.png", transparency=0)
    Image.new("L", (1, 1), 200).save(folder / "one_pixel.png")
    Image.new("RGB", (3000, 3000), (90, 90, 90)).save(folder / "large.png")
    (folder / "corrupt.png").write_bytes(os.urandom(500))
    (folder / "zero.png").write_bytes(b"")
    return len(x) + 7


def test_a_prior_folder_of_odd_and_broken_images_is_accepted(tiny_teacher, tmp_path):
    count = _odd_images(tmp_path / "prior")
    args = ["compress", tiny_teacher["path"], *tiny_teacher["args"], "--student", "resnet8", "--recipe", "prior-kd",
            "--prior", tmp_path / "prior", "--out", tmp_path / "run", "--device", "cpu", "--format", "json",
            "--steps", "4", "--time-budget", "60s", "-s", "train.batch_size=8", "-s", "synth.batch_size=8",
            "-s", "train.holdout=4", "-s", "train.eval_every=2", "-s", "train.steps_per_round=2"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stderr, result.exception)
    prior = json.loads(result.stdout)["run"]["prior"]
    assert prior["images"] == count and prior["held_out"] == 4


def test_a_16_bit_image_keeps_its_brightness(tmp_path):
    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "grey.png")  # 46% of 65535
    for shape in [(1, 16, 16), (3, 16, 16)]:
        assert float(read_image(tmp_path / "grey.png", shape).mean()) == pytest.approx(30000 / 65535, abs=0.01)
