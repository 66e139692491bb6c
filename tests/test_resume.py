"""Runs survive: checkpoints, interrupt-and-resume equality, kill -9, full disks, divergence, collapse.

Equality is bit for bit: a seeded CPU run interrupted and resumed ends with exactly the student
weights of the same run left alone.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfkd_cli import resume as resume_module
from dfkd_cli import supervise
from dfkd_cli.trainer import StudentTrainer

import kit

SMALL = kit.train(checkpoint_every=15)
RECIPES = {  # recipe -> settings small enough for seconds; together they cover every kind of state
    "dfad": [*kit.generator(), *kit.overrides("train.steps_per_round=4")],
    "dafl": [*kit.generator(), *kit.overrides('train.update="lra"', "train.memory_size=64", "train.steps_per_round=3")],
    "cmi": [*kit.generator(iterations=3, head_dim=16, bank_size=64), *kit.overrides("train.steps_per_round=7", "train.crop_pad=1")],
    "fast": [*kit.generator(iterations=2, warmup=1), *kit.overrides("train.steps_per_round=7")],
}


def _compress(teacher, out: Path, recipe: str, steps: int = 40, extra: tuple[str, ...] = ()):
    return kit.cli(*kit.compress_args(teacher, out, recipe, steps, *SMALL, *RECIPES.get(recipe, []), *extra))


def _nothing_published(out: Path) -> bool:
    """No artefact of a finished run in ``out`` (the ONNX export comes after the student file)."""
    return not any((out / name).exists() for name in ("student.safetensors", "student.onnx", "report.json"))


def _same_weights(a: Path, b: Path) -> bool:
    left, right = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _stop_at(monkeypatch, step: int) -> None:
    """Ask the run to stop (as SIGINT would) once the student has made ``step`` steps."""
    original = supervise.Supervisor.after_step

    def after_step(self, run, loss):
        original(self, run, loss)
        if run.trainer.steps_done == step and self.budget.stop is not None:
            self.budget.stop.requested = "SIGINT"

    monkeypatch.setattr(supervise.Supervisor, "after_step", after_step)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_interrupted_and_resumed_run_ends_with_the_same_weights(recipe, tiny_teacher, tmp_path, monkeypatch):
    whole = _compress(tiny_teacher, tmp_path / "whole", recipe, steps=30)
    assert whole.exit_code == 0, whole.stderr
    with monkeypatch.context() as patch:
        _stop_at(patch, 23)  # mid-round and between checkpoints
        stopped = _compress(tiny_teacher, tmp_path / "split", recipe, steps=30)
    assert stopped.exit_code == 130
    assert stopped.stderr.strip().splitlines()[-1] == (f"error: stopped by SIGINT at student step 23; checkpoint saved, continue with: "
                                      f"dfkd compress --resume {tmp_path / 'split'}")
    assert _nothing_published(tmp_path / "split")
    resumed = kit.cli("compress", "--resume", tmp_path / "split", "--format", "json")
    assert resumed.exit_code == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["run"]["resumed_from_step"] == 23 and report["run"]["steps"] == 30
    assert _same_weights(tmp_path / "whole", tmp_path / "split")
    assert not (tmp_path / "split" / "checkpoints").exists()  # a finished run keeps no checkpoints


def test_checkpoints_are_kept_two_at_a_time_and_load_without_pickled_code(tiny_teacher, tmp_path, monkeypatch):
    _stop_at(monkeypatch, 38)
    assert _compress(tiny_teacher, tmp_path / "run", "dfad").exit_code == 130
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["run.toml", "step-000000030.pt", "step-000000038.pt"]
    state = torch.load(folder / "step-000000038.pt", weights_only=True)
    assert state["run"]["trainer"]["steps_done"] == 38 and state["recipe"] == "dfad"
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])


SIGNAL_STEPS = 60
# dfkd's console entry point, except that each student step after the 20th sleeps 50 ms: the signal
# then always finds the run still going, without hundreds of steps of margin. No number changes.
SLOWED_DFKD = """import sys, time
from dfkd_cli import supervise
from dfkd_cli.cli import main
after_step = supervise.Supervisor.after_step
def slowed(self, run, loss):
    after_step(self, run, loss)
    if run.trainer.steps_done >= 20:
        time.sleep(0.05)
supervise.Supervisor.after_step = slowed
main()
"""


def _subprocess_run(teacher, out: Path) -> subprocess.Popen:
    args = [sys.executable, "-c", SLOWED_DFKD, *map(str, kit.compress_args(
        teacher, out, "dfad", SIGNAL_STEPS, *SMALL, *RECIPES["dfad"], "-s", "train.checkpoint_every=10"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    return subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else "the run ended"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.subprocess
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_real_signal_then_resume_matches_an_uninterrupted_run(how, tiny_teacher, tmp_path):
    """SIGTERM: the run checkpoints its current step and exits 130. kill -9: the last periodic
    checkpoint resumes. Either way the resumed run ends where the whole one does."""
    out = tmp_path / "run"
    process = _subprocess_run(tiny_teacher, out)
    _wait_for(out / "checkpoints" / "step-000000020.pt", process)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=120)
    if how == "SIGTERM":
        assert process.returncode == 130
        lines = stderr.strip().splitlines()
        assert lines[-1].startswith("error: stopped by SIGTERM at student step ") and f"--resume {out}" in lines[-1]
    else:
        assert process.returncode == -signal.SIGKILL
    assert _nothing_published(out)
    assert all(path.name.startswith("step-") for path in resume_module.CheckpointDir(out).files())
    resumed = kit.cli("compress", "--resume", out, "--format", "json")
    assert resumed.exit_code == 0, resumed.stderr
    whole = _compress(tiny_teacher, tmp_path / "whole", "dfad", steps=SIGNAL_STEPS, extra=("-s", "train.checkpoint_every=10"))
    assert whole.exit_code == 0, whole.stderr
    assert _same_weights(out, tmp_path / "whole")


def test_a_full_disk_is_one_line_and_earlier_checkpoints_stay_intact(tiny_teacher, tmp_path, monkeypatch):
    writes = []
    original = resume_module.atomic_write

    def full_after_two(path, data):
        writes.append(path.name)
        if len(writes) > 3:  # run.toml and the checkpoints of steps 0 and 15 fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(path, data)

    monkeypatch.setattr(resume_module, "atomic_write", full_after_two)
    result = _compress(tiny_teacher, tmp_path / "run", "dfad")
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "step-000000015.pt) is intact" in lines[0]
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["run.toml", "step-000000000.pt", "step-000000015.pt"]
    monkeypatch.setattr(resume_module, "atomic_write", original)
    resumed = kit.cli("compress", "--resume", tmp_path / "run", "--format", "json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["run"]["resumed_from_step"] == 15


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "step.pt"
    resume_module.atomic_write(target, b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        resume_module.atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["step.pt"]


def _nan_loss_at(monkeypatch, steps: set[int] | None) -> list[float]:
    """Make the student's loss NaN at the given step numbers (every step when None); returns the
    learning rates the trainer used, one per step."""
    original, rates = StudentTrainer.loss_for, []

    def loss_for(self, x):
        loss = original(self, x)
        rates.append(self.optimizer.param_groups[0]["lr"])
        if steps is None or self.steps_done in steps:
            steps and steps.discard(self.steps_done)  # once: the retry at a lower rate goes through
            return loss * float("nan")
        return loss

    monkeypatch.setattr(StudentTrainer, "loss_for", loss_for)
    return rates


def test_a_non_finite_loss_rolls_back_and_halves_the_student_lr(tiny_teacher, tmp_path, monkeypatch):
    rates = _nan_loss_at(monkeypatch, {20})
    result = _compress(tiny_teacher, tmp_path / "run", "dfad", steps=30, extra=("-s", "train.schedule=\"constant\""))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["run"]["health"]["rollbacks"] == 1 and report["run"]["health"]["lr_scales"]["student"] == 0.5
    assert "non-finite student loss (nan) at student step 21: rolled back to step 15" in result.stderr
    assert rates[0] == rates[20] and rates[-1] == pytest.approx(rates[0] / 2)
    weights = load_file(tmp_path / "run" / "student.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_a_run_that_keeps_diverging_aborts_after_the_retries(tiny_teacher, tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, None)
    result = _compress(tiny_teacher, tmp_path / "run", "dfad", extra=("-s", "train.max_retries=2"))
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: training diverged: non-finite student loss (nan) at student step 1 after 2 rollback(s)")
    assert _nothing_published(tmp_path / "run")


@pytest.mark.slow
def test_a_collapsed_generator_is_a_warning_in_the_report(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(supervise, "COLLAPSE_STEPS", 25)  # the detector's threshold, not its logic, made smaller
    state = torch.load(tiny_teacher["path"], weights_only=True)
    state["fc.bias"] = torch.tensor([1e4, 0.0, 0.0, 0.0])  # the teacher now answers class 0 to everything
    teacher = {**tiny_teacher, "path": tmp_path / "one_class.pt"}
    torch.save(state, teacher["path"])
    result = _compress(teacher, tmp_path / "run", "dfad", steps=supervise.COLLAPSE_STEPS + 5)
    assert result.exit_code == 0, result.stderr
    warnings = json.loads(result.stdout)["warnings"]
    assert any("the generator may have collapsed" in w for w in warnings)
    healthy = _compress(tiny_teacher, tmp_path / "healthy", "dfad", steps=supervise.COLLAPSE_STEPS + 5)
    assert not any("collapsed" in w for w in json.loads(healthy.stdout)["warnings"])


def test_resume_refusals_are_one_line(tiny_teacher, tmp_path, monkeypatch):
    _stop_at(monkeypatch, 5)
    run = tmp_path / "run"
    assert _compress(tiny_teacher, run, "dfad").exit_code == 130
    cases = {
        "same folder, no --resume": (["compress", str(tiny_teacher["path"]), *tiny_teacher["args"], "--out", str(run)],
                                     f"holds an unfinished run; continue it with --resume {run}"),
        "other flags": (["compress", "--resume", str(run), "--steps", "5"], "leave out --steps"),
        "not a run": (["compress", "--resume", str(tmp_path)], "is not a resumable run"),
        "missing": (["compress", "--resume", str(tmp_path / "nope")], "is not a folder"),
    }
    for name, (args, message) in cases.items():
        result = kit.cli(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (name, result.stderr)
    other = tmp_path / "other.pt"
    state = torch.load(tiny_teacher["path"], weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    settings = run / "checkpoints" / "run.toml"
    settings.write_text(settings.read_text().replace(str(tiny_teacher["path"]), str(other)))
    result = kit.cli("compress", "--resume", run)
    assert result.exit_code == 2 and "made for another teacher (sha256" in result.stderr


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_teacher, tmp_path, monkeypatch):
    _stop_at(monkeypatch, 20)
    run = tmp_path / "run"
    assert _compress(tiny_teacher, run, "dfad").exit_code == 130
    newest = run / "checkpoints" / "step-000000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    monkeypatch.undo()
    result = kit.cli("compress", "--resume", run, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["run"]["resumed_from_step"] == 15


def test_a_checkpoint_that_needs_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"format": 1, "evil": Payload()}, folder / "step-000000001.pt")
    with pytest.raises(Exception, match="no readable checkpoint"):
        resume_module.CheckpointDir(tmp_path).read_latest(torch.device("cpu"))
    assert not (tmp_path / "pwned").exists()


def test_running_out_of_memory_is_one_line_exit_3(tiny_teacher, tmp_path, monkeypatch):
    def step(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(StudentTrainer, "step", step)
    result = _compress(tiny_teacher, tmp_path / "run", "dfad")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert result.exit_code == 3 and len(errors) == 1 and "out of memory" in errors[0] and "batch_size" in errors[0]
    assert _nothing_published(tmp_path / "run")


def test_a_stop_with_checkpoints_off_says_it_cannot_resume(tiny_teacher, tmp_path, monkeypatch):
    _stop_at(monkeypatch, 5)
    result = _compress(tiny_teacher, tmp_path / "run", "dfad",
                       extra=("-s", "train.checkpoint_every=0", "-s", "train.checkpoint_minutes=0"))
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines()[-1].endswith("checkpoints are off (train.checkpoint_every = "
                                                            "train.checkpoint_minutes = 0), so the run cannot be resumed")
    assert not (tmp_path / "run").exists()
