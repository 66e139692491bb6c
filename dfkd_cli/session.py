"""The run every teacher family shares: supervised distillation, then the facts the report records.

A family (images: :mod:`dfkd_cli.pipeline`; text: :mod:`dfkd_cli.text.pipeline`) loads and checks
its inputs and knows how to build a :class:`~dfkd_cli.distill.Run` of a recipe (a synthesizer and a
trainer of its batch type) and how to publish the selected student. Everything between is here,
one code path for both: the budget and stop requests, the :class:`~dfkd_cli.supervise.Supervisor`
(checkpoints, ``--resume``, divergence rollback, clean stops), one recipe or a race
(:func:`~dfkd_cli.race.distill_recipes`), several processes, selection of the student, and the
``run`` facts of the report.

Example:
    >>> session = Session(out, device, World(), precision, display, teacher.sha256, None, started)
    >>> done = distill_session(session, recipes, builder.run, Budgeting(600.0, paces=False, elapsed=4.2),
    ...                        settings, race_share=0.15)
    >>> done.run_info["steps"], done.holdout[:2]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dfkd_cli.batches import Batch
from dfkd_cli.config import RecipeConfig
from dfkd_cli.distill import Run
from dfkd_cli.distributed import World
from dfkd_cli.errors import DfkdError
from dfkd_cli.precision import Precision
from dfkd_cli.race import distill_recipes
from dfkd_cli.rundir import claim_out_dir
from dfkd_cli.runtime import Budget, Display, StopRequest, hardware_description, resolve_device
from dfkd_cli.selection import stability
from dfkd_cli.supervise import Supervisor

MakeRun = Callable[[RecipeConfig], Run]  # a family's builder: the Run of a recipe
Settings = Callable[[Run], str]  # checkpoints/run.toml for a run: what --resume repeats


@dataclass(frozen=True)
class Session:
    """Where and how a run happens: resolved once, before any distillation."""

    out: Path
    device: torch.device
    world: World
    precision: Precision
    display: Display
    teacher_sha256: str
    resume: dict[str, Any] | None  # the checkpoint a --resume continues (see dfkd_cli.resume.resume_state)
    started: datetime  # when the command began (loading counts as part of the run)


@dataclass(frozen=True)
class Budgeting:
    """The distillation's share of ``--time-budget`` (None: no budget), whether schedules follow
    the clock, and the seconds already used (loading, planning) that count against it."""

    seconds: float | None
    paces: bool
    elapsed: float


@dataclass
class Distillation:
    """What distillation hands to a family's publishing: the finished run (its student selected),
    the held-out samples (first half selected the student, second half is reported), the race
    table, and the ``run`` facts of the report."""

    run: Run
    holdout: Batch
    race: dict[str, Any] | None
    run_info: dict[str, Any]


@contextlib.contextmanager
def run_processes(out: Path, overwrite: bool, resume: bool, inputs: list[Path | None], device: str
                  ) -> Iterator[tuple[World, torch.device]]:
    """The processes of the run (one, or the ranks of ``--nproc``) and their device, for the whole
    run. Rank 0 checks, locks and writes ``out`` (see :func:`dfkd_cli.rundir.claim_out_dir`); the
    other ranks write nothing (and may see another file system)."""
    world = World.from_env()
    with claim_out_dir(out, overwrite, resume, inputs) if world.is_main else contextlib.nullcontext():
        if resume and world.active:
            raise DfkdError("--resume continues single-process runs; distributed runs do not checkpoint yet")
        where = world.device(resolve_device(device))
        world.start(where)
        try:
            yield world, where
        finally:
            world.stop()


def distill_session(session: Session, recipes: list[RecipeConfig], make_run: MakeRun, budgeting: Budgeting,
                    settings: Settings, race_share: float) -> Distillation | None:
    """Distil one recipe (several race) under the supervisor and select the student. Every rank of a
    distributed run trains; rank 0 alone gets the result (the others None)."""
    world, resume = session.world, session.resume
    with StopRequest() as stop:
        used = (resume["elapsed"] if resume else 0.0) + budgeting.elapsed
        used = world.maximum([used])[0] if world.active else used  # one clock for every rank
        budget = Budget(budgeting.seconds, used, stop, world)
        budget.paces = world.any(budgeting.paces)  # every rank on one schedule
        supervisor = Supervisor(session.out, recipes[0].train, budget, session.display, session.teacher_sha256,
                                settings, resume)
        run, holdout, race = distill_recipes(recipes, make_run, budget, session.display, supervisor, race_share)
    # the trained weights, not the selected ones: a selected starting student is the same on every rank anyway
    processes = {"count": world.size, "identical_students": world.identical(run.trainer.student)} if world.active else None
    run.trainer.restore_best()
    if not world.is_main:
        return None
    return Distillation(run, holdout, race, _run_facts(session, run, race, supervisor, processes))


def _run_facts(session: Session, run: Run, race: dict[str, Any] | None, supervisor: Supervisor,
               processes: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``run`` facts that every family records."""
    resume = session.resume
    return {"started": session.started.isoformat(timespec="seconds"), "device": str(session.device),
            "hardware": hardware_description(session.device), "steps": run.trainer.steps_done,
            "best_step": run.trainer.kept.step, "out": str(session.out), "stability": stability(run.curve),
            "race": race, "resumed_from_step": resume["run"]["trainer"]["steps_done"] if resume else None,
            "precision": session.precision.name, "throughput": run.meter.to_dict(), "processes": processes,
            "health": {**supervisor.report(), "warnings": supervisor.warnings}}
