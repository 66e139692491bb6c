"""--recipe auto: every recipe that applies races for a share of the budget on pooled held-out
synthetic samples, the leader gets the rest, and the report and config name what happened."""

from __future__ import annotations

import json
import tomllib
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from dfkd_cli.archs import create_model
from dfkd_cli.cli import app
from dfkd_cli.config import recipe_info
from dfkd_cli.policy import choose_rule
from dfkd_cli.race import pooled_samples, race_entrants


def test_entrants_are_the_methods_that_apply():
    without_bn, with_bn = race_entrants(False), race_entrants(True)
    assert {"dafl", "dfad", "zskt", "zskd"} <= set(without_bn)
    assert not any(recipe_info(name).requires_bn for name in without_bn)
    assert {"cmi", "fast", "deepinversion", "adi", "dfq"} <= set(with_bn)
    assert not {"noise", "avkd", "prior-kd"} & set(with_bn)


def test_every_entrant_weighs_the_same_in_the_pool():
    runs = [SimpleNamespace(selector=SimpleNamespace(selection_samples=lambda n=n: torch.full((n, 1), float(n))))
            for n in (5, 3, 8)]
    pooled = pooled_samples(runs)
    assert pooled.flatten().tolist() == [5.0] * 3 + [3.0] * 3 + [8.0] * 3


@pytest.fixture(scope="module")
def lenet_teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lenet") / "lenet.pt"
    torch.save(create_model("lenet5", 10, (1, 32, 32)).state_dict(), path)
    return path


def compress(teacher, out, *extra):
    argv = ["compress", teacher, "--arch", "lenet5", "--student", "lenet5_half", "--out", out, "--device", "cpu",
            "--format", "json", *extra]
    return CliRunner().invoke(app, [str(a) for a in argv])


@pytest.mark.slow
def test_auto_races_then_the_leader_takes_the_rest(lenet_teacher, tmp_path):
    result = compress(lenet_teacher, tmp_path / "run", "--time-budget", "12s", "--race-share", "0.5",
                      "-s", "train.batch_size=32", "-s", "train.holdout=32", "-s", "train.eval_every=5")
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    race = report["run"]["race"]
    entrants = {row["recipe"]: row for row in race["entrants"]}
    policy_race = [name for name in choose_rule(False, (1, 32, 32), "cpu", 12).race if name in race_entrants(False)]
    assert set(entrants) == set(policy_race) and len(entrants) > 1 and race["share"] == 0.5
    assert race["winner"] == max(entrants, key=lambda name: entrants[name]["pooled_agreement"])
    assert report["run"]["recipe"] == race["winner"]
    assert report["run"]["steps"] > entrants[race["winner"]]["steps"]  # the leader trained on after the race
    assert all(row["seconds"] <= 12 * 0.5 / len(entrants) + 5 for row in race["entrants"])  # slices (+ one step)
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["run"]["recipe"] == race["winner"] and config["recipe"]["name"] == race["winner"]


@pytest.mark.parametrize("args, message", [
    (["-s", "synth.lr=0.1"], "--recipe auto races several"),
    (["--race-share", "1.5"], "--race-share must be between 0 and 1"),
])
def test_race_settings_that_cannot_apply_are_one_line_errors(lenet_teacher, tmp_path, args, message):
    result = compress(lenet_teacher, tmp_path / "run", "--steps", "2", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "run").exists()
