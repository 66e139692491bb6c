"""Text runs go through the image runs' loop, supervisor and race: checkpoints and ``--resume``
(bit for bit on CPU), clean stops, divergence rollback and ``--recipe auto`` races."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfkd_cli import supervise
from dfkd_cli.text.trainer import TextTrainer

from test_resume import _nothing_published, _stop_at
from test_text_cli import FAST, GENERATE, run

RL = ["--recipe", "promptdfd-rl", "-s", "synth.prompt_length=2", *GENERATE, "-s", "train.checkpoint_every=4",
      "-s", "synth.lr=0.05"]  # a prompter that changes visibly, so its state matters to the resumed run


def _rl(files: dict[str, Path], out: Path, *extra: str):
    return run("compress", files["bert"], "--generator", files["gpt2"], "--prompter", files["gpt2"], *RL,
               "--out", out, *FAST, *extra)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "student.safetensors")


@pytest.mark.slow
def test_an_interrupted_text_run_resumes_to_the_same_student(text_files, tmp_path, monkeypatch) -> None:
    # Publish the last weights, not the selected ones: the toy teacher's bert-1 may already agree
    # fully at step 0, and a selected starting student would hide any difference in training.
    monkeypatch.setattr(TextTrainer, "restore_best", lambda self: self.student.eval())
    whole = _rl(text_files, tmp_path / "whole", "--steps", "10")
    assert whole.exit_code == 0, (whole.stderr, whole.exception)
    with monkeypatch.context() as patch:
        _stop_at(patch, 7)  # between checkpoints (every 4) and mid-round (4 steps per prompter round)
        stopped = _rl(text_files, tmp_path / "split", "--steps", "10")
    assert stopped.exit_code == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == ("error: stopped by SIGINT at student step 7; checkpoint saved, "
                                                       f"continue with: dfkd compress --resume {tmp_path / 'split'}")
    assert _nothing_published(tmp_path / "split")
    resumed = run("compress", "--resume", tmp_path / "split", "--format", "json")
    assert resumed.exit_code == 0, (resumed.stderr, resumed.exception)
    report = json.loads(resumed.stdout)
    assert report["run"]["resumed_from_step"] == 7 and report["run"]["steps"] == 10
    whole_w, split_w = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert whole_w.keys() == split_w.keys() and all(torch.equal(whole_w[k], split_w[k]) for k in whole_w)
    assert not (tmp_path / "split" / "checkpoints").exists()


def test_resuming_a_text_run_refuses_other_flags(text_files, tmp_path, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        _stop_at(patch, 3)
        assert _rl(text_files, tmp_path / "r").exit_code == 130
    again = run("compress", "--resume", tmp_path / "r", "--steps", "9")
    assert again.exit_code == 2
    assert again.stderr.strip() == "error: --resume continues a run with the settings it started with; leave out --steps"


def test_a_non_finite_text_loss_rolls_back_and_halves_the_student_lr(text_files, tmp_path, monkeypatch) -> None:
    step = TextTrainer.step
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss = step(self, batch)
        return float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(TextTrainer, "step", poisoned)
    result = run("compress", text_files["bert"], "--recipe", "random-text", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 0, (result.stderr, result.exception)
    health = json.loads(result.stdout)["run"]["health"]
    assert health["rollbacks"] == 1 and health["lr_scales"]["student"] == supervise.LR_FACTOR
    assert "rolled back to step" in result.stderr


def test_auto_races_the_text_recipes_the_inputs_allow(text_files, tmp_path) -> None:
    out = tmp_path / "race"
    result = run("compress", text_files["bert"], "--prior", text_files["corpus"], "--generator", text_files["gpt2"],
                 "--race-share", "0.5", "--out", out, *FAST)
    assert result.exit_code == 0, (result.stderr, result.exception)
    race = json.loads(result.stdout)["run"]["race"]
    entrants = [row["recipe"] for row in race["entrants"]]
    assert sorted(entrants) == ["promptdfd-manual", "random-text", "unlabeled-text"]  # not promptdfd-rl: no --prompter
    assert race["winner"] in entrants and all(row["steps"] == 1 for row in race["entrants"])  # 6 steps x 0.5 / 3
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["run"]["recipe"] == race["winner"] == json.loads(result.stdout)["run"]["recipe"]
    again = run("compress", "--config", out / "config.toml", "--out", tmp_path / "again", "--format", "json")
    assert again.exit_code == 0, again.stderr  # the config repeats the winner alone
    assert json.loads(again.stdout)["run"]["race"] is None


def test_a_stopped_text_race_resumes_its_winner(text_files, tmp_path, monkeypatch) -> None:
    args = ["compress", text_files["bert"], "--prior", text_files["corpus"], "--race-share", "0.5", *FAST,
            "--steps", "12", "-s", "train.checkpoint_every=2"]
    with monkeypatch.context() as patch:
        _stop_at(patch, 9)  # after the race (3 entrants x 2 steps), while the leader trains
        assert run(*args, "--out", tmp_path / "r").exit_code == 130
    resumed = run("compress", "--resume", tmp_path / "r", "--format", "json")
    assert resumed.exit_code == 0, (resumed.stderr, resumed.exception)
    report = json.loads(resumed.stdout)
    assert report["run"]["resumed_from_step"] == 9 and report["run"]["steps"] == 12


def test_race_share_needs_recipe_auto(text_files, tmp_path) -> None:
    result = run("compress", text_files["bert"], "--recipe", "random-text", "--race-share", "0.3", "--out", tmp_path / "r", *FAST)
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    assert result.stderr.strip() == ("error: --race-share races the recipes of --recipe auto; --recipe random-text runs one, "
                                     "leave it out")


def test_a_text_race_refuses_settings_of_one_recipe(text_files, tmp_path) -> None:
    result = run("compress", text_files["bert"], "--prior", text_files["corpus"], "--race-share", "0.5",
                 "--out", tmp_path / "r", *FAST, "-s", "synth.max_tokens=9")
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    assert result.stderr.strip().startswith("error: -s synth.max_tokens=9 names a setting of one recipe")


def test_quantize_int8_writes_and_measures_a_dynamic_int8_text_student(text_files, tmp_path, monkeypatch) -> None:
    out = tmp_path / "q"
    sizes: list[int] = []
    teacher_logits = TextTrainer.teacher_logits
    monkeypatch.setattr(TextTrainer, "teacher_logits", lambda self, texts: sizes.append(len(texts)) or teacher_logits(self, texts))
    result = run("compress", text_files["bert"], "--recipe", "random-text", "--quantize", "int8",
                 "--eval-data", text_files["dev"], "--min-agreement", "0.5", "--out", out, *FAST)
    assert result.exit_code in (0, 1), (result.stderr, result.exception)
    assert result.stdout.startswith("{"), (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    int8 = report["int8"]
    assert (out / "student.int8.onnx").is_file() and int8["file_bytes"]["int8"] < int8["file_bytes"]["fp32"]
    assert int8["synthetic"]["n"] == 16 and int8["eval_data"]["n"] == 60  # the report half of 32; every dev row
    assert int8["eval_data"]["int8_vs_fp32_top1"] >= 0.9 and "int8_accuracy" in int8["eval_data"]
    assert report["gate"]["measured_on"] == "int8 student, eval data"
    assert report["gate"]["measured"] == int8["eval_data"]["int8_top1_agreement"]
    assert result.exit_code == (0 if report["gate"]["passed"] else 1)
    assert sizes.count(60) == 1  # the teacher reads the eval texts once, for the int8 section and the report


def test_a_saved_text_set_trains_a_student_without_synthesizing(text_files, tmp_path, monkeypatch) -> None:
    made = run("compress", text_files["bert"], "--recipe", "random-text", "--save-synthetic", "--out", tmp_path / "a", *FAST)
    assert made.exit_code == 0, (made.stderr, made.exception)
    saved = tmp_path / "a" / "synthetic"
    manifest = json.loads((saved / "manifest.json").read_text())
    rows = [json.loads(line) for line in (saved / "train.jsonl").read_text().splitlines()]
    assert manifest["family"] == "text" and manifest["recipe"] == "random-text" and len(rows) == manifest["train_samples"]
    assert len(rows) == 64 * 3 and len(rows[0]["logits"]) == 2  # 3 rounds of 64 texts, 2 classes
    from dfkd_cli.text import synth

    monkeypatch.setattr(synth.RandomTextSynthesizer, "make", lambda self, n: pytest.fail("synthesized"))
    again = run("compress", text_files["bert"], "--from-synthetic", saved, "--out", tmp_path / "b", *FAST)
    assert again.exit_code == 0, (again.stderr, again.exception)
    report = json.loads(again.stdout)
    assert report["run"]["from_synthetic"] == str(saved.resolve()) and report["run"]["recipe"] == "random-text"
    held = [json.loads(line)["text"] for line in (saved / "holdout.jsonl").read_text().splitlines()]
    assert report["synthetic_holdout"]["n"] == len(held) - len(held) // 2  # the saved report half, measured again


@pytest.mark.parametrize("case", ["generator", "damaged", "other teacher"])
def test_bad_from_synthetic_input_is_one_line(case, text_files, tmp_path) -> None:
    saved = tmp_path / "set"
    saved.mkdir()
    (saved / "manifest.json").write_text(json.dumps({"format": 1, "family": "text", "recipe": "random-text",
                                                     "teacher_sha256": "0" * 64 if case == "other teacher" else "", "num_classes": 2}))
    extra = ["--generator", str(text_files["gpt2"])] if case == "generator" else []
    if case == "damaged":
        from dfkd_cli.text.models import load_text_teacher

        manifest = json.loads((saved / "manifest.json").read_text())
        manifest["teacher_sha256"] = load_text_teacher(text_files["bert"]).sha256
        (saved / "manifest.json").write_text(json.dumps(manifest))
        (saved / "train.jsonl").write_text('{"text": "fine", "logits": [1.0]}\n')
    result = run("compress", text_files["bert"], "--from-synthetic", saved, "--out", tmp_path / "r", *FAST, *extra)
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    expected = {"generator": "--from-synthetic trains on a saved set without synthesizing, so --generator has no use",
                "damaged": "train.jsonl' line 1 must be {\"text\": str, \"logits\": [2 finite numbers]}",
                "other teacher": "was made for another teacher (sha256 000000000000"}[case]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


class RecordingWorld:
    """A world of two ranks that records what the trainer shares (the collectives of --nproc)."""

    active, size, rank = True, 2, 0

    def __init__(self) -> None:
        self.averaged: list[int] = []
        self.means: list[float] = []

    def average_gradients(self, params) -> None:
        self.averaged.append(sum(1 for p in params if p.grad is not None))

    def mean(self, value: float) -> float:
        self.means.append(value)
        return value


def test_text_steps_average_gradients_and_losses_over_the_ranks(text_files) -> None:
    """What --nproc needs of the text trainer (the launch, ranks and rank-0 writing are the image
    runs' code, tested in test_distributed.py; a 2-process text run was checked from a shell)."""
    from dfkd_cli.batches import TextBatch
    from dfkd_cli.config import load_recipe
    from dfkd_cli.text.models import build_text_student, load_text_teacher

    teacher = load_text_teacher(text_files["bert"])
    world = RecordingWorld()
    trainer = TextTrainer(build_text_student("bert-1", teacher), teacher, load_recipe("random-text").train,
                          torch.device("cpu"), world=world)
    texts = ["a great film", "a sad story"]
    loss = trainer.step(TextBatch(texts, trainer.teacher_logits(texts)))
    trainable = sum(1 for p in trainer.student.parameters() if p.requires_grad)
    assert world.averaged == [trainable] and world.means == [loss]  # every gradient, before the update
    trainer.select(TextBatch(texts, trainer.teacher_logits(texts)), torch.tensor([1, 0]))
    assert len(world.means) == 2  # the selection agreement is the ranks' mean too


def test_the_text_trainer_keeps_the_latest_student_within_noise_of_the_best(text_files) -> None:
    from dfkd_cli.batches import TextBatch
    from dfkd_cli.config import load_recipe
    from dfkd_cli.text.models import build_text_student, load_text_teacher

    teacher = load_text_teacher(text_files["bert"])
    trainer = TextTrainer(build_text_student("bert-1", teacher), teacher, load_recipe("random-text").train,
                          torch.device("cpu"))
    batch, teacher_classes = TextBatch(["a film"] * 256, torch.zeros(256, 2)), torch.zeros(256, dtype=torch.long)
    kept = []
    for step, right in enumerate([141, 136, 123, 138], start=1):  # 55%, 53%, 48%, 54%: one s.e. is 3.1 points
        trainer.steps_done = step
        trainer.student_classes = lambda _, right=right: (torch.arange(256) >= right).long()
        trainer.select(batch, teacher_classes)
        kept.append(trainer.kept.step)
    assert kept == [1, 2, 2, 4]
    assert trainer.kept.peak == pytest.approx(141 / 256)


def test_both_trainers_keep_the_trainer_contract(text_files, tiny_teacher) -> None:
    from dfkd_cli.config import load_recipe
    from dfkd_cli.selection import Trainer
    from dfkd_cli.teacher import load_teacher
    from dfkd_cli.text.models import build_text_student, load_text_teacher
    from dfkd_cli.trainer import StudentTrainer

    text = load_text_teacher(text_files["bert"])
    image = load_teacher(tiny_teacher["path"], "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])
    cpu = torch.device("cpu")
    trainers = [TextTrainer(build_text_student("bert-1", text), text, load_recipe("random-text").train, cpu),
                StudentTrainer(image.model, image.model, load_recipe("dfad").train, cpu)]
    for trainer in trainers:
        assert isinstance(trainer, Trainer), type(trainer).__name__
        assert all(hasattr(trainer, name) for name in Trainer.__annotations__), type(trainer).__name__


def test_the_text_trainer_uses_nesterov_momentum_when_asked(text_files) -> None:
    from dfkd_cli.config import load_recipe
    from dfkd_cli.text.models import build_text_student, load_text_teacher

    teacher = load_text_teacher(text_files["bert"])
    train = load_recipe("random-text", ["train.optimizer=\"sgd\"", "train.nesterov=true"]).train
    trainer = TextTrainer(build_text_student("bert-1", teacher), teacher, train, torch.device("cpu"))
    assert trainer.optimizer.param_groups[0]["nesterov"] is True
