"""Bad input: one line on stderr naming the problem and the fix, exit 2, no traceback, nothing written."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dfkd_cli.archs import create_model
from dfkd_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = tiny_teacher["path"]
    (root / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "random.pt").write_bytes(bytes(range(256)) * 10)
    torch.save(create_model("resnet8", 4, (1, 16, 16)), root / "pickled.pt")
    torch.save(create_model("lenet5", 10, (1, 32, 32)).state_dict(), root / "lenet.pt")
    (root / "empty_eval").mkdir()
    (root / "existing").mkdir()
    (root / "mine.toml").write_text("[train]\nlr = 0.1\n")
    return root


def _cases(files, teacher):
    base = ["--arch", "resnet8", "--input-shape", "1x16x16", "--student", "resnet8"]
    return {
        "missing teacher": (["compress", files / "nope.pt", *base], "not found"),
        "teacher is a directory": (["compress", files, *base], "directory"),
        "truncated checkpoint": (["compress", files / "truncated.pt", *base], "truncated|not a"),
        "random bytes": (["compress", files / "random.pt", *base], "not a"),
        "pickled module": (["compress", files / "pickled.pt", *base], "--trust-pickle"),
        "unknown arch": (["compress", teacher, "--arch", "resnet9"], "unknown architecture 'resnet9'; did you mean"),
        "state dict does not fit": (["compress", files / "lenet.pt", *base], "lenet5"),
        "input shape too small": (["compress", files / "lenet.pt", "--arch", "lenet5", "--input-shape", "1x8x8"], "cannot take input shape"),
        "input shape not CxHxW": (["compress", teacher, "--arch", "resnet8", "--input-shape", "16x16"], "CxHxW"),
        "unknown recipe": (["compress", teacher, *base, "--recipe", "deepinversio"], "did you mean: deepinversion"),
        "unknown recipe key": (["compress", teacher, *base, "-s", "train.lrr=1"], "valid keys"),
        "wrong recipe type": (["compress", teacher, *base, "-s", "train.steps=many"], "must be int"),
        "recipe needs BatchNorm": (["compress", files / "lenet.pt", "--arch", "lenet5", "--recipe", "deepinversion"], "recipes that apply:"),
        "out exists": (["compress", teacher, *base, "--out", files / "existing"], "already exists"),
        "eval data empty": (["compress", teacher, *base, "--eval-data", files / "empty_eval"], "empty_eval"),
        "eval data missing": (["compress", teacher, *base, "--eval-data", files / "nothing.npz"], "not found|does not exist"),
        "min agreement not a fraction": (["compress", teacher, *base, "--min-agreement", "95"], "between 0 and 1"),
        "bad time budget": (["compress", teacher, *base, "--time-budget", "soon"], "90s, 10m or 2h"),
        "no teacher": (["compress", "--arch", "resnet8"], "--demo"),
        "eval without teacher or data": (["eval", files / "nope.safetensors"], "nothing to measure"),
        "eval student missing": (["eval", files / "nope.safetensors", "--eval-data", teacher], "not found|does not exist"),
    }


CASES = ["missing teacher", "teacher is a directory", "truncated checkpoint", "random bytes", "pickled module",
         "unknown arch", "state dict does not fit", "input shape too small", "input shape not CxHxW", "unknown recipe",
         "unknown recipe key", "wrong recipe type", "recipe needs BatchNorm", "out exists", "eval data empty",
         "eval data missing", "min agreement not a fraction", "bad time budget", "no teacher", "eval without teacher or data", "eval student missing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, pattern = _cases(files, tiny_teacher["path"])[case]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (case, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == [], "something was written"


def test_valid_partial_recipe_file_validates(files):
    result = runner.invoke(app, ["recipes", "validate", str(files / "mine.toml")])
    assert result.exit_code == 0


def test_trust_pickle_loads_a_pickled_module(files, tmp_path):
    result = runner.invoke(app, ["inspect", str(files / "pickled.pt"), "--arch", "resnet8", "--input-shape", "1x16x16",
                                 "--trust-pickle", "--format", "json"])
    assert result.exit_code == 0, result.stderr
