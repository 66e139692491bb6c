"""Recipes as data: typed settings, overrides, and one-line errors that list the valid keys."""

from __future__ import annotations

import tomllib

import pytest

from dfkd_cli.config import (
    TrainConfig,
    build_recipe,
    list_recipes,
    load_recipe,
    parse_override,
    read_toml,
    recipe_path,
)
from dfkd_cli.errors import DfkdError
from dfkd_cli.toml_out import dump_toml


def test_shipped_recipes_all_validate():
    names = list_recipes()
    assert {"noise", "deepinversion"} <= set(names)
    for name in names:
        cfg = load_recipe(name)
        assert cfg.recipe.name == name
        assert cfg.recipe.description, f"{name} has no description"
        assert cfg.recipe.reference, f"{name} cites no paper"


def test_deepinversion_recipe_holds_paper_settings():
    cfg = load_recipe("deepinversion")
    assert cfg.recipe.requires_bn
    assert set(cfg.loss) == {"ce", "bn", "tv_l1", "tv_l2", "l2"}
    assert cfg.loss["bn"] > 0 and cfg.loss["ce"] > 0
    assert cfg.train.loss == "kl" and cfg.train.temperature > 1


def test_overrides_are_typed():
    cfg = load_recipe("deepinversion", ["train.lr=0.01", "synth.iterations=7", "synth.loss.bn=5", "synth.flip=false"])
    assert cfg.train.lr == 0.01
    assert cfg.synth.iterations == 7
    assert cfg.loss["bn"] == 5.0
    assert cfg.synth.flip is False


def test_int_given_for_float_is_accepted_but_not_the_reverse():
    assert load_recipe("noise", ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(DfkdError, match="'train.steps' must be int"):
        load_recipe("noise", ["train.steps=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'; did you mean 'train.lr'.*valid keys: train.steps"),
        ("synth.loss.bogus=1", "unknown loss term 'synth.loss.bogus'.*valid terms: ce, bn"),
        ("train.optimizer=lbfgs", "'train.optimizer' must be one of sgd, adam"),
        ("train.flip=yes", "'train.flip' must be bool"),
        ("lr=0.1", "must start with recipe., synth. or train."),
        ("train.lr", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(DfkdError, match=message):
        load_recipe("deepinversion", [override])


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(DfkdError, match="unknown recipe 'deepinversio'; did you mean: deepinversion"):
        recipe_path("deepinversio")


def test_unknown_table_and_synthesizer_are_errors():
    with pytest.raises(DfkdError, match="unknown recipe table"):
        build_recipe({"recipe": {"synthesizer": "noise"}, "model": {}}, [])
    with pytest.raises(DfkdError, match="unknown synthesizer 'gan'"):
        build_recipe({"recipe": {"synthesizer": "gan"}}, [])


def test_parse_override_reads_toml_literals():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("recipe.name=mine") == ("recipe.name", "mine")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_resolved_config_round_trips_through_toml():
    cfg = load_recipe("deepinversion", ["train.steps=3"])
    text = dump_toml({"run": {"teacher": "/x/t.pt", "input_shape": [1, 32, 32], "student": None}, **cfg.to_dict()})
    data = tomllib.loads(text)
    assert data["run"] == {"teacher": "/x/t.pt", "input_shape": [1, 32, 32]}
    again = build_recipe({k: v for k, v in data.items() if k != "run"}, [])
    assert again.to_dict() == cfg.to_dict()


def test_bad_toml_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(DfkdError, match="is not valid TOML"):
        read_toml(bad)


def test_train_defaults_are_sane():
    cfg = TrainConfig()
    assert cfg.holdout >= 2 and cfg.eval_every > 0 and cfg.steps_per_round > 0


@pytest.mark.parametrize("setting", ["train.flip=true", "train.crop_pad=4", "train.update=\"replay\"", "train.channels_last=false"])
def test_a_text_recipe_refuses_image_only_train_settings(setting) -> None:
    data = read_toml(recipe_path("random-text"))
    build_recipe(data, [])  # the shipped file itself is fine
    with pytest.raises(DfkdError, match=rf"^{setting.split('=')[0]} = .* applies to image students only"):
        build_recipe(data, [setting])
    build_recipe(read_toml(recipe_path("dfad")), [setting])  # an image recipe takes it
