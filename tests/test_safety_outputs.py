"""Safe under faults: what --overwrite may remove, the output lock, writability, permissions,
signals, names that must not become paths, and messages that point the right way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dfkd_cli import marker, rundir, supervise
from dfkd_cli.atomic import atomic_write, temporary_folder, temporary_sibling
from dfkd_cli.cli import app
from dfkd_cli.errors import DfkdError
from dfkd_cli.outlock import OutputLock, lock_path
from dfkd_cli.resume import CheckpointDir

FAST = ["--recipe", "noise", "--steps", "2", "-s", "train.holdout=8", "-s", "train.batch_size=16"]
CHECKPOINTED = ["--recipe", "dfad", "--steps", "12", "-s", "train.holdout=16", "-s", "train.batch_size=16",
                "-s", "train.eval_every=4", "-s", "train.checkpoint_every=4", "-s", "synth.batch_size=16",
                "-s", "synth.ngf=8", "-s", "synth.latent_dim=16", "-s", "train.steps_per_round=4"]


def dfkd(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def compress(teacher: dict, out: Path, *extra: object):
    return dfkd("compress", teacher["path"], *teacher["args"], "--student", "resnet8", "--out", out,
                "--device", "cpu", "--format", "json", *extra)


def one_error_line(result, code: int = 2) -> str:
    """The one ``error:`` line a failed command ends with (progress lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------------------------------ --overwrite


@pytest.mark.parametrize("case", ["current folder", "folder above", "home", "holds the teacher",
                                  "holds the eval data", "user's folder", "run folder plus a user file", "symlink"])
def test_overwrite_refuses_what_dfkd_did_not_make(case, tiny_teacher, tmp_path, monkeypatch):
    """Each refusal is one line before any work, and the folder is left exactly as it was."""
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    teacher = dict(tiny_teacher)
    extra: list[object] = []
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    if case == "current folder":
        target = Path(".")
        (work / "notes.txt").write_text("mine")
    elif case == "folder above":
        target = work.parent
    elif case == "home":
        target = Path("~").expanduser()
        (target / "notes.txt").write_text("mine")
    elif case == "holds the teacher":
        shutil.copy(tiny_teacher["path"], target / "teacher.pt")
        teacher["path"] = target / "teacher.pt"
        marker.seal(target)  # even a dfkd run folder: the teacher is in it
    elif case == "holds the eval data":
        shutil.copy(tiny_teacher["eval"], target / "eval.npz")
        extra = ["--eval-data", target / "eval.npz"]
        marker.seal(target)
    elif case == "run folder plus a user file":
        (target / "notes.txt").unlink()
        (target / "report.json").write_text("{}")
        marker.seal(target)
        (target / "notes.txt").write_text("mine")
    elif case == "symlink":
        (tmp_path / "link").symlink_to(target)
        target = tmp_path / "link"
    before = snapshot(tmp_path)
    started = time.monotonic()
    line = one_error_line(compress(teacher, target, "--overwrite", *extra, *FAST))
    assert time.monotonic() - started < 10, "refused only after work"
    expected = {"current folder": "is the current folder", "folder above": "is a folder above the current one",
                "home": "is your home folder", "holds the teacher": "holds the input",
                "holds the eval data": "holds the input", "user's folder": "not a dfkd run folder",
                "run folder plus a user file": "holds files dfkd did not write there (notes.txt)",
                "symlink": "is a symbolic link"}[case]
    assert expected in line, line
    assert snapshot(tmp_path) == before, "the refused run changed files"


def test_overwrite_replaces_an_empty_folder_and_a_dfkd_run_folder(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    first = compress(tiny_teacher, out, "--overwrite", *FAST)  # an empty folder
    assert first.exit_code == 0, first.stderr
    listed = marker.read(out)
    assert listed is not None and {"student.safetensors", "report.json", "config.toml"} <= set(listed["entries"])
    stamp = (out / "report.json").stat().st_mtime_ns
    second = compress(tiny_teacher, out, "--overwrite", *FAST)  # its own run folder
    assert second.exit_code == 0, second.stderr
    assert (out / "report.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "staging, old folder or lock left behind"


def test_a_folder_that_gains_a_user_file_during_the_run_is_not_replaced(tmp_path):
    out, staging = tmp_path / "run", tmp_path / ".run.partial-1"
    for folder in (out, staging):
        folder.mkdir()
        (folder / "report.json").write_text(folder.name)
    marker.seal(out)
    (out / "notes.txt").write_text("mine")  # appeared after the run's checks
    with pytest.raises(DfkdError, match="gained files dfkd did not write"):
        rundir.move_into_place(staging, out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").read_text() == "run"
    assert (tmp_path / "run.new" / "report.json").read_text() == staging.name


def test_checkpoint_clean_up_removes_only_what_dfkd_wrote(tmp_path):
    out = tmp_path / "run"
    folder = CheckpointDir(out)
    folder.write(b"checkpoint", step=1)
    (folder.path / "mine.txt").write_text("mine")
    rundir.drop_checkpoints(out)
    assert sorted(p.name for p in folder.path.iterdir()) == ["mine.txt"]
    assert marker.read(out) is not None, "the marker went while dfkd's folder is still there"
    (folder.path / "mine.txt").unlink()
    folder.write(b"checkpoint", step=2)
    rundir.drop_checkpoints(out)
    assert not out.exists(), "dfkd made the folder and left nothing in it: it goes"
    user = tmp_path / "user"
    (user / "checkpoints").mkdir(parents=True)
    (user / "checkpoints" / "step-000000001.pt").write_bytes(b"not dfkd's")
    rundir.drop_checkpoints(user)  # no marker: not dfkd's to remove
    assert (user / "checkpoints" / "step-000000001.pt").exists()


# ---------------------------------------------------------------------------------------------- lock


def test_a_second_run_into_a_locked_out_fails_at_once_naming_the_first(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "x"
    monkeypatch.setattr(sys, "argv", ["dfkd", "compress", "first.pt"])  # the command line the lock records
    with OutputLock(out):
        started = time.monotonic()
        line = one_error_line(compress(tiny_teacher, out, *FAST))
        assert time.monotonic() - started < 10
        assert f"another dfkd run (pid {os.getpid()}: dfkd compress first.pt)" in line and str(out) in line, line
        assert not out.exists()
    assert not lock_path(out).exists() and not (tmp_path / "runs").exists(), "lock or its folder left behind"


def test_a_run_holds_the_lock_while_it_trains(tiny_teacher, tmp_path, monkeypatch):
    out, begin, refused = tmp_path / "x", supervise.Supervisor.begin, []

    def begin_and_try_the_lock(self, run):
        try:
            OutputLock(out).__enter__()
        except DfkdError as err:
            refused.append(err.message)
        begin(self, run)

    monkeypatch.setattr(supervise.Supervisor, "begin", begin_and_try_the_lock)
    assert compress(tiny_teacher, out, *FAST).exit_code == 0
    assert len(refused) == 1 and f"pid {os.getpid()}" in refused[0], refused
    assert not lock_path(out).exists()


def test_a_stale_lock_file_does_not_block_and_the_lock_is_released_on_errors(tiny_teacher, tmp_path):
    out = tmp_path / "x"
    lock_path(out).write_text("999999\ndfkd compress (killed long ago)\n")  # no process holds it
    assert compress(tiny_teacher, out, *FAST).exit_code == 0
    assert not lock_path(out).exists()
    line = one_error_line(compress(tiny_teacher, out, *FAST))  # refused with the lock held: released again
    assert "already exists" in line and not lock_path(out).exists()
    with OutputLock(out):
        pass


def test_the_lock_held_is_the_file_others_see_when_the_last_holder_removed_it_meanwhile(tmp_path, monkeypatch):
    from dfkd_cli import outlock

    out, real_flock, calls = tmp_path / "x", outlock.fcntl.flock, []

    def flock_after_the_holder_left(descriptor, operation):
        if not calls:  # the run before released and removed the file between our open() and flock()
            calls.append(descriptor)
            lock_path(out).unlink()
        real_flock(descriptor, operation)

    monkeypatch.setattr(outlock.fcntl, "flock", flock_after_the_holder_left)
    with OutputLock(out):
        with pytest.raises(DfkdError, match=f"another dfkd run \\(pid {os.getpid()}"):
            OutputLock(out).__enter__()


@pytest.mark.export  # dfkd quantize needs student.onnx
def test_quantize_takes_the_run_lock_too(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    made = compress(tiny_teacher, out, "--save-synthetic", *FAST)
    assert made.exit_code == 0, made.stderr
    with OutputLock(out):
        line = one_error_line(dfkd("quantize", out))
    assert f"pid {os.getpid()}" in line and not (out / "student.int8.onnx").exists()


# -------------------------------------------------------------------------------------- writability


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_out_under_proc_fails_before_any_work(tiny_teacher, tmp_path, monkeypatch):
    """As root the permission bits of /proc say writable; creating a file there says otherwise."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(compress(tiny_teacher, "/proc/dfkd-safety-test/run", *FAST))
    assert "cannot write the run folder" in line and "pick another --out" in line, line
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- permissions


@pytest.mark.export
def test_artefacts_follow_the_umask(tiny_teacher, tmp_path):
    previous = os.umask(0o022)
    try:
        result = compress(tiny_teacher, tmp_path / "run", *FAST)
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "run"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    for name in ("student.safetensors", "student.onnx", "report.json", "report.md", "samples.png", "config.toml"):
        assert modes[name] == 0o644, (name, oct(modes[name]))
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_atomic_writes_follow_a_strict_umask_too(tmp_path):
    previous = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a.json", "{}")
        with temporary_sibling(tmp_path / "b.onnx", ".onnx") as sibling:
            sibling_mode = stat.S_IMODE(sibling.stat().st_mode)
        folder = temporary_folder(tmp_path, ".student.")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o600 and sibling_mode == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# ------------------------------------------------------------------------------------------ signals


def _export_interrupted(*args, **kwargs):
    raise KeyboardInterrupt("SIGINT")


def test_ctrl_c_during_the_export_says_the_checkpoint_is_kept(tiny_teacher, tmp_path, monkeypatch):
    import dfkd_cli.pipeline

    monkeypatch.setattr(dfkd_cli.pipeline, "save_student", _export_interrupted)
    out = tmp_path / "run"
    line = one_error_line(compress(tiny_teacher, out, *CHECKPOINTED), code=130)
    assert "interrupted by SIGINT; the last checkpoint (step-000000012.pt) is kept in" in line, line
    assert line.endswith(f"continue with: dfkd compress --resume {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "staging or lock left behind"
    assert not (out / "report.json").exists()


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_kept(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(supervise.Supervisor, "begin", _export_interrupted)
    line = one_error_line(compress(tiny_teacher, tmp_path / "run", *CHECKPOINTED), code=130)
    assert line.endswith("interrupted by SIGINT; nothing of this run was kept"), line
    assert list(tmp_path.iterdir()) == []


def _started_loading_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_torch_imports_is_exit_130_and_one_line(sig, tiny_teacher, tmp_path):
    """The moment the process maps libtorch it is importing torch; the signal then must not end in
    a traceback, a crash or (SIGTERM) exit 143."""
    command = [sys.executable, "-m", "dfkd_cli", "compress", str(tiny_teacher["path"]), *tiny_teacher["args"],
               "--out", str(tmp_path / "run"), "--device", "cpu", *FAST]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CI": "true"})
    deadline = time.monotonic() + 60
    while not _started_loading_torch(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "never started importing torch"
        time.sleep(0.002)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, (process.returncode, stderr)
    assert stderr.strip().splitlines() == [f"error: interrupted by {sig.name}"], stderr
    assert not (tmp_path / "run").exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- names, not paths


def test_recipe_names_are_looked_up_never_opened(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere" / "secret.toml"
    outside.parent.mkdir()
    outside.write_text("[recipe]\nname = 'stolen'\n")
    monkeypatch.chdir(tmp_path)
    for args in (["recipes", "show", "elsewhere/secret"], ["recipes", "show", "../" * 8 + str(outside)[1:-5]],
                 ["recipes", "show", str(outside)], ["recipes", "cp", "elsewhere/secret", "copy.toml"]):
        result = dfkd(*args)
        line = one_error_line(result)
        assert "unknown recipe" in line and "stolen" not in result.stdout, (args, line)
    assert not (tmp_path / "copy.toml").exists()
    assert "did you mean: deepinversion" in one_error_line(dfkd("recipes", "show", "deepinversio"))
    assert "recipes validate FILE" in one_error_line(dfkd("recipes", "show", "mine.toml"))
    copied = dfkd("recipes", "cp", "noise", "noise.toml")
    assert copied.exit_code == 0 and (tmp_path / "noise.toml").read_text().startswith(
        dfkd("recipes", "show", "noise").stdout[:40])


# ------------------------------------------------------------------------------------------ messages


def test_a_teacher_symlink_loop_is_called_one(tiny_teacher, tmp_path):
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    (tmp_path / "gone.pt").symlink_to(tmp_path / "nowhere.pt")
    loop = one_error_line(compress({**tiny_teacher, "path": tmp_path / "a.pt"}, tmp_path / "run", *FAST))
    assert "is a symbolic link loop" in loop and "not found" not in loop, loop
    broken = one_error_line(compress({**tiny_teacher, "path": tmp_path / "gone.pt"}, tmp_path / "run", *FAST))
    assert "is a broken symbolic link" in broken, broken


def test_when_every_checkpoint_is_truncated_both_ways_say_start_over(tiny_teacher, tmp_path, monkeypatch):
    original = supervise.Supervisor.after_step

    def stop_at_8(self, run, loss):
        original(self, run, loss)
        if run.trainer.steps_done == 8:
            self.budget.stop.requested = "SIGINT"

    monkeypatch.setattr(supervise.Supervisor, "after_step", stop_at_8)
    out = tmp_path / "run"
    assert compress(tiny_teacher, out, *CHECKPOINTED).exit_code == 130
    monkeypatch.undo()
    for path in CheckpointDir(out).files():
        path.write_bytes(path.read_bytes()[:500])
    again = one_error_line(compress(tiny_teacher, out, *CHECKPOINTED))
    assert "cannot be resumed; start over with --overwrite" in again and "--resume" not in again, again
    resumed = one_error_line(dfkd("compress", "--resume", out))
    assert "cannot be resumed" in resumed and f"--out {out} --overwrite" in resumed, resumed
    restarted = compress(tiny_teacher, out, "--overwrite", *CHECKPOINTED)
    assert restarted.exit_code == 0, restarted.stderr
    assert json.loads(restarted.stdout)["run"]["steps"] == 12 and not CheckpointDir(out).exists()
