"""fp16 loss scaling and channels_last: the scaler rescues gradients fp16 would flush to zero,
skips overflowed steps, and every backward pass of the trainer and synthesizers goes through it;
channels_last changes the layout, never the values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd_cli.config import TrainConfig
from dfkd_cli.errors import DfkdError
from dfkd_cli.precision import LossScaler, Precision, channels_last, contiguous, resolve_precision
from dfkd_cli.trainer import StudentTrainer
from dfkd_cli.zoo_lenet import LeNet5

CPU = torch.device("cpu")


def _tiny_gradient(scaler: LossScaler) -> torch.Tensor:
    """The weight gradient of a loss whose fp16 output gradients (1e-9) lie below fp16's smallest subnormal."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(torch.randn(16, 8))
    scaler.backward(out.float().sum() * 1e-9)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    scaler.unscale(optimizer)
    return layer.weight.grad.clone()


def test_loss_scaling_keeps_gradients_that_fp16_flushes_to_zero():
    assert torch.count_nonzero(_tiny_gradient(LossScaler(enabled=False))) == 0
    scaled = _tiny_gradient(LossScaler(enabled=True))
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 4), torch.randn(16, 8)
    layer(x).sum().mul(1e-9).backward()  # fp32 reference
    assert torch.allclose(scaled, layer.weight.grad, rtol=0.01, atol=0)


def test_an_overflowed_step_is_skipped_and_the_scale_halves():
    scaler, layer = LossScaler(enabled=True), nn.Linear(4, 2)
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = layer(torch.full((2, 4), 1e4)).float().sum() * 1e4  # x 65536 overflows fp16's 65504
    scaler.backward(loss)
    scaler.step(optimizer)
    assert torch.equal(layer.weight, before) and scaler.scale == 32768.0


def test_a_disabled_scaler_is_the_plain_backward_and_step():
    scaler, layer = LossScaler(enabled=False), nn.Linear(4, 2)
    before = layer.weight.detach().clone()
    scaler.backward(layer(torch.ones(2, 4)).sum())
    scaler.step(torch.optim.SGD(layer.parameters(), lr=0.1))
    assert scaler.scale == 1.0 and not torch.equal(layer.weight, before)
    assert torch.allclose(before - layer.weight, 0.1 * torch.full_like(before, 2.0))


def test_precision_resolution_on_a_cpu():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp16", CPU) == "fp16"
    assert Precision("fp16", CPU).scaler().enabled and not Precision("bf16", CPU).scaler().enabled
    with pytest.raises(DfkdError, match="must be one of"):
        Precision("fp8", CPU)


def _growth(scaler: LossScaler) -> int:
    """Successful scaled steps since the scale last changed (GradScaler's growth tracker)."""
    return int(scaler.state_dict()["_growth_tracker"])


def test_student_steps_in_fp16_go_through_the_scaler():
    teacher = LeNet5(10, 1).eval()
    trainer = StudentTrainer(LeNet5(10, 1), teacher, TrainConfig(batch_size=8), CPU, precision=Precision("fp16", CPU))
    with Precision("fp16", CPU).autocast():
        losses = [trainer.step(torch.randn(8, 1, 32, 32)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert _growth(trainer.scaler) == 3 and trainer.scaler.scale == 65536.0


SYNTH_SETTINGS = {
    "dfad": ["synth.batch_size=4", "synth.g_steps=2", "synth.ngf=8", "synth.latent_dim=8"],
    "fast": ["synth.batch_size=4", "synth.iterations=2", "synth.ngf=8", "synth.latent_dim=8", "synth.meta=fomaml"],
    "deepinversion": ["synth.batch_size=4", "synth.iterations=2"],
    "zskd": ["synth.batch_size=4", "synth.iterations=2", "synth.impressions=4"],
}


@pytest.mark.parametrize("recipe", sorted(SYNTH_SETTINGS))
def test_synthesizer_backward_passes_in_fp16_go_through_its_scaler(recipe, tiny_teacher):
    from dfkd_cli.archs import create_model
    from dfkd_cli.config import load_recipe
    from dfkd_cli.teacher import load_teacher
    from kit import make_synth

    teacher = load_teacher(tiny_teacher["path"], "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])
    cfg = load_recipe(recipe, SYNTH_SETTINGS[recipe])
    student = create_model("resnet8", teacher.num_classes, teacher.input_shape)
    precision = Precision("fp16", CPU)
    synth = make_synth(recipe, teacher, cfg.synth, cfg.loss, student=student, precision=precision)
    assert synth.scaler.enabled  # the context's precision, from construction on
    with precision.autocast():
        synth.synthesize()
    assert _growth(synth.scaler) + (synth.scaler.scale < 65536.0) >= 1  # stepped, or skipped an overflow


def test_channels_last_changes_the_layout_not_the_outputs():
    torch.manual_seed(0)
    model, x = LeNet5(10, 1).eval(), torch.randn(4, 1, 32, 32)
    expected = model(x)
    channels_last(model)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(model(x), expected, atol=1e-5)
    contiguous(model)
    assert all(p.is_contiguous() for p in model.parameters())


def test_the_trainer_keeps_the_student_channels_last_unless_told_not_to():
    teacher = LeNet5(10, 1).eval()
    on = StudentTrainer(LeNet5(10, 1), teacher, TrainConfig(), CPU).student
    off = StudentTrainer(LeNet5(10, 1), teacher, TrainConfig(channels_last=False), CPU).student
    assert on.conv2.weight.is_contiguous(memory_format=torch.channels_last) and not on.conv2.weight.is_contiguous()
    assert off.conv2.weight.is_contiguous()


def test_losses_are_computed_in_fp32_from_half_precision_logits():
    from dfkd_cli.synth.losses import LossInputs, weighted_loss
    from dfkd_cli.trainer import kd_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(64, 10).half(), torch.randn(64, 10).half()
    expected = kd_loss(student.float(), teacher.float(), "kl", 20.0)
    with torch.autocast("cpu", dtype=torch.float16):
        value = kd_loss(student, teacher, "kl", 20.0)
        same = kd_loss(teacher, teacher, "kl", 20.0)
        total, _ = weighted_loss({"ce": 1.0}, LossInputs(x=torch.zeros(64, 1).half(), logits=student,
                                                          targets=teacher.argmax(1)))
    assert value.dtype == torch.float32 and torch.allclose(value, expected, rtol=1e-5)
    assert abs(float(same)) < 1e-5  # computed in half precision it is 0.04 here, not 0
    assert total.dtype == torch.float32
