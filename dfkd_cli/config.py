"""Recipes and run configs: TOML data parsed into typed, validated settings.

A recipe file (``recipes/NAME.toml``) has four tables: ``[recipe]`` (what it is), ``[synth]``
(the synthesizer's settings), ``[synth.loss]`` (weights of named loss terms) and ``[train]``
(student trainer settings), which hold the paper's settings, and optionally ``[cpu]``: dotted keys
that replace them on a CPU (:mod:`dfkd_cli.device_profile`). ``-s key=value`` overrides any of them
by dotted path, e.g. ``-s train.lr=0.01`` or ``-s synth.loss.bn=5``. Recipe files are data: no key
imports or calls code.

Example:
    >>> cfg = load_recipe("deepinversion", overrides=["train.steps=100"])
    >>> cfg.train.steps
    100
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from dfkd_cli.device_profile import (PROFILE_DEVICE, PROFILE_TABLE, apply_profile, check_profile_keys, flat_profile,
                                     profile_under)
from dfkd_cli.errors import DfkdError, shown
from dfkd_cli.toml_out import toml_value

_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheels carry recipes inside the package; a source checkout keeps them at the top.
_RECIPE_DIRS = (_PACKAGE_DIR / "recipes", _PACKAGE_DIR.parent / "recipes")


@dataclass
class RecipeInfo:
    """What a recipe is: its name, one-line description, paper and requirements."""

    name: str = ""
    description: str = ""
    synthesizer: str = "noise"
    family: str = "image"  # image | text: the teachers the recipe is for
    reference: str = ""
    requires_bn: bool = False


@dataclass
class TrainConfig:
    """Student trainer settings (KD on synthesizer batches)."""

    steps: int = 200  # total student optimisation steps: the run's budget
    steps_per_round: int = 50  # student steps after each synthesize() call
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | constant
    loss: str = "kl"  # kl (KL at temperature T, scaled by T^2) | l1 (logits MAE)
    temperature: float = 20.0
    alpha: float = 0.0  # weight of CE to the teacher's argmax beside the KD term (PromptDFD's Eq. 1); 0 = KD only
    crop_pad: int = 0  # random-crop augmentation padding in pixels on pool samples; 0 = off
    flip: bool = False  # random horizontal flips on pool samples
    mixup: float = 0.0  # blend each student input with another, share ~ Beta(a, a), the teacher labels the blend; 0 = off
    holdout: int = 256  # held-out synthetic samples: half select the student, half are reported
    eval_every: int = 50  # student steps between selections on held-out synthetic agreement
    attention: float = 0.0  # weight of the attention-transfer term (ZSKT's beta); 0 = off
    update: str = "plain"  # plain | replay (KD on a memory of earlier batches too) | lra (retain while acquiring)
    memory_size: int = 4096  # samples in the ring-buffer memory bank of earlier synthetic batches (replay, lra)
    memory_batch: int = 0  # memory samples per retention step; 0 = train.batch_size
    lra_inner_lr: float = 0.0  # alpha of lra's inner SGD step; 0 = the student's current learning rate
    lra_order: str = "exact"  # exact (second order, through the inner step) | first (first-order approximation)
    checkpoint_every: int = 2000  # student steps between resumable checkpoints in OUT/checkpoints; 0 = off
    checkpoint_minutes: float = 10.0  # ... and minutes between them, whichever comes first; 0 = off
    channels_last: bool = True  # teacher and student in NHWC memory format (1.05x-1.4x faster steps on CPU, more on GPU)
    pool_memory_mb: float = 0.0  # synthetic pool held in memory before older samples spill to disk; 0 = a quarter of the device's memory
    max_retries: int = 3  # rollbacks to the last good state (at a lower learning rate) before a diverging run aborts

    def __post_init__(self) -> None:
        for key in ("update", "lra_order"):
            choices = _CHOICES[f"train.{key}"]
            if getattr(self, key) not in choices:
                raise DfkdError(f"'train.{key}' must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if self.nesterov and self.momentum <= 0:
            raise DfkdError("'train.nesterov' needs a positive 'train.momentum'; set one or turn nesterov off")
        if self.memory_size < 1:
            raise DfkdError(f"'train.memory_size' must be at least 1, got {self.memory_size}")
        if self.memory_batch < 0:
            raise DfkdError(f"'train.memory_batch' must be 0 (train.batch_size) or positive, got {self.memory_batch}")
        if self.lra_inner_lr < 0:
            raise DfkdError(f"'train.lra_inner_lr' must be 0 (the student's lr) or positive, got {self.lra_inner_lr}")
        if not 0 <= self.alpha <= 1:
            raise DfkdError(f"'train.alpha' must be between 0 (KD only) and 1 (CE to the teacher's argmax only), got {self.alpha}")
        for key in ("checkpoint_every", "checkpoint_minutes", "max_retries"):
            if not getattr(self, key) >= 0:  # also refuses NaN
                raise DfkdError(f"'train.{key}' must be 0 (off) or positive, got {getattr(self, key)}")


_CHOICES = {
    "recipe.family": ("image", "text"),
    "train.optimizer": ("sgd", "adam"),
    "train.schedule": ("cosine", "constant"),
    "train.loss": ("kl", "l1"),
    "train.update": ("plain", "replay", "lra"),
    "train.lra_order": ("exact", "first"),
}
# Every number in a recipe is a count, a rate, a weight or a scale: finite and not negative. These
# must also be above zero (a zero batch, step count or learning rate stalls or divides by zero).
_POSITIVE = frozenset({
    "train.steps", "train.steps_per_round", "train.batch_size", "train.eval_every", "train.lr", "train.temperature",
    "synth.batch_size", "synth.lr", "synth.latent_dim", "synth.ngf",
})
_INT64_MAX = 2**63 - 1  # what torch can hold; TOML integers are 64-bit too
_TABLES = ("recipe", "synth", "train")  # the main tables; [cpu] (PROFILE_TABLE) may follow them


@dataclass
class RecipeConfig:
    """A resolved recipe: info, synthesizer settings (a dict validated by the synthesizer's own
    dataclass), loss weights and trainer settings."""

    recipe: RecipeInfo = field(default_factory=RecipeInfo)
    synth: Any = None
    loss: dict[str, float] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        synth = dataclasses.asdict(self.synth) if self.synth is not None else {}
        return {
            "recipe": dataclasses.asdict(self.recipe),
            "synth": {**synth, "loss": dict(self.loss)},
            "train": dataclasses.asdict(self.train),
        }


def recipe_dir() -> Path:
    """The folder holding the shipped recipe files."""
    for candidate in _RECIPE_DIRS:
        if candidate.is_dir():
            return candidate
    raise RuntimeError("dfkd's recipes folder is missing from the installation")  # a packaging bug


def list_recipes() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(p.stem for p in recipe_dir().glob("*.toml"))


def recipe_path(name: str) -> Path:
    """Path of the shipped recipe ``name``, looked up among the shipped names (never joined into a
    path, so ``../x`` reads nothing); unknown names raise with the close matches."""
    names = list_recipes()
    if name not in names:
        close = difflib.get_close_matches(Path(name).stem if name.endswith(".toml") else name, names, n=3, cutoff=0.5)
        hint = f"did you mean: {', '.join(close)}? " if close else ""
        file_hint = (" (a recipe file is given as --recipe FILE.toml to compress, or checked with `dfkd recipes "
                     "validate FILE`)") if name.endswith(".toml") or "/" in name or "\\" in name else " (see `dfkd recipes`)"
        raise DfkdError(f"unknown recipe {shown(name)}; {hint}available: {', '.join(names)}{file_hint}")
    return recipe_dir() / f"{name}.toml"


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or unreadable file or a syntax error is a one-line DfkdError."""
    path = Path(path)
    if path.is_dir():
        raise DfkdError(f"config file '{path}' is a folder; pass the .toml file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DfkdError(f"config file '{path}' not found; check the path") from None
    except UnicodeDecodeError as err:
        raise DfkdError(f"'{path}' is not valid TOML ({err}); fix the file") from None
    except OSError as err:
        raise DfkdError(f"cannot read config file '{path}' ({err.strerror}); check its permissions") from None
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML ``text`` read from ``source`` (named in errors); a syntax error is a one-line DfkdError.

    Example:
        >>> parse_toml("[train]\\nlr = 0.1", "mine.toml")
        {'train': {'lr': 0.1}}
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DfkdError(f"'{source}' is not valid TOML ({err}); fix the file") from None
    except ValueError:  # Python refuses integers of over 4300 digits
        raise DfkdError(f"'{source}' is not valid TOML (a number is too long); fix the file") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise DfkdError(f"'{source}' is not valid TOML (arrays or tables nested too deeply); fix the file") from None


def load_recipe(name: str, overrides: list[str] | None = None, device_type: str = "cpu") -> RecipeConfig:
    """Load recipe ``name`` from the shipped recipes for a ``device_type`` ("cpu", "cuda") device and
    apply ``key=value`` overrides."""
    return build_recipe(read_toml(recipe_path(name)), overrides or [], default_name=name, device_type=device_type)


def build_recipe(data: dict[str, Any], overrides: list[str], default_name: str = "", device_type: str = "cpu") -> RecipeConfig:
    """Validate recipe ``data`` (as parsed from TOML), apply its ``[cpu]`` table when ``device_type`` is
    "cpu", then the overrides, and return typed settings: the numbers that run on that device."""
    from dfkd_cli.synth import synthesizer_class  # the registry imports heavy modules

    data = _deep_copy(data)
    unknown = set(data) - {*_TABLES, PROFILE_TABLE}
    if unknown:
        raise DfkdError(f"unknown recipe table(s) {sorted(unknown)}; valid tables: {', '.join(_TABLES)}, {PROFILE_TABLE}")
    profile = flat_profile(data.pop(PROFILE_TABLE, {}))  # refuses keys outside synth. and train.
    if device_type == PROFILE_DEVICE:
        apply_profile(data, profile)  # under the overrides, which follow
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    info = _typed(RecipeInfo, data.get("recipe", {}), "recipe")
    info.name = info.name or default_name
    synth_cls = synthesizer_class(info.synthesizer)
    # Checked on every device (a typo in [cpu] should not wait for a CPU run), before [synth] and
    # [train] are typed so that a bad profile key is named as one.
    check_profile_keys(profile, synth_cls, TrainConfig)
    synth_data = data.get("synth", {})
    if not isinstance(synth_data, dict):
        raise DfkdError("[synth] must be a table of key = value settings")
    synth_data = dict(synth_data)
    loss = _loss_weights(synth_data.pop("loss", {}), synth_cls.loss_terms)
    synth = _typed(synth_cls.Config, synth_data, "synth")
    train = _typed(TrainConfig, data.get("train", {}), "train")
    if info.family == "text":
        _refuse_image_only(info.name, train)
    return RecipeConfig(recipe=info, synth=synth, loss=loss, train=train)


# Trainer settings only the image trainer reads (augmentation, attention, retention, memory layout,
# the pool's memory): a text recipe refuses them rather than ignore them.
IMAGE_ONLY_TRAIN = ("crop_pad", "flip", "mixup", "attention", "update", "memory_size", "memory_batch", "lra_inner_lr",
                    "lra_order", "channels_last", "pool_memory_mb")


def _refuse_image_only(name: str, train: TrainConfig) -> None:
    default = TrainConfig()
    for key in IMAGE_ONLY_TRAIN:
        value = getattr(train, key)
        if value != getattr(default, key):
            raise DfkdError(f"train.{key} = {toml_value(value)} applies to image students only; the text recipe '{name}' "
                            "would ignore it: leave it out")


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as a TOML literal, else taken as a plain string.

    Example:
        >>> parse_override("train.lr=0.01")
        ('train.lr', 0.01)
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise DfkdError(f"override {shown(item)} is not key=value; write it like -s train.lr=0.01")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError is a ValueError
        value = raw.strip()
    return key, value


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] not in ("recipe", "synth", "train") or len(parts) < 2:
        raise DfkdError(f"override key {shown(key)} must start with recipe., synth. or train. (e.g. train.lr=0.01)")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DfkdError(f"override key {shown(key)}: {shown(part)} is a value, not a table")
    node[parts[-1]] = value


def _typed(cls: type, values: dict[str, Any], table: str) -> Any:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise DfkdError(f"[{table}] must be a table of key = value settings")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean '{table}.{close[0]}'? " if close else ""
            raise DfkdError(f"unknown key {shown(f'{table}.{key}')}; {hint}valid keys: {', '.join(f'{table}.{k}' for k in valid)}")
        kwargs[key] = _coerce(value, hints[key], f"{table}.{key}")
    config = cls(**kwargs)  # the dataclass's own checks first: their messages are the more specific
    for item in fields(config):
        default = f"the default is {item.default!r}" if item.default is not dataclasses.MISSING else "see the shipped recipes"
        _check_number(getattr(config, item.name), f"{table}.{item.name}", default)
    return config


def _coerce(value: Any, hint: Any, key: str) -> Any:
    kind = hint if isinstance(hint, type) else None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok and abs(value) <= _INT64_MAX else value  # _check_number refuses the rest
    elif kind is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise DfkdError(f"'{key}' must be {kind.__name__ if kind else hint}, got {shown(value)}")
    choices = _CHOICES.get(key)
    if choices and value not in choices:
        raise DfkdError(f"'{key}' must be one of {', '.join(choices)}, got {shown(value)}")
    return value


def _loss_weights(values: dict[str, Any], terms: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(values, dict):
        raise DfkdError("[synth.loss] must be a table of term = weight")
    weights = {}
    for term, weight in values.items():
        if term not in terms:
            raise DfkdError(f"unknown loss term {shown(f'synth.loss.{term}')} for this synthesizer; valid terms: {', '.join(terms)}")
        weights[term] = _coerce(weight, float, f"synth.loss.{term}")
        _check_number(weights[term], f"synth.loss.{term}", "0 turns the term off")
    return weights


def _check_number(value: Any, key: str, hint: str) -> None:
    """Refuse NaN, infinities, negative numbers, integers beyond 64 bits and zero where ``_POSITIVE`` says so."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise DfkdError(f"'{key}' must be a finite number, got {value}; set a number ({hint})")
    if abs(value) > _INT64_MAX:
        raise DfkdError(f"'{key}' is too large (more than 64 bits); set a smaller number ({hint})")
    if key in _POSITIVE and value <= 0:
        raise DfkdError(f"'{key}' must be positive, got {value}; set a number above 0 ({hint})")
    if value < 0:
        raise DfkdError(f"'{key}' must not be negative, got {value}; set 0 or more ({hint})")


def merge_tables(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top``'s keys over ``base``'s, table by table (a run config's recipe tables over a recipe file).
    A key ``top`` sets also leaves ``base``'s ``[cpu]`` table, so the config's number wins on a CPU too."""
    merged = _merge(base, top)
    if PROFILE_TABLE in base:
        merged[PROFILE_TABLE] = profile_under(base[PROFILE_TABLE], top)
    return merged


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def recipe_info(name: str) -> RecipeInfo:
    """The ``[recipe]`` table of a shipped recipe, without building its settings."""
    info = _typed(RecipeInfo, read_toml(recipe_path(name)).get("recipe", {}), "recipe")
    info.name = info.name or name
    return info


def prior_recipes() -> list[str]:
    """Shipped recipes that read ``--prior`` images."""
    from dfkd_cli.synth import synthesizer_class

    return [name for name in list_recipes() if recipe_info(name).family == "image"
            and synthesizer_class(recipe_info(name).synthesizer).capabilities.uses_prior]


def applicable_recipes(teacher: Any) -> list[str]:
    """Shipped image recipes this teacher can use (BatchNorm recipes need a teacher with BatchNorm)."""
    infos = {name: recipe_info(name) for name in list_recipes()}
    return [name for name, info in infos.items() if info.family == "image" and (teacher.has_bn or not info.requires_bn)]
