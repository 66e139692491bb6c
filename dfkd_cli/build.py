"""Turn resolved options and a recipe into a :class:`dfkd_cli.distill.Run`: synthesizer, trainer, wiring.

The pipeline builds one run per recipe (a race builds several, the probe a throwaway one of probe
size); everything a run needs is given to :class:`RunBuilder` once, so no caller sets attributes
on a synthesizer or trainer after the fact.

Example:
    >>> builder = RunBuilder(opts, teacher, student, device, precision, prior=None, synthetic=None, world=World())
    >>> run = builder.run(recipe, display)
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from dfkd_cli.config import RecipeConfig
from dfkd_cli.distill import Run
from dfkd_cli.distributed import World
from dfkd_cli.precision import Precision
from dfkd_cli.runtime import Display, pool_memory_limit, seed_everything
from dfkd_cli.selection import Reservoir
from dfkd_cli.synth import Synthesizer, synthesizer_class
from dfkd_cli.synth.from_synthetic import FromSyntheticSynthesizer
from dfkd_cli.synthetic_set import SyntheticSet, record_capacity
from dfkd_cli.teacher import Teacher, build_student
from dfkd_cli.trainer import StudentTrainer

if TYPE_CHECKING:
    from dfkd_cli.pipeline import CompressOptions
    from dfkd_cli.prior import PriorData


@dataclasses.dataclass
class RunBuilder:
    """Everything shared by the runs of one ``dfkd compress``: the first run gets ``student``,
    later ones (race entrants) a fresh student from the same seed."""

    opts: "CompressOptions"
    teacher: Teacher
    student: torch.nn.Module | None
    device: torch.device
    precision: Precision
    prior: "PriorData | None"
    synthetic: SyntheticSet | None
    world: World

    def _student(self) -> torch.nn.Module:
        if self.student is not None:
            model, self.student = self.student, None
            return model
        seed_everything(self.opts.seed)  # every entrant starts from the same initialisation
        return build_student(self.opts.student, self.teacher)

    def synthesizer(self, recipe: RecipeConfig) -> Synthesizer:
        if self.synthetic is None:
            return synthesizer_class(recipe.recipe.synthesizer)(self.teacher, recipe.synth, recipe.loss, self.device)
        synth = FromSyntheticSynthesizer(self.teacher, FromSyntheticSynthesizer.Config(), {}, self.device)
        synth.load(self.synthetic)
        return synth

    def _wire(self, synth: Synthesizer, trainer: StudentTrainer, recipe: RecipeConfig, world: World) -> None:
        synth.pool.memory_limit = pool_memory_limit(recipe.train.pool_memory_mb, self.device)
        synth.use_precision(self.precision)
        synth.student, synth.prior, synth.world, trainer.world = trainer.student, self.prior, world, world

    def run(self, recipe: RecipeConfig, display: Display) -> Run:
        """The run of ``recipe`` (its notes logged on ``display``)."""
        model = self._student()
        synth = self.synthesizer(recipe)
        synth.pool.on_spill = display.log
        trainer = StudentTrainer(model, self.teacher.model, recipe.train, self.device,
                                 input_shape=self.teacher.input_shape, precision=self.precision)
        self._wire(synth, trainer, recipe, self.world)
        if recipe.train.attention:
            display.log(trainer.attention.note)
        if self.world.active:
            seed_everything(self.opts.seed + self.world.rank)  # same models on every rank, each its own samples
        keep = self.opts.save_synthetic and not synth.keeps_pool
        recorder = Reservoir(record_capacity(self.teacher.input_shape)) if keep else None
        if self.opts.compile:
            for module in (trainer.student, getattr(synth, "generator", None)):
                if module is not None:
                    module.compile()
        return Run(recipe.recipe.name, recipe, synth, trainer, recorder=recorder, autocast=self.precision.autocast)

    def probe_parts(self, recipe: RecipeConfig, batch: int) -> tuple[Synthesizer, StudentTrainer]:
        """A throwaway synthesizer and trainer of ``batch`` samples per step, on a copy of the
        student (for :func:`dfkd_cli.probe.probe_run`)."""
        small = dataclasses.replace(recipe, synth=_with_batch(recipe.synth, batch),
                                    train=dataclasses.replace(recipe.train, batch_size=batch))
        student = copy.deepcopy(self.student) if self.student is not None else build_student(self.opts.student, self.teacher)
        synth = self.synthesizer(small)
        trainer = StudentTrainer(student, self.teacher.model, small.train, self.device,
                                 input_shape=self.teacher.input_shape, precision=self.precision)
        self._wire(synth, trainer, small, World())  # one process's own probe: no collectives
        return synth, trainer


def _with_batch(config: Any, batch: int) -> Any:
    if config is None or not hasattr(config, "batch_size"):
        return config
    return dataclasses.replace(config, batch_size=batch)
