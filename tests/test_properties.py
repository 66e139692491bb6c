"""Property tests: the checkpoint loader and the recipe parser take any input and either succeed or
raise DfkdError (a one-line message, exit 2), never another exception (a traceback)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dfkd_cli.checkpoint import CHECKPOINT_SUFFIXES, read_state_dict
from dfkd_cli.config import RecipeConfig, build_recipe, parse_toml, recipe_path
from dfkd_cli.errors import DfkdError
from dfkd_cli.synth import SYNTHESIZERS
from dfkd_cli.toml_out import dump_toml

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _small_state() -> dict[str, torch.Tensor]:
    """A real checkpoint, kept small so that failing examples print short: conv, BatchNorm (with its
    int64 counter) and a linear head, about 200 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _torch_bytes(obj: object, zip_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_format)
    return buffer.getvalue()


STATE = _small_state()
VALID = {".pt": _torch_bytes(STATE), ".safetensors": safetensors.torch.save(STATE),
         "legacy": _torch_bytes(STATE, zip_format=False)}
SUFFIXES = st.sampled_from([*CHECKPOINT_SUFFIXES, "", ".txt", ".PT", ".npz", ".safetensors.pt", ".tar.gz"])


@contextmanager
def _written(data: bytes, suffix: str) -> Iterator[Path]:
    """``data`` in a temporary file named with ``suffix`` (hypothesis runs many examples per test)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"checkpoint{suffix}"
        path.write_bytes(data)
        yield path


def _load_or_refuse(data: bytes, suffix: str) -> dict[str, torch.Tensor] | None:
    """The loaded tensors, or None when the loader refused the file with a DfkdError."""
    with _written(data, suffix) as path:
        try:
            state = read_state_dict(path)
        except DfkdError as err:
            assert err.message and "\n" not in err.message, err.message
            return None
    assert isinstance(state, dict) and state
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    return state


@FUZZ
@given(data=st.binary(max_size=4096), suffix=SUFFIXES)
def test_arbitrary_bytes_load_or_are_refused(data: bytes, suffix: str) -> None:
    _load_or_refuse(data, suffix)


@st.composite
def damaged(draw: st.DrawFn, kind: str) -> bytes:
    """A valid checkpoint of ``kind`` with some bytes flipped, a slice cut out, or truncated."""
    data = bytearray(VALID[kind])
    how = draw(st.sampled_from(["flip", "truncate", "cut", "header"]))
    if how == "truncate":
        return bytes(data[: draw(st.integers(1, len(data) - 1))])
    if how == "cut":
        start = draw(st.integers(0, len(data) - 2))
        return bytes(data[:start] + data[draw(st.integers(start + 1, len(data))):])
    # "header" flips bytes where the structure lives: the safetensors JSON or the zip's pickle and directory.
    low, high = (0, 300) if how == "header" else (0, len(data) - 1)
    for _ in range(draw(st.integers(1, 8))):
        where = draw(st.integers(low, min(high, len(data) - 1)))
        data[where] = draw(st.integers(0, 255))
    if how == "header" and kind == ".pt":  # the zip directory and data.pkl sit at the end
        for _ in range(draw(st.integers(1, 8))):
            where = draw(st.integers(max(0, len(data) - 1500), len(data) - 1))
            data[where] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(data=damaged(".safetensors"), suffix=SUFFIXES)
def test_damaged_safetensors_load_or_are_refused(data: bytes, suffix: str) -> None:
    _load_or_refuse(data, suffix)


@FUZZ
@given(data=damaged(".pt"), suffix=SUFFIXES)
def test_damaged_torch_files_load_or_are_refused(data: bytes, suffix: str) -> None:
    _load_or_refuse(data, suffix)


@FUZZ
@given(data=damaged("legacy"), suffix=SUFFIXES)
def test_damaged_legacy_torch_files_load_or_are_refused(data: bytes, suffix: str) -> None:
    _load_or_refuse(data, suffix)


TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 3), max_size=3), st.sampled_from([torch.float32, torch.int64, torch.bool]))
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
SAVED_KEYS = st.sampled_from(["state_dict", "model", "net", "module.fc.weight", "epoch", "args"]) | st.text(max_size=6)
SAVED = st.recursive(SCALARS | TENSORS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    SAVED_KEYS | st.integers(), inner, max_size=4) | st.tuples(inner, inner), max_leaves=12)


@FUZZ
@given(obj=SAVED, zip_format=st.booleans())
def test_whatever_torch_save_wrote_loads_or_is_refused(obj: object, zip_format: bool) -> None:
    """Nested dicts, lists and tuples of tensors and plain values, as training scripts save them."""
    _load_or_refuse(_torch_bytes(obj, zip_format), ".pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin", ""])
def test_valid_checkpoints_load_under_any_suffix(suffix: str) -> None:
    for data in VALID.values():
        state = _load_or_refuse(data, suffix)
        assert state is not None and state.keys() == STATE.keys()


# ---- recipes -------------------------------------------------------------------------------------

TABLES = ["recipe", "synth", "synth.loss", "train"]
KEYS = ["name", "description", "reference", "synthesizer", "requires_bn", "batch_size", "iterations", "lr", "bn", "adv", "steps", "optimizer",
        "temperature", "holdout", "update", "memory_size", "loss", "flip", "keep", "schedule", "eval_every"]
VALUES = ["1", "0", "-1", "0.5", "-0.0", "1e400", "nan", "-inf", "inf", "true", '"adam"', '"deepinversion"',
          '"os.system"', "[1, 2]", "{a = 1}", "1979-05-27", '"""x\ny"""', "99999999999999999999", "0x10", "[]", '""']
SYNTHS = st.sampled_from([*SYNTHESIZERS, "gan", "os.system", ""])


@st.composite
def toml_ish(draw: st.DrawFn) -> str:
    """Recipe-shaped TOML: known tables and keys with odd values, plus random junk lines."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        table = draw(st.sampled_from(TABLES + ["run", "train.x", "[train]"]))
        lines.append(f"[{table}]")
        if table == "recipe":
            lines.append(f'synthesizer = "{draw(SYNTHS)}"')
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.sampled_from(KEYS) | st.text(min_size=1, max_size=8))
            value = draw(st.sampled_from(VALUES) | st.text(max_size=12))
            lines.append(f"{key} = {value}" if draw(st.booleans()) else f'"{key}" = {value}')
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=40)))
    return "\n".join(lines)


def _build_or_refuse(text: str, overrides: list[str]) -> None:
    """Build the recipe; a refusal must be a one-line DfkdError, a success a config of sane numbers."""
    try:
        config = build_recipe(parse_toml(text, "fuzz.toml"), overrides, default_name="fuzz")
    except DfkdError as err:
        assert err.message and "\n" not in err.message and "\r" not in err.message, err.message
        return
    for key, value in _numbers(config):
        assert math.isfinite(value) and value >= 0, (key, value)
    assert config.train.batch_size >= 1 and config.train.steps >= 1 and config.train.lr > 0
    # A run writes its recipe into config.toml, which `--config` reads back: it must round-trip.
    again = build_recipe(parse_toml(dump_toml(config.to_dict()), "config.toml"), [])
    assert again.to_dict() == config.to_dict()


def _numbers(config: RecipeConfig) -> list[tuple[str, float]]:
    tables = {"train": dataclasses.asdict(config.train), "synth": dataclasses.asdict(config.synth), "loss": config.loss}
    return [(f"{table}.{key}", value) for table, values in tables.items() for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


@FUZZ
@given(text=toml_ish())
def test_recipe_text_builds_or_is_refused(text: str) -> None:
    _build_or_refuse(text, [])


@FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_text_builds_or_is_refused(text: str) -> None:
    _build_or_refuse(text, [])


OVERRIDE_KEYS = st.sampled_from([f"{t}.{k}" for t in TABLES for k in KEYS] + ["train", "synth", "x.y", "train..lr", ""])


@st.composite
def override(draw: st.DrawFn) -> str:
    """A ``key=value`` override: a known or random key with a TOML-ish or random value."""
    key = draw(OVERRIDE_KEYS | st.text(max_size=12))
    value = draw(st.sampled_from(VALUES) | st.text(max_size=20))
    return draw(st.sampled_from([f"{key}={value}", f" {key} = {value} ", key, f"{key}=={value}"]))


@FUZZ
@given(recipe=st.sampled_from(["noise", "deepinversion", "zskd", "fast", "dafl", "prior-kd"]),
       overrides=st.lists(override(), max_size=4))
def test_overrides_build_or_are_refused(recipe: str, overrides: list[str]) -> None:
    _build_or_refuse(recipe_path(recipe).read_text(encoding="utf-8"), overrides)


PLAIN = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20)


@FUZZ
@given(table=st.dictionaries(st.text(alphabet="abcdefgh_", min_size=1, max_size=6),
                             PLAIN | st.lists(PLAIN.filter(lambda v: v is not None), max_size=3), max_size=6))
def test_dump_toml_writes_what_parse_toml_reads_back(table: dict) -> None:
    """Run configs hold paths and recipe text of any characters; config.toml must read back the same."""
    back = parse_toml(dump_toml({"run": table}), "config.toml").get("run", {})
    expected = {k: v for k, v in table.items() if v is not None}  # dump_toml leaves out None
    assert json.dumps(back, sort_keys=True, default=str) == json.dumps(expected, sort_keys=True, default=str)


def test_the_fuzzers_also_produce_valid_configs() -> None:
    """Guards the properties above against vacuity: the parser does accept the usual inputs."""
    config = build_recipe(parse_toml('[recipe]\nsynthesizer = "noise"\n[train]\nlr = 0.5', "x"), ["train.steps=3"])
    assert config.train.lr == 0.5 and config.train.steps == 3
