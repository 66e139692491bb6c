"""Watching a run between student steps: checkpoints, clean stops, divergence and collapse.

- Checkpoints every ``train.checkpoint_every`` steps or ``train.checkpoint_minutes``, whichever
  comes first, and one when the run starts (see :mod:`dfkd_cli.resume`).
- A stop request (Ctrl-C, SIGTERM) ends the run after the current step with a checkpoint and
  exit code 130; ``dfkd compress --resume OUT`` continues it.
- A non-finite loss (or weights) rolls the run back to the last checkpoint, halves the learning
  rate of the component that diverged (the generator when its losses are non-finite, else the
  student) and retries, at most ``train.max_retries`` times before the run aborts (exit 3).
- So does a student loss that explodes while still finite: above ``EXPLOSION_FACTOR`` (10^4) times
  its reference, the median loss of the first ``REFERENCE_STEPS`` (10) student steps this
  supervisor watched (floored at ``REFERENCE_FLOOR``, so a near-zero start does not make the limit
  tiny). Healthy runs lower their loss from the start; a learning rate far too high (e.g.
  ``-s train.lr=1e9``) sends it up by many orders of magnitude within a few steps. A resumed run
  measures its reference again from the steps after the resume.
- A checkpoint is kept only when the student's weights are finite and below ``BROKEN_WEIGHT``
  (:func:`dfkd_cli.validate.broken_weights`), so a rollback never returns to an exploded state.
- A collapsed generator, every sample of ``COLLAPSE_STEPS`` consecutive student batches in one
  teacher class, is reported once as a warning.

Example:
    >>> supervisor = Supervisor(run_dir, recipe.train, budget, display, teacher.sha256, settings)
    >>> distill(run, budget, display, supervisor)
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from dfkd_cli import __version__
from dfkd_cli.config import TrainConfig
from dfkd_cli.distill import Run
from dfkd_cli.distributed import World
from dfkd_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DfkdError
from dfkd_cli.resume import FORMAT, SETTINGS, CheckpointDir, decode, encode, rng_state, set_rng_state
from dfkd_cli.runtime import Budget, Display
from dfkd_cli.validate import broken_weights

COLLAPSE_STEPS = 100
LR_FACTOR = 0.5  # learning-rate multiplier after each rollback
EXPLOSION_FACTOR = 1e4  # a student loss this many times its reference has exploded
REFERENCE_STEPS = 10  # the reference: the median loss of the first watched student steps
REFERENCE_FLOOR = 1e-2


class Supervisor:
    """The :class:`dfkd_cli.distill.StepWatch` of a single run (or a race's leader)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, budget: Budget, display: Display, teacher_sha256: str,
                 settings: Callable[[Run], str], resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.budget, self.display = cfg, budget, display
        self.enabled = cfg.checkpoint_every > 0 or cfg.checkpoint_minutes > 0
        self.folder = CheckpointDir(run_dir)
        self.teacher_sha256, self.settings = teacher_sha256, settings
        self.resume = resume
        self.scales = {"student": 1.0, "synth": 1.0}  # learning-rate multipliers since the start
        self.retries = 0
        self.warnings: list[str] = []
        self._one_class_steps = 0
        self._first_losses: list[float] = []  # of the first REFERENCE_STEPS watched steps: the loss reference
        self._last_good: bytes | None = None
        self._saved_step, self._saved_time = -1, time.monotonic()
        self.world = World()

    @property
    def resuming(self) -> bool:
        return self.resume is not None

    def begin(self, run: Run) -> None:
        """Load the resumed state into ``run`` (built, not started), or checkpoint its start."""
        self.cfg = run.recipe.train  # a race's leader may have its own settings
        self.enabled = self.cfg.checkpoint_every > 0 or self.cfg.checkpoint_minutes > 0
        self.world = run.trainer.world
        if self.world.active:  # every rank holds its own pool and generator batches: no files yet
            self.enabled = False
        if self.resume is None:
            if self.enabled:
                self.folder.remove()  # an earlier unfinished run's checkpoints (--overwrite)
            self.checkpoint(run)
            return
        self._load(run, self.resume)
        self.retries, self.warnings = int(self.resume["retries"]), list(self.resume["warnings"])
        self.display.log(f"resumed at student step {run.trainer.steps_done} "
                         f"({self.budget.elapsed:.0f} s of the budget used)")
        self._last_good, self.resume = encode(self._payload(run)), None
        self._saved_step = run.trainer.steps_done

    def after_step(self, run: Run, loss: float) -> None:
        diverged = _diverged(run, loss, self.world)
        if diverged:
            what = "non-finite generator losses" if diverged == "synth" else f"non-finite student loss ({loss})"
            self._roll_back(run, diverged, what)
            return
        limit = self.loss_limit
        if limit is not None and loss > limit:
            self._roll_back(run, "student", f"student loss {loss:.3g} exploded (above {limit:.3g}, "
                                            f"{EXPLOSION_FACTOR:g}x its median over the first steps)")
            return
        if len(self._first_losses) < REFERENCE_STEPS:
            self._first_losses.append(loss)
        self._watch_collapse(run)
        if self._due(run.trainer.steps_done):
            self.checkpoint(run)

    def end(self, run: Run) -> None:
        """After training: a stop request ends the run here, with a checkpoint to resume from."""
        signal_name = self.budget.stop_requested
        if not self.world.any(bool(signal_name)):
            return
        signal_name = signal_name or "a signal to another process"
        step = run.trainer.steps_done
        if not self.enabled:
            why = ("distributed runs write no checkpoints yet" if self.world.active
                   else "checkpoints are off (train.checkpoint_every = train.checkpoint_minutes = 0)")
            raise DfkdError(f"stopped by {signal_name} at student step {step}; {why}, so the run cannot be resumed",
                            EXIT_INTERRUPTED)
        self.checkpoint(run)
        raise DfkdError(f"stopped by {signal_name} at student step {step}; checkpoint saved, continue with: "
                        f"dfkd compress --resume {self.folder.run_dir}", EXIT_INTERRUPTED)

    @property
    def loss_limit(self) -> float | None:
        """The student loss above which it has exploded; None before the first watched step."""
        if not self._first_losses:
            return None
        return EXPLOSION_FACTOR * max(statistics.median(self._first_losses), REFERENCE_FLOOR)

    def checkpoint(self, run: Run) -> None:
        """Keep the run's state as the last good one and, with checkpoints on, write it to disk."""
        if not _weights_sane(run):
            return  # never keep a diverged state as the one to roll back to
        self._last_good = encode(self._payload(run))
        self._saved_step, self._saved_time = run.trainer.steps_done, time.monotonic()
        if self.enabled:
            if not (self.folder.path / SETTINGS).exists():
                self.folder.write_settings(self.settings(run))
            self.folder.write(self._last_good, run.trainer.steps_done)

    def report(self) -> dict[str, Any]:
        """For report.json: rollbacks and the learning-rate multipliers they left."""
        return {"rollbacks": self.retries, "lr_scales": dict(self.scales),
                "checkpoints": "off" if not self.enabled else str(self.folder.path)}

    def _due(self, step: int) -> bool:
        every, minutes = self.cfg.checkpoint_every, self.cfg.checkpoint_minutes
        by_steps = every > 0 and step - self._saved_step >= every
        # Ranks must keep their rollback states at the same steps, so not by each one's clock.
        by_time = minutes > 0 and not self.world.active and time.monotonic() - self._saved_time >= minutes * 60
        return by_steps or by_time

    def _payload(self, run: Run) -> dict[str, Any]:
        return {"format": FORMAT, "dfkd_version": __version__, "teacher_sha256": self.teacher_sha256,
                "recipe": run.name, "run": run.state_dict(), "rng": rng_state(), "elapsed": self.budget.elapsed,
                "lr_scales": dict(self.scales), "retries": self.retries, "warnings": list(self.warnings)}

    def _load(self, run: Run, payload: dict[str, Any]) -> None:
        """Put ``payload`` into ``run`` with the current learning-rate multipliers applied."""
        run.load_state_dict(payload["run"])
        set_rng_state(payload["rng"])
        saved = payload["lr_scales"]
        run.trainer.lr_scale = self.scales["student"]  # the trainer sets its lr from this every step
        run.synth.set_lr_scale(self.scales["synth"], saved["synth"])  # optimizers hold the saved state's rates

    def _roll_back(self, run: Run, component: str, what: str) -> None:
        """Return to the last good state with ``component``'s learning rate halved; ``what`` went wrong."""
        step = run.trainer.steps_done
        if self._last_good is None or self.retries >= self.cfg.max_retries:
            raise DfkdError(f"training diverged: {what} at student step {step} after {self.retries} "
                            "rollback(s) at lower learning rates; lower train.lr or synth.lr "
                            "(-s train.lr=...) or raise train.max_retries", EXIT_RUNTIME)
        self.retries += 1
        self.scales[component] *= LR_FACTOR
        self._load(run, decode(self._last_good, next(run.trainer.student.parameters()).device))
        name = "generator" if component == "synth" else "student"
        self.display.log(f"{what} at student step {step}: rolled back to step "
                         f"{run.trainer.steps_done}, {name} learning rate x{self.scales[component]:g} "
                         f"(retry {self.retries} of {self.cfg.max_retries})")

    def _watch_collapse(self, run: Run) -> None:
        one_class = run.trainer.last_majority >= 1.0 and run.synth.teacher.num_classes > 1
        self._one_class_steps = self._one_class_steps + 1 if one_class else 0
        if self._one_class_steps == COLLAPSE_STEPS:
            message = (f"the generator may have collapsed: the teacher put every sample of {COLLAPSE_STEPS} "
                       f"consecutive student batches in one class (until step {run.trainer.steps_done})")
            self.warnings.append(message)
            self.display.log(f"warning: {message}")


def _diverged(run: Run, loss: float, world: World) -> str | None:
    """``"synth"`` when the generator's losses are non-finite (on any rank), ``"student"`` when
    the student's loss (already averaged over the ranks) is, else None."""
    parts = run.synth.status()
    if world.any(any(isinstance(v, float) and not math.isfinite(v) for v in parts.values())):
        return "synth"
    return None if math.isfinite(loss) else "student"


def _weights_sane(run: Run) -> bool:
    """Every student weight finite and below BROKEN_WEIGHT (an exploded student's are not)."""
    return broken_weights(run.trainer.student) is None
