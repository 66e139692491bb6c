"""``--recipe auto``: the recipe that leads for this kind of teacher, read from a policy file.

The policy is data (``recipes/policy/auto.toml``, shipped beside the recipes): rules read top to
bottom, each with the conditions it holds for, the recipe it picks, the recipes that may race and
the benchmark rows it comes from.

Example:
    >>> rule = choose_rule(has_bn=True, input_shape=(1, 32, 32), device="cpu", budget_s=120)
    >>> rule.recipe, rule.name
    ('dfq', 'BatchNorm, small grayscale inputs, short budget on a CPU')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfkd_cli.config import recipe_dir, read_toml
from dfkd_cli.errors import DfkdError

_CONDITIONS = ("batchnorm", "channels", "max_input", "device", "max_budget_s", "min_budget_s")
_SETTINGS = ("train.steps", "train.mixup")  # what a rule may set (a -s or --steps the user gave wins)
FILL_BUDGET = "budget"  # train.steps = "budget": the time budget ends training when it holds more steps


@dataclass(frozen=True)
class Rule:
    """One policy rule (see the policy file's header for the conditions)."""

    name: str
    recipe: str
    race: tuple[str, ...] = ()
    evidence: str = ""
    conditions: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # for the lead recipe, e.g. {"train.steps": 6000}

    def holds(self, has_bn: bool, input_shape: tuple[int, int, int], device: str, budget_s: float | None) -> bool:
        c = self.conditions
        return (("batchnorm" not in c or c["batchnorm"] == has_bn)
                and ("channels" not in c or c["channels"] == input_shape[0])
                and ("max_input" not in c or max(input_shape[1:]) <= c["max_input"])
                and ("device" not in c or c["device"] == device)
                and ("max_budget_s" not in c or (budget_s is not None and budget_s <= c["max_budget_s"]))
                and ("min_budget_s" not in c or (budget_s is not None and budget_s >= c["min_budget_s"])))


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    race_min_steps: int


def policy_path() -> Path:
    return recipe_dir() / "policy" / "auto.toml"


def load_policy(path: Path | None = None) -> Policy:
    """Read and check the policy file (a broken shipped file is a packaging bug, said in one line)."""
    path = path or policy_path()
    data = read_toml(path)
    rules = []
    for index, raw in enumerate(data.get("rule", [])):
        unknown = set(raw) - {"name", "recipe", "race", "evidence", "settings", *_CONDITIONS}
        settings = raw.get("settings", {})
        if unknown or "recipe" not in raw or not isinstance(settings, dict) or set(settings) - set(_SETTINGS):
            raise DfkdError(f"policy '{path}' rule {index + 1}: unknown keys {sorted(unknown)}, no recipe, or settings "
                            f"other than {', '.join(_SETTINGS)}")
        steps = settings.get("train.steps", 1)
        if isinstance(steps, bool) or not (steps == FILL_BUDGET or isinstance(steps, int) and steps > 0):
            raise DfkdError(f"policy '{path}' rule {index + 1}: train.steps must be a positive integer or "
                            f"\"{FILL_BUDGET}\", not {steps!r}")
        mixup = settings.get("train.mixup", 0.0)
        if isinstance(mixup, bool) or not isinstance(mixup, (int, float)) or not mixup >= 0:
            raise DfkdError(f"policy '{path}' rule {index + 1}: train.mixup must be 0 (off) or a positive number, "
                            f"not {mixup!r}")
        rules.append(Rule(name=str(raw.get("name", f"rule {index + 1}")), recipe=str(raw["recipe"]),
                          race=tuple(raw.get("race", ())), evidence=" ".join(str(raw.get("evidence", "")).split()),
                          conditions={k: raw[k] for k in _CONDITIONS if k in raw}, settings=dict(settings)))
    if not rules:
        raise DfkdError(f"policy '{path}' has no [[rule]]")
    return Policy(tuple(rules), int(data.get("race_min_steps", 300)))


def choose_rule(has_bn: bool, input_shape: tuple[int, int, int], device: str, budget_s: float | None,
                policy: Policy | None = None) -> Rule:
    """The first rule that holds for this teacher, device and budget."""
    policy = policy or load_policy()
    for rule in policy.rules:
        if rule.holds(has_bn, input_shape, device, budget_s):
            return rule
    raise DfkdError("no --recipe auto rule fits this teacher; name a recipe with --recipe (see `dfkd recipes`)")


def auto_choice(teacher: Any) -> dict[str, Any]:
    """What ``--recipe auto`` picks for ``teacher`` at the default budget on this machine's device
    (``dfkd inspect``)."""
    from dfkd_cli.autopilot import DEFAULT_TIME_BUDGET_S
    from dfkd_cli.race import race_entrants
    from dfkd_cli.runtime import resolve_device

    device = resolve_device("auto").type
    rule = choose_rule(teacher.has_bn, teacher.input_shape, device, DEFAULT_TIME_BUDGET_S)
    entrants = race_entrants(teacher.has_bn)
    return {"recipe": rule.recipe, "rule": rule.name, "race": [n for n in rule.race if n in entrants],
            "device": device, "budget_s": DEFAULT_TIME_BUDGET_S, "evidence": rule.evidence}
