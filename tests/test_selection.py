"""Student selection on held-out synthetic samples, and --recipe auto."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dfkd_cli.archs import arch_has_bn
from dfkd_cli.config import TrainConfig, applicable_recipes, recipe_info
from dfkd_cli.selection import Reservoir, TrajectoryHoldout, split
from dfkd_cli.trainer import StudentTrainer, predict_classes


def test_reservoir_keeps_a_uniform_sample_of_everything_added():
    torch.manual_seed(0)
    counts = torch.zeros(100)
    for _ in range(300):
        reservoir = Reservoir(10)
        for start in range(0, 100, 5):
            reservoir.add(torch.arange(start, start + 5, dtype=torch.float32)[:, None])
        assert reservoir.tensor().shape == (10, 1)
        counts[reservoir.tensor()[:, 0].long()] += 1
    early, late = counts[:50].sum(), counts[50:].sum()
    assert abs(float(early - late)) / float(counts.sum()) < 0.1  # old items are not pushed out
    assert int((counts > 0).sum()) > 90


def test_reservoir_below_capacity_holds_exactly_what_was_added():
    reservoir = Reservoir(8)
    reservoir.add(torch.arange(3.0)[:, None])
    assert reservoir.tensor()[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert [len(h) for h in split(reservoir.tensor())] == [1, 2]


def _toy():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(8, 3)).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    return teacher, student


def test_snapshots_are_thinned_but_keep_the_latest():
    teacher, student = _toy()
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=40), torch.device("cpu"))
    for _ in range(40):
        trainer.steps_done += 1
        trainer.snapshot(keep=8)
    steps = [step for step, _ in trainer._snapshots]
    assert len(steps) <= 8 and steps[-1] == 40 and steps[0] <= 10  # still spread over the run


def test_select_snapshot_picks_the_best_scoring_weights_not_the_last():
    teacher, student = _toy()
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=1), torch.device("cpu"))
    x = torch.randn(256, 1, 2, 4)
    t = predict_classes(teacher, x)
    student.load_state_dict(teacher.state_dict())  # perfect agreement
    trainer.snapshot()
    with torch.no_grad():
        student[1].weight.mul_(-1.0)  # the later snapshot disagrees
    trainer.snapshot()
    assert trainer.select_snapshot(x, t) == 1.0
    assert trainer.kept.step == 0
    assert torch.equal(trainer.restore_best()[1].weight, teacher[1].weight)


@dataclass
class _Teacher:
    model: nn.Module


class _DriftingSynth:
    """An online synthesizer stand-in: each holdout call draws from a shifting distribution."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = _Teacher(teacher)
        self.calls = 0

    def holdout(self, n: int) -> torch.Tensor:
        self.calls += 1
        return torch.randn(n, 1, 2, 4) + self.calls


def test_trajectory_holdout_draws_along_the_run_and_selects_at_the_end():
    teacher, student = _toy()
    synth = _DriftingSynth(teacher)
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=3), torch.device("cpu"))
    selector = TrajectoryHoldout(synth, trainer, size=64)
    for _ in range(3):
        trainer.steps_done += 1
        agreement = selector.evaluate()
        assert 0.0 <= agreement <= 1.0
    holdout, best = selector.finish()
    assert synth.calls == 4 and len(trainer._snapshots) == 4
    assert len(holdout) == 4 * selector.per_evaluation  # under capacity: all draws kept
    assert best == trainer.kept.agreement


@pytest.mark.parametrize("arch, expected", [("lenet5", False), ("resnet8", True), ("vgg11", False), ("vgg11_bn", True)])
def test_arch_has_bn(arch: str, expected: bool):
    assert arch_has_bn(arch) is expected


def test_applicable_recipes_leave_out_batchnorm_recipes_without_batchnorm(tiny_teacher):
    @dataclass
    class NoBn:
        has_bn: bool = False

    names = applicable_recipes(NoBn())
    assert "noise" in names and "dfad" in names and "cmi" not in names
    assert all(not recipe_info(n).requires_bn for n in names)
