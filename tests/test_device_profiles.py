"""Device profiles: recipe files hold the papers' settings, and their ``[cpu]`` table the settings a
CPU run gets; ``-s`` and a ``--config`` file's tables win over it, on either device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dfkd_cli.config import build_recipe, list_recipes, load_recipe, merge_tables, read_toml, recipe_path
from dfkd_cli.device_profile import flat_profile
from dfkd_cli.errors import DfkdError
from dfkd_cli.runconfig import resolve_compress
from dfkd_cli.synth.generator import resolve_generator_size
from dfkd_cli.text.options import resolve_text
from dfkd_cli.toml_out import dump_toml

import kit

# What a CPU run of these recipes got before the [cpu] tables existed (the numbers their comments
# document as measured on a 2-core CPU): a CPU run must still get exactly these.
CPU_BEFORE = {
    "fast": {"synth.batch_size": 64, "synth.warmup": 2, "synth.ngf": "auto", "train.steps_per_round": 20},
    "dfad": {"synth.batch_size": "auto", "synth.ngf": "auto", "synth.schedule": "constant", "train.steps": 5000,
             "train.batch_size": 128, "train.lr": 0.01},
    "zskd": {"synth.iterations": 20, "synth.lr": 0.1, "synth.batch_size": 256},
}
# The papers' settings, as the same files' comments give them.
PAPER = {
    "fast": {"synth.batch_size": 256, "synth.warmup": 20, "synth.ngf": "auto", "train.steps_per_round": 400},
    "dfad": {"synth.batch_size": "auto", "synth.ngf": "auto", "synth.schedule": "step", "synth.schedule_steps": 25000,
             "train.steps": 125000, "train.batch_size": 256, "train.lr": 0.1},
    "zskd": {"synth.iterations": 1500, "synth.lr": 0.01, "synth.batch_size": 256},
}


def dotted(config: Any) -> dict[str, Any]:
    """A resolved recipe as dotted key -> value (``synth.loss.bn``, ``train.lr``, ...)."""
    tables = config.to_dict()
    return {**{f"synth.{k}": v for k, v in tables["synth"].items() if k != "loss"},
            **{f"synth.loss.{k}": v for k, v in tables["synth"]["loss"].items()},
            **{f"train.{k}": v for k, v in tables["train"].items()}}


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_builds_for_both_devices_and_differs_only_by_its_cpu_table(name):
    profile = flat_profile(read_toml(recipe_path(name)).get("cpu", {}))
    cpu, cuda = dotted(load_recipe(name, device_type="cpu")), dotted(load_recipe(name, device_type="cuda"))
    assert {key for key in cpu if cpu[key] != cuda[key]} == set(profile)  # no [cpu] key repeats a paper value
    assert {key: cpu[key] for key in profile} == profile


@pytest.mark.parametrize("name", sorted(CPU_BEFORE))
def test_a_cpu_gets_the_settings_it_got_before_and_a_gpu_the_papers(name):
    cpu, cuda = dotted(load_recipe(name, device_type="cpu")), dotted(load_recipe(name, device_type="cuda"))
    assert {key: cpu[key] for key in CPU_BEFORE[name]} == CPU_BEFORE[name]
    assert {key: cuda[key] for key in PAPER[name]} == PAPER[name]
    assert load_recipe(name).to_dict() == load_recipe(name, device_type="cpu").to_dict()  # CPU is the default


def test_fast_on_a_gpu_gets_the_papers_generator_width():
    config = load_recipe("fast", device_type="cuda").synth
    resolve_generator_size(config, (3, 32, 32), torch.device("cuda"))  # a device object needs no GPU
    assert (config.ngf, config.batch_size, config.warmup) == (64, 256, 20)


def test_overrides_win_over_the_cpu_table():
    assert load_recipe("fast", ["synth.batch_size=32", "train.steps_per_round=7"]).synth.batch_size == 32
    assert load_recipe("fast", ["train.steps_per_round=7"], device_type="cpu").train.steps_per_round == 7
    assert load_recipe("fast", ["synth.warmup=5"], device_type="cuda").synth.warmup == 5


def _fast_with(profile: Any) -> dict[str, Any]:
    data = read_toml(recipe_path("fast"))
    data["cpu"] = profile
    return data


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("profile, message", [
    ({"synth.bach_size": 64}, r"^unknown key 'synth.bach_size' in the \[cpu\] table; did you mean 'synth.batch_size'\?"),
    ({"synth.loss.tv": 1.0}, r"^unknown key 'synth.loss.tv' in the \[cpu\] table"),
    ({"recipe.requires_bn": False}, r"^unknown key 'recipe.requires_bn' in the \[cpu\] table; its keys are dotted synth"),
    ({"batch_size": 64}, r"^unknown key 'batch_size' in the \[cpu\] table"),
    ({"synth.lr": 1, "synth": {"lr": 2}}, r"^the \[cpu\] table sets 'synth.lr' twice"),
    (5, r"^\[cpu\] must be a table"),
])
def test_a_bad_cpu_table_is_a_one_line_error_on_either_device(device, profile, message):
    with pytest.raises(DfkdError, match=message) as err:
        build_recipe(_fast_with(profile), [], default_name="fast", device_type=device)
    assert "\n" not in err.value.message


def test_bare_dotted_keys_read_like_quoted_ones():
    nested = build_recipe(_fast_with({"synth": {"batch_size": 16, "loss": {"bn": 2.0}}}), [], device_type="cpu")
    assert (nested.synth.batch_size, nested.loss["bn"], nested.train.steps_per_round) == (16, 2.0, 400)


def test_a_recipe_without_a_cpu_table_builds_the_same_on_both_devices():
    data = read_toml(recipe_path("fast"))
    del data["cpu"]
    cpu, cuda = (build_recipe(data, [], default_name="fast", device_type=d) for d in ("cpu", "cuda"))
    assert cpu.to_dict() == cuda.to_dict() and cpu.synth.batch_size == 256
    assert load_recipe("noise", device_type="cpu").to_dict() == load_recipe("noise", device_type="cuda").to_dict()


def _on(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Runs resolve ``--device`` to ``device`` (a device object needs no GPU)."""
    for module in ("dfkd_cli.runconfig", "dfkd_cli.text.options"):
        monkeypatch.setattr(f"{module}.resolve_device", lambda _name: torch.device(device))


@pytest.mark.parametrize("device, batch", [("cpu", 64), ("cuda", 256)])
def test_compress_options_follow_the_device(monkeypatch, device, batch):
    _on(monkeypatch, device)
    flags = {"teacher": "/nowhere/t.pt", "arch": "resnet8", "student": "resnet8", "recipe": "fast", "device": "auto"}
    _, [recipe] = resolve_compress(flags, ["train.lr=0.05"], None)
    assert (recipe.synth.batch_size, recipe.train.lr) == (batch, 0.05)


@pytest.mark.parametrize("device, batch", [("cpu", 8), ("cuda", 32)])
def test_text_options_follow_the_device(monkeypatch, tmp_path, device, batch):
    _on(monkeypatch, device)
    mine = tmp_path / "mine.toml"
    mine.write_text(recipe_path("random-text").read_text() + '\n[cpu]\n"train.batch_size" = 8\n')
    _, [recipe] = resolve_text({"teacher": "/nowhere", "recipe": str(mine), "device": "auto"}, [], False, False)
    assert recipe.train.batch_size == batch


def _run_config(path: Path, ran: Any) -> Path:
    """A config.toml as a run writes it: [run] and the resolved recipe tables."""
    run = {"teacher": "/nowhere/t.pt", "arch": "resnet8", "student": "resnet8", "recipe": "fast", "device": "auto"}
    path.write_text(dump_toml({"run": run, **ran.to_dict()}), encoding="utf-8")
    return path


@pytest.mark.parametrize("written_on", ["cpu", "cuda"])
@pytest.mark.parametrize("repeated_on", ["cpu", "cuda"])
def test_a_run_config_repeats_its_numbers_on_either_device(monkeypatch, tmp_path, written_on, repeated_on):
    ran = load_recipe("fast", device_type=written_on)
    _on(monkeypatch, repeated_on)
    _, [again] = resolve_compress({}, [], _run_config(tmp_path / "config.toml", ran))
    assert again.to_dict() == ran.to_dict()


def test_a_config_file_overrides_only_the_cpu_keys_it_sets():
    data = merge_tables(read_toml(recipe_path("fast")), {"train": {"steps_per_round": 7}})
    recipe = build_recipe(data, [], default_name="fast", device_type="cpu")
    assert (recipe.train.steps_per_round, recipe.synth.batch_size, recipe.synth.warmup) == (7, 64, 2)
    own = merge_tables(read_toml(recipe_path("fast")), {"cpu": {"synth.warmup": 3}})
    assert build_recipe(own, [], device_type="cpu").synth.warmup == 3
    assert build_recipe(own, [], device_type="cuda").synth.warmup == 20


def test_recipes_show_list_and_validate_take_the_cpu_table(tmp_path):
    assert "[cpu]" in kit.cli("recipes", "show", "fast").stdout
    assert kit.cli("recipes", "--format", "json").exit_code == 0
    mine = tmp_path / "mine.toml"
    assert kit.cli("recipes", "cp", "fast", mine).exit_code == 0
    assert kit.cli("recipes", "validate", mine).exit_code == 0
    assert "125000 student steps, 5000 on a CPU" in kit.cli("recipes", "validate", recipe_path("dfad")).stdout
    text = mine.read_text()
    mine.write_text(text.replace('"synth.warmup" = 2', '"synth.warmup" = -1'))  # a CPU-only mistake
    result = kit.cli("recipes", "validate", mine)
    assert result.exit_code == 2
    assert "'synth.warmup' must not be negative" in result.stderr and "with the [cpu] table applied" in result.stderr
    mine.write_text(text.replace('"synth.warmup" = 2', '"synth.warmpu" = 2'))
    result = kit.cli("recipes", "validate", mine)
    assert result.exit_code == 2 and "unknown key 'synth.warmpu' in the [cpu] table" in result.stderr
