"""Shared helpers for the end-to-end tests: the CLI in-process and the shrunken settings that make a
``dfkd compress`` run take seconds on one CPU thread, in one place instead of one copy per test file.

    >>> report = kit.report_of(kit.cli(*kit.compress_args(tiny_teacher, out, "dfad", 20, *kit.train(), *kit.generator())))
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from typer.testing import CliRunner, Result

from dfkd_cli import measure
from dfkd_cli.archs import create_model
from dfkd_cli.cli import app
from dfkd_cli.synth import RunHooks, StudentView, SynthContext, synthesizer_class
from dfkd_cli.synth.context import StepCallback, never_stop, no_progress

CPU_JSON = ("--device", "cpu", "--format", "json")
# The student's side of a run: small batches, a small held-out set, a few agreement evaluations.
TRAIN = {"batch_size": 16, "holdout": 32, "eval_every": 10}
# A generator recipe's generator (dfad, dafl, fast, cmi, ...), shrunk.
GENERATOR = {"batch_size": 16, "ngf": 8, "latent_dim": 16}


def cli(*args: object) -> Result:
    """``dfkd ARGS`` in-process (every argument passed as a string); stdout and stderr kept apart."""
    return CliRunner().invoke(app, [str(a) for a in args])


def overrides(*settings: str) -> list[str]:
    """``-s KEY=VALUE`` for each setting."""
    return [part for setting in settings for part in ("-s", setting)]


def _table(table: str, values: dict[str, Any]) -> list[str]:
    """``-s TABLE.KEY=VALUE`` with each value written as TOML (JSON's strings and booleans are TOML's)."""
    return overrides(*(f"{table}.{key}={json.dumps(value)}" for key, value in values.items()))


def train(**changes: Any) -> list[str]:
    """kit's small student settings as ``-s train.*`` overrides, with ``changes`` replacing or adding keys."""
    return _table("train", {**TRAIN, **changes})


def generator(**changes: Any) -> list[str]:
    """kit's small generator as ``-s synth.*`` overrides, with ``changes`` replacing or adding keys."""
    return _table("synth", {**GENERATOR, **changes})


def synth(**values: Any) -> list[str]:
    """Exactly ``values`` as ``-s synth.*`` overrides (for recipes without a generator)."""
    return _table("synth", values)


def compress_args(teacher: dict, out: Path, recipe: str, steps: int, *extra: object,
                  student: str = "resnet8", seed: int = 0, device: str = "cpu") -> list[object]:
    """``compress`` of the session's tiny teacher (or any dict with ``path`` and ``args``) on the CPU
    (or ``device``), with a JSON report on stdout."""
    return ["compress", teacher["path"], *teacher["args"], "--student", student, "--recipe", recipe,
            "--steps", steps, "--out", out, "--seed", seed, "--device", device, "--format", "json", *extra]


def report_of(result: Result) -> dict[str, Any]:
    """The JSON report of a run that must have succeeded."""
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


def random_teacher(arch: str, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """An untrained ``arch`` whose BatchNorm statistics are those of one batch of random inputs, so its
    outputs depend on its input: straight from initialisation a deep network such as mobilenet_v3
    answers about 1e-10 to everything, and dfkd refuses such a constant teacher."""
    model = create_model(arch, num_classes, input_shape)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(torch.randn(4, *input_shape))
    return model.eval()


@contextlib.contextmanager
def deployment_checks(on: bool) -> Iterator[None]:
    """ONNX export and latency loops on or off inside the block, whatever the current test's marker
    says: for module-scoped runs that tests of both kinds share."""
    before = measure.DEPLOYMENT_CHECKS
    measure.DEPLOYMENT_CHECKS = on
    try:
        yield
    finally:
        measure.DEPLOYMENT_CHECKS = before


def make_synth(synthesizer: str | type, teacher: Any, config: Any = None, loss: dict[str, float] | None = None,
               device: str = "cpu", *, student: nn.Module | None = None, stop: StepCallback = never_stop,
               progress: Callable[[], float] = no_progress, **context: Any) -> Any:
    """A synthesizer (a registered name or a class) built as the pipeline builds one: ``config``
    defaults to the class's ``Config()``, ``student`` is seen through a :class:`StudentView`,
    ``stop`` and ``progress`` are the run's hooks, ``context`` any other :class:`SynthContext` field
    (``precision``, ``prior``, ``world``, ``pool_memory_limit``, ``on_spill``)."""
    cls = synthesizer_class(synthesizer) if isinstance(synthesizer, str) else synthesizer
    view = StudentView(student) if student is not None else None
    built = SynthContext(teacher, torch.device(device), student=view, hooks=RunHooks(progress, stop), **context)
    return cls(built, cls.Config() if config is None else config, {} if loss is None else loss)
