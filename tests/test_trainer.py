"""The student trainer: KD loss definitions, augmentation, and best-student selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.config import TrainConfig
import dfkd_cli.trainer as trainer_module
from dfkd_cli.kept import KeptStudent, within_noise
from dfkd_cli.trainer import StudentTrainer, augment, kd_loss, mixup, predict_classes


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    t = torch.randn(8, 5)
    assert float(kd_loss(t, t, "kl", 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(t + torch.randn(8, 5), t, "kl", 4.0)) > 0


def test_kd_loss_is_kl_teacher_student_scaled_by_t_squared():
    s, t, temp = torch.randn(6, 3), torch.randn(6, 3), 3.0
    p, q = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * temp**2
    assert float(kd_loss(s, t, "kl", temp)) == pytest.approx(float(expected), rel=1e-5)


def test_l1_loss_is_mean_absolute_logit_difference():
    s, t = torch.zeros(2, 2), torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    assert float(kd_loss(s, t, "l1", 1.0)) == pytest.approx(1.0)


def test_augment_crops_and_flips_but_keeps_shape():
    torch.manual_seed(0)
    x = torch.arange(2 * 16.0).view(2, 1, 4, 4)
    assert augment(x, 0, False) is x
    out = augment(x.repeat(50, 1, 1, 1), 1, True)
    assert out.shape == (100, 1, 4, 4)
    assert not torch.equal(out, x.repeat(50, 1, 1, 1))


def _toy_models():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(8, 3)).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return teacher, student


def test_trainer_raises_agreement_and_keeps_the_best_student():
    teacher, student = _toy_models()
    cfg = TrainConfig(steps=200, lr=0.05, optimizer="adam", temperature=1.0, weight_decay=0.0)
    trainer = StudentTrainer(student, teacher, cfg, torch.device("cpu"))
    x_val = torch.randn(512, 1, 2, 4)
    t_val = predict_classes(teacher, x_val)
    before = trainer.select(x_val, t_val)
    for _ in range(cfg.steps):
        trainer.step(torch.randn(64, 1, 2, 4))
    after = trainer.select(x_val, t_val)
    assert after > max(before, 0.9)
    best = trainer.kept.agreement
    with torch.no_grad():  # ruin the weights: the selected ones must come back
        for p in trainer.student.parameters():
            p.zero_()
    assert trainer.select(x_val, t_val) < best
    restored = trainer.restore_best()
    assert float((predict_classes(restored, x_val) == t_val).float().mean()) == pytest.approx(best)
    assert not restored.training


def test_within_noise_is_one_standard_error_of_the_peak():
    assert within_noise(0.55 - 0.031, 0.55, 256) and not within_noise(0.55 - 0.032, 0.55, 256)
    assert within_noise(0.9, 0.9, 10) and not within_noise(0.99, 1.0, 10_000)


def _agreeing(monkeypatch, agreements: list[float], n: int = 256):
    """Make ``predict_classes`` agree with all-zero teacher classes on the next share of ``n`` rows."""
    shares = iter(agreements)

    def fake(model, x, batch_size=512):
        wrong = n - round(next(shares) * n)
        return torch.cat([torch.zeros(n - wrong, dtype=torch.long), torch.ones(wrong, dtype=torch.long)])

    monkeypatch.setattr(trainer_module, "predict_classes", fake)


def test_selection_keeps_the_latest_student_within_noise_of_the_best(monkeypatch):
    teacher, student = _toy_models()
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=4), torch.device("cpu"))
    x, t = torch.zeros(256, 1, 2, 4), torch.zeros(256, dtype=torch.long)
    _agreeing(monkeypatch, [0.55, 0.53, 0.48, 0.54])  # one standard error at 0.55 on 256 samples: 3.1 points
    kept = []
    for step in range(1, 5):
        trainer.steps_done = step
        with torch.no_grad():
            trainer.student[1].bias.fill_(step)  # weights that say which step they are from
        trainer.select(x, t)
        kept.append(trainer.kept.step)
    assert kept == [1, 2, 2, 4]
    assert trainer.kept.peak == pytest.approx(0.55, abs=0.002)
    assert trainer.kept.agreement == pytest.approx(0.54, abs=0.002)
    assert float(trainer.restore_best()[1].bias[0].detach()) == 4.0


def test_snapshot_selection_keeps_the_latest_within_noise_of_the_best(monkeypatch):
    teacher, student = _toy_models()
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=4), torch.device("cpu"))
    for step in range(1, 5):
        trainer.steps_done = step
        trainer.snapshot()
    _agreeing(monkeypatch, [0.40, 0.56, 0.53, 0.50])
    trainer.select_snapshot(torch.zeros(256, 1, 2, 4), torch.zeros(256, dtype=torch.long))
    assert trainer.kept.step == 3 and trainer.kept.peak == pytest.approx(0.56, abs=0.002)


def test_cosine_schedule_decays_to_zero():
    teacher, student = _toy_models()
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=10, lr=0.1), torch.device("cpu"))
    assert trainer._lr_at(0) == pytest.approx(0.1) and trainer._lr_at(10) == pytest.approx(0.0)
    constant = StudentTrainer(student, teacher, TrainConfig(steps=10, lr=0.1, schedule="constant"), torch.device("cpu"))
    assert constant._lr_at(7) == 0.1


def test_the_kept_student_is_a_copy_and_survives_a_checkpoint_round_trip():
    weights = {"w": torch.ones(1)}
    kept = KeptStudent()
    assert kept.offer(0.6, 256, 5, weights) and not kept.offer(0.4, 256, 6, weights)
    weights["w"].add_(1.0)  # the trainer goes on updating its weights in place
    assert torch.equal(kept.weights["w"], torch.ones(1))
    again = KeptStudent()
    again.load_state_dict(kept.state_dict())
    assert (again.step, again.agreement, again.peak) == (5, 0.6, 0.6)
    older = {key: value for key, value in kept.state_dict().items() if key != "peak_agreement"}
    again.peak = -1.0
    again.load_state_dict(older)  # a checkpoint from before the rule: the peak is the kept agreement
    assert again.peak == 0.6


def test_mixup_blends_each_sample_with_another_of_the_batch():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2)  # sample i is the constant image i
    blended = mixup(x, 1.0).flatten(1)
    assert torch.equal(blended, blended[:, :1].expand_as(blended))  # a blend of two constant images is constant
    assert (blended >= 0).all() and (blended <= 7).all() and not torch.equal(blended, x.flatten(1))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_teacher_labels_the_blend_the_student_learns_from(alpha):
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    seen: dict[str, torch.Tensor] = {}
    teacher.register_forward_hook(lambda module, args, out: seen.__setitem__("teacher", args[0].clone()))
    student.register_forward_hook(lambda module, args, out: seen.__setitem__("student", args[0].detach().clone()))
    trainer = StudentTrainer(student, teacher.eval(), TrainConfig(mixup=alpha, channels_last=False), torch.device("cpu"))
    x = torch.randn(16, 3, 2, 2)
    trainer.step(x)
    assert torch.equal(seen["teacher"], seen["student"])
    assert torch.equal(seen["student"], x) == (alpha == 0.0)
