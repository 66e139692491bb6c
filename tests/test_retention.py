"""Retention updates: the memory bank, replay and "retain while acquiring" (lra) student losses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dfkd_cli.config import TrainConfig, load_recipe
from dfkd_cli.errors import DfkdError
from dfkd_cli.retention import MemoryBank
from dfkd_cli.trainer import StudentTrainer, kd_loss

CPU = torch.device("cpu")


def _net(seed: int, bn: bool = True) -> nn.Module:
    """A tiny conv net on 1x8x8 inputs with 10 classes (tanh: smooth for second-order checks)."""
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(4) if bn else nn.Identity()
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10))


def _batches(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randn(3 * n, 1, 8, 8, generator=gen)


def _trainer(student: nn.Module, teacher: nn.Module, memory: torch.Tensor | None = None,
             **train: object) -> StudentTrainer:
    # NCHW like the hand-written references below, so their floats match exactly
    cfg = TrainConfig(**{"steps": 10, "batch_size": 8, "temperature": 4.0, "channels_last": False, **train})
    trainer = StudentTrainer(copy.deepcopy(student), teacher, cfg, CPU)
    if memory is not None and trainer.memory is not None:
        trainer.memory.add(memory)
    return trainer


def _grad(trainer: StudentTrainer, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """The flattened gradient of the trainer's loss on ``x`` (memory draws seeded alike)."""
    torch.manual_seed(seed)
    params = list(trainer.student.parameters())
    return torch.cat([g.flatten() for g in torch.autograd.grad(trainer.loss_for(x), params)])


def _grads(update: str, student: nn.Module, teacher: nn.Module, x: torch.Tensor, memory: torch.Tensor,
           **train: object) -> torch.Tensor:
    return _grad(_trainer(student, teacher, memory, update=update, **train), x)


def test_memory_bank_is_a_ring_buffer():
    bank = MemoryBank(5)
    with pytest.raises(RuntimeError, match="empty"):
        bank.sample(1)
    bank.add(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2))
    assert len(bank) == 3
    bank.add((10 + torch.arange(4.0)).view(4, 1, 1, 1).expand(4, 1, 2, 2))
    assert len(bank) == 5
    stored = bank.state_dict()["data"][:, 0, 0, 0].tolist()
    assert stored == [12.0, 13.0, 2.0, 10.0, 11.0]  # the oldest two (0, 1) were overwritten
    sample = bank.sample(64)
    assert sample.shape == (64, 1, 2, 2)
    assert set(sample[:, 0, 0, 0].tolist()) <= set(stored)
    assert len(set(sample[:, 0, 0, 0].tolist())) > 1  # not a single slot
    bank.add((20 + torch.arange(7.0)).view(7, 1, 1, 1).expand(7, 1, 2, 2))  # larger than the bank
    assert sorted(bank.state_dict()["data"][:, 0, 0, 0].tolist()) == [22.0, 23.0, 24.0, 25.0, 26.0]


def test_memory_bank_state_round_trips():
    bank = MemoryBank(6)
    bank.add(torch.randn(4, 2))
    copy_ = MemoryBank(6)
    copy_.load_state_dict(bank.state_dict())
    for b in (bank, copy_):
        b.add(torch.arange(6.0).view(3, 2))
    assert torch.equal(bank.state_dict()["data"], copy_.state_dict()["data"])
    assert bank.state_dict()["position"] == copy_.state_dict()["position"] == 1
    with pytest.raises(ValueError):
        MemoryBank(2).load_state_dict(bank.state_dict())


def test_plain_update_is_one_kd_sgd_step_and_keeps_no_memory():
    teacher, student = _net(0).eval(), _net(1)
    trainer = _trainer(student, teacher, lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference = copy.deepcopy(student)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(2):
        x, _ = _batches(step)
        trainer.step(x)
        for group in opt.param_groups:
            group["lr"] = trainer._lr_at(step)
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(reference(x), t, "kl", 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert trainer.memory is None and trainer.last_parts == {}
    for (name, a), b in zip(trainer.student.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_replay_adds_the_kd_loss_on_memory_samples():
    teacher, student = _net(0).eval(), _net(1)
    x, memory = _batches(0)
    g_plain = _grads("plain", student, teacher, x, memory)
    g_replay = _grads("replay", student, teacher, x, memory)
    assert (g_replay - g_plain).norm() > 1e-3 * g_plain.norm()
    # by hand: the same memory draw, grad L_acq + grad L_ret
    bank = MemoryBank(4096)
    bank.add(memory)
    torch.manual_seed(3)
    m = bank.sample(8)
    model = copy.deepcopy(student)
    with torch.no_grad():
        tx, tm = teacher(x), teacher(m)
    g_acq = torch.autograd.grad(kd_loss(model(x), tx, "kl", 4.0), list(model.parameters()))
    g_ret = torch.autograd.grad(kd_loss(model(m), tm, "kl", 4.0), list(model.parameters()))
    expected = torch.cat([(a + r).flatten() for a, r in zip(g_acq, g_ret)])
    torch.testing.assert_close(g_replay, expected, rtol=1e-5, atol=1e-7)


def test_lra_differs_from_replay_and_its_retention_term_reaches_theta():
    teacher, student = _net(0).eval(), _net(1)
    x, memory = _batches(0)
    g_plain = _grads("plain", student, teacher, x, memory)
    g_replay = _grads("replay", student, teacher, x, memory)
    for order in ("exact", "first"):
        g_lra = _grads("lra", student, teacher, x, memory, lra_inner_lr=0.5, lra_order=order)
        assert torch.isfinite(g_lra).all() and torch.isfinite(g_replay).all()
        assert (g_lra - g_replay).norm() > 1e-3 * g_replay.norm(), order
        # The released code's bug (theta detached in the inner step) makes this difference zero:
        # L_ret would then give theta no gradient and lra would be the plain KD step.
        assert (g_lra - g_plain).norm() > 0.1 * (g_replay - g_plain).norm(), order


def test_lra_with_a_vanishing_inner_step_is_replay():
    teacher, student = _net(0).eval(), _net(1)
    x, memory = _batches(0)
    g_replay = _grads("replay", student, teacher, x, memory)
    g_lra = _grads("lra", student, teacher, x, memory, lra_inner_lr=1e-8)
    torch.testing.assert_close(g_lra, g_replay, rtol=1e-4, atol=1e-7)


def test_lra_uses_the_current_learning_rate_when_inner_lr_is_zero():
    teacher, student = _net(0).eval(), _net(1)
    x, memory = _batches(0)
    g_default = _grads("lra", student, teacher, x, memory, lra_inner_lr=0.0, lr=0.3)
    g_alpha = _grads("lra", student, teacher, x, memory, lra_inner_lr=0.3, lr=0.01)
    torch.testing.assert_close(g_default, g_alpha)


def test_first_order_lra_departs_from_exact_and_replay_linearly_in_alpha():
    teacher, student = _net(0, bn=False).double().eval(), _net(1, bn=False).double()
    x, memory = (b.double() for b in _batches(0))
    g_replay = _grads("replay", student, teacher, x, memory)
    exact_gap, first_gap = [], []
    for alpha in (1e-2, 1e-3):
        g_exact = _grads("lra", student, teacher, x, memory, lra_inner_lr=alpha, lra_order="exact")
        g_first = _grads("lra", student, teacher, x, memory, lra_inner_lr=alpha, lra_order="first")
        exact_gap.append(float((g_exact - g_first).norm()))
        first_gap.append(float((g_first - g_replay).norm()))
    assert exact_gap[1] > 0 and first_gap[1] > 0
    assert 5 < exact_gap[0] / exact_gap[1] < 20
    assert 5 < first_gap[0] / first_gap[1] < 20


@pytest.mark.parametrize(("override", "key"), [
    ('train.update="foo"', "train.update"),
    ("train.memory_size=0", "train.memory_size"),
    ("train.memory_batch=-1", "train.memory_batch"),
    ("train.lra_inner_lr=-0.1", "train.lra_inner_lr"),
    ('train.lra_order="second"', "train.lra_order"),
])
def test_bad_retention_settings_are_one_line_errors(override, key):
    with pytest.raises(DfkdError, match=key.replace(".", r"\.")):
        load_recipe("noise", overrides=[override])


def test_retention_settings_load_and_validate_directly():
    overrides = ['train.update="lra"', 'train.lra_order="first"', "train.memory_size=64"]
    cfg = load_recipe("noise", overrides=overrides).train
    assert (cfg.update, cfg.lra_order, cfg.memory_size) == ("lra", "first", 64)
    with pytest.raises(DfkdError, match="train.memory_size"):
        TrainConfig(memory_size=0)
    with pytest.raises(DfkdError, match="train.update"):
        TrainConfig(update="meta")


@pytest.mark.parametrize("update", ["replay", "lra"])
def test_retention_trainer_fills_its_memory_and_reports_both_terms(update):
    teacher, student = _net(0).eval(), _net(1)
    trainer = _trainer(student, teacher, update=update, memory_size=20, memory_batch=6, lra_inner_lr=0.05)
    for step in range(4):
        x, _ = _batches(step)
        loss = trainer.step(x)
        assert len(trainer.memory) == min((step + 1) * 8, 20)
        parts = trainer.last_parts
        assert set(parts) == {"acq", "ret"}
        assert (parts["ret"] == 0.0) == (step == 0)  # nothing to retain before the first batch is stored
        assert loss == pytest.approx(parts["acq"] + parts["ret"], rel=1e-5)
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
