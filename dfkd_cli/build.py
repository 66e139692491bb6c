"""Turn resolved options and a recipe into a :class:`dfkd_cli.distill.Run`: synthesizer, trainer, wiring.

The pipeline builds one run per recipe (a race builds several, the probe a throwaway one of probe
size); everything a run needs is given to :class:`RunBuilder` once, and a synthesizer gets all of
its part in one :class:`~dfkd_cli.synth.SynthContext` when it is built.

Example:
    >>> builder = RunBuilder(opts, teacher, student, device, precision, prior=None, synthetic=None, world=World())
    >>> run = builder.run(recipe, display)
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import torch

from dfkd_cli.config import RecipeConfig
from dfkd_cli.distill import Run
from dfkd_cli.distributed import World
from dfkd_cli.precision import Precision
from dfkd_cli.runtime import Display, pool_memory_limit, seed_everything
from dfkd_cli.selection import Reservoir
from dfkd_cli.synth import StudentView, SynthContext, Synthesizer, synthesizer_class
from dfkd_cli.synth.context import ignore_note
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

    def context(self, recipe: RecipeConfig, student: torch.nn.Module, world: World,
                on_spill: Callable[[str], None] = ignore_note) -> SynthContext:
        """What the synthesizer of ``recipe`` is given: ``student`` is the model its trainer trains."""
        return SynthContext(teacher=self.teacher, device=self.device, precision=self.precision, world=world,
                            prior=self.prior, student=StudentView(student),
                            pool_memory_limit=pool_memory_limit(recipe.train.pool_memory_mb, self.device),
                            on_spill=on_spill)

    def synthesizer(self, recipe: RecipeConfig, context: SynthContext) -> Synthesizer:
        """The recipe's synthesizer, or with ``--from-synthetic`` the saved set's."""
        if self.synthetic is None:
            return synthesizer_class(recipe.recipe.synthesizer)(context, recipe.synth, recipe.loss)
        synth = FromSyntheticSynthesizer(context, FromSyntheticSynthesizer.Config(), {})
        synth.load(self.synthetic)
        return synth

    def run(self, recipe: RecipeConfig, display: Display) -> Run:
        """The run of ``recipe`` (its notes logged on ``display``)."""
        model = self._student()  # the trainer trains this very module, the synthesizer sees it live
        synth = self.synthesizer(recipe, self.context(recipe, model, self.world, on_spill=display.log))
        trainer = StudentTrainer(model, self.teacher.model, recipe.train, self.device,
                                 input_shape=self.teacher.input_shape, precision=self.precision, world=self.world)
        if recipe.train.attention:
            display.log(trainer.attention.note)
        if self.world.active:
            seed_everything(self.opts.seed + self.world.rank)  # same models on every rank, each its own samples
        keep = self.opts.save_synthetic and not synth.capabilities.keeps_pool
        recorder = Reservoir(record_capacity(self.teacher.input_shape)) if keep else None
        if self.opts.compile:
            for module in (trainer.student, synth.generator_module()):
                if module is not None:
                    module.compile()
        return Run(recipe.recipe.name, recipe, synth, trainer, recorder=recorder, autocast=self.precision.autocast)

    def probe_parts(self, recipe: RecipeConfig, batch: int) -> tuple[Synthesizer, StudentTrainer]:
        """A throwaway synthesizer and trainer of ``batch`` samples per step, on a copy of the
        student (for :func:`dfkd_cli.probe.probe_run`)."""
        small = dataclasses.replace(recipe, synth=_with_batch(recipe.synth, batch),
                                    train=dataclasses.replace(recipe.train, batch_size=batch))
        student = copy.deepcopy(self.student) if self.student is not None else build_student(self.opts.student, self.teacher)
        synth = self.synthesizer(small, self.context(small, student, World()))  # the probe's own: no collectives
        trainer = StudentTrainer(student, self.teacher.model, small.train, self.device,
                                 input_shape=self.teacher.input_shape, precision=self.precision)
        return synth, trainer


def _with_batch(config: Any, batch: int) -> Any:
    if config is None or not hasattr(config, "batch_size"):
        return config
    return dataclasses.replace(config, batch_size=batch)
