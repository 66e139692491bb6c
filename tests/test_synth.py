"""Synthesizers and loss terms do what their papers say, shown on a small trained teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_cli.config import load_recipe
from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.deepinversion import balanced_targets, random_jitter_flip
from dfkd_cli.synth.losses import BatchNormStatistics, LossInputs, total_variation, weighted_loss
from dfkd_cli.teacher import load_teacher
from kit import make_synth


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(tiny_teacher["path"], "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])


def _bn_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    return model.eval()


@torch.no_grad()
def test_bn_loss_vanishes_when_batch_statistics_match_running_statistics():
    model = _bn_model()
    x = torch.randn(64, 1, 12, 12)
    # Set each layer's running statistics to this batch's own statistics.
    h = model[0](x)
    model[1].running_mean.copy_(h.mean((0, 2, 3)))
    model[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    h = model[3](model[2](model[1](h)))
    model[4].running_mean.copy_(h.mean((0, 2, 3)))
    model[4].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    with BatchNormStatistics(model) as bn:
        model(x)
        assert float(bn.loss()) < 1e-4
        bn.reset()
        model(x * 3 + 1)
        assert float(bn.loss()) > 0.1


@torch.no_grad()
def test_first_bn_multiplier_weights_only_the_first_layer():
    model, x = _bn_model(), torch.randn(8, 1, 12, 12)
    with BatchNormStatistics(model, first_multiplier=1.0) as plain:
        model(x)
        first, second = (float(v) for v in plain.layer_losses)
    with BatchNormStatistics(model, first_multiplier=10.0) as weighted:
        model(x)
        assert float(weighted.loss()) == pytest.approx(10 * first + second, rel=1e-5)


def test_bn_hooks_are_removed_after_use():
    model = _bn_model()
    with BatchNormStatistics(model):
        assert model[1]._forward_hooks
    assert not any(m._forward_hooks for m in model.modules())


def test_total_variation_is_zero_on_flat_images_and_grows_with_noise():
    flat = torch.ones(2, 3, 8, 8)
    assert float(total_variation(flat, 1)) == 0.0 and float(total_variation(flat, 2)) == 0.0
    noisy = flat + torch.randn_like(flat)
    assert float(total_variation(noisy, 1)) > 0.5


def test_weighted_loss_skips_zero_weights_and_reports_parts():
    x = torch.randn(4, 1, 8, 8)
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    total, parts = weighted_loss({"ce": 2.0, "tv_l2": 0.0, "l2": 1.0}, LossInputs(x=x, logits=logits, targets=targets))
    assert set(parts) == {"ce", "l2"}
    assert float(total) == pytest.approx(2 * parts["ce"] + parts["l2"], rel=1e-5)


def test_balanced_targets_cover_classes_evenly():
    counts = torch.bincount(balanced_targets(40, 4, torch.Generator().manual_seed(0)), minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]
    assert len(set(balanced_targets(5, 100).tolist())) == 5  # more classes than samples: no repeats


def test_jitter_and_flip_move_pixels():
    torch.manual_seed(0)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    moved = [random_jitter_flip(x, 1, True) for _ in range(10)]
    assert any(not torch.equal(m, x) for m in moved)
    assert torch.equal(random_jitter_flip(x, 0, False), x)


def test_deepinversion_matches_bn_statistics_and_hits_targets(teacher):
    torch.manual_seed(0)
    # The quadrant task's class is where the square is, so no jitter; a light BN weight for 60 steps.
    cfg = load_recipe("deepinversion", ["synth.iterations=60", "synth.batch_size=32", "synth.lr=0.1", "synth.jitter=0",
                                        "synth.loss.bn=0.1"])
    history: list[dict[str, float]] = []
    synth = make_synth("deepinversion", teacher, cfg.synth, cfg.loss,
                       stop=lambda it, total, parts: history.append(parts) or False)
    synth.synthesize()
    assert len(synth.pool) == 32 and len(history) == 60
    assert history[-1]["bn"] < 0.5 * history[0]["bn"], "BatchNorm statistics did not move towards the teacher's"
    assert history[-1]["acc"] >= 0.9, "synthesized inputs are not classified as their target classes"
    x = synth.pool.tensor()
    preview = synth.preview(100)
    assert len(preview) == 32 and len({tuple(row.flatten()[:8].tolist()) for row in preview}) == 32  # distinct
    assert float(x.min()) >= (0 - 0.5) / 0.5 - 1e-6 and float(x.max()) <= (1 - 0.5) / 0.5 + 1e-6
    assert not any(m._forward_hooks for m in teacher.model.modules())


def test_deepinversion_stops_when_asked(teacher):
    cfg = load_recipe("deepinversion", ["synth.iterations=50", "synth.batch_size=8"])
    calls = []
    synth = make_synth("deepinversion", teacher, cfg.synth, cfg.loss, stop=lambda it, total, parts: calls.append(it) or it >= 3)
    assert synth.holdout(8).shape == (8, 1, 16, 16)
    assert calls == [1, 2, 3]
    assert len(synth.pool) == 0, "holdout samples must not enter the training pool"


def test_noise_synthesizer_draws_fresh_standard_normal_batches(teacher):
    cfg = load_recipe("noise")
    synth = make_synth("noise", teacher, cfg.synth, cfg.loss)
    synth.synthesize()
    a, b = synth.sample(4096), synth.sample(4096)
    assert a.shape == (4096, 1, 16, 16) and not torch.equal(a, b)
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02


def test_competition_term_is_one_when_student_equals_teacher_and_lower_when_they_disagree():
    from dfkd_cli.synth.losses import LOSS_TERMS, jensen_shannon

    logits = torch.randn(16, 4)
    same = LOSS_TERMS["adv"](LossInputs(x=torch.zeros(1), logits=logits, student_logits=logits.clone()))
    assert float(same) == pytest.approx(1.0, abs=1e-6)
    other = LOSS_TERMS["adv"](LossInputs(x=torch.zeros(1), logits=logits * 5, student_logits=-logits * 5))
    assert float(other) < 0.8
    p = torch.tensor([[1.0, 0.0]])
    assert float(jensen_shannon(p, p.flip(1))) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-4)


def _pixel_gradient(teacher, student, adv: float) -> torch.Tensor:
    cfg = load_recipe("adi", ["synth.iterations=1", "synth.batch_size=8", "synth.jitter=0", "synth.flip=false",
                              f"synth.loss.adv={adv}"])
    synth = make_synth("deepinversion", teacher, cfg.synth, cfg.loss, student=student)
    captured = {}
    original_step = torch.optim.Adam.step

    def capture(self, *args, **kwargs):
        captured["grad"] = self.param_groups[0]["params"][0].grad.clone()
        return original_step(self, *args, **kwargs)

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", capture)
        synth.make_batch(8)
    return captured["grad"]


def test_competition_changes_pixel_gradients_only_when_the_student_differs(teacher):
    import copy

    from dfkd_cli.archs import create_model

    twin = copy.deepcopy(teacher.model)  # agrees with the teacher everywhere: JS = 0, no gradient
    assert torch.allclose(_pixel_gradient(teacher, twin, 0.0), _pixel_gradient(teacher, twin, 1.0), atol=1e-6)
    torch.manual_seed(1)
    stranger = create_model("resnet8", 4, (1, 16, 16)).eval()
    without, with_adv = _pixel_gradient(teacher, stranger, 0.0), _pixel_gradient(teacher, stranger, 1.0)
    assert (with_adv - without).abs().max() > 1e-4, "the competition term did not reach the pixels"


def test_competition_needs_the_student():
    cfg = load_recipe("adi", ["synth.iterations=1", "synth.batch_size=2"])
    synth = make_synth("deepinversion", None, cfg.synth, cfg.loss)
    with pytest.raises(RuntimeError, match="needs the student"):
        synth.student_logits(torch.zeros(2, 1, 16, 16))


def _warm_synth(teacher, warm: int, full: int, *extra: str):
    cfg = load_recipe("deepinversion", [f"synth.iterations={full}", f"synth.warm_start_iterations={warm}",
                                        "synth.batch_size=16", "synth.lr=0.1", "synth.jitter=0", "synth.loss.bn=0.1",
                                        *extra])
    history: list[tuple[int, int, dict[str, float]]] = []
    synth = make_synth("deepinversion", teacher, cfg.synth, cfg.loss,
                       stop=lambda it, total, parts: history.append((it, total, parts)) or False)
    return synth, history


def _is_bilinear_upsampling(x: torch.Tensor, low_size: int) -> bool:
    """Whether every image in ``x`` is exactly the bilinear upsampling of some low_size^2 image: the
    least-squares preimage under the (separable, linear) upsampling operator reproduces it."""
    side = x.shape[-1]
    basis = torch.eye(low_size, dtype=torch.float64).view(low_size, 1, low_size, 1).expand(-1, 1, -1, low_size)
    up = F.interpolate(basis, size=(side, low_size), mode="bilinear", align_corners=False)[:, 0, :, 0].T
    pinv = torch.linalg.pinv(up)
    xd = x.double()
    return bool(torch.allclose(up @ (pinv @ xd @ pinv.T) @ up.T, xd, atol=1e-5))


def test_warm_start_optimises_a_low_resolution_image_then_continues_at_full_resolution(teacher, monkeypatch):
    shapes: list[tuple[int, ...]] = []
    original_step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        shapes.append(tuple(self.param_groups[0]["params"][0].shape))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    synth, history = _warm_synth(teacher, 4, 3)
    torch.manual_seed(0)
    synth.make_batch(16)
    assert shapes == [(16, 1, 8, 8)] * 4 + [(16, 1, 16, 16)] * 3
    assert [(it, total) for it, total, _ in history] == [(i, 7) for i in range(1, 8)]  # one count over both phases

    warm_only, _ = _warm_synth(teacher, 5, 0)
    x = warm_only.make_batch(16)
    assert x.shape == (16, 1, 16, 16) and _is_bilinear_upsampling(x, 8)
    assert float(x.min()) >= -1 - 1e-6 and float(x.max()) <= 1 + 1e-6  # pixel range of mean 0.5, std 0.5
    continued, _ = _warm_synth(teacher, 5, 3)
    assert not _is_bilinear_upsampling(continued.make_batch(16), 8), "the full-resolution phase did not run"
    assert not _is_bilinear_upsampling(torch.rand(4, 1, 16, 16), 8)  # the check can fail


def test_warm_start_changes_the_result_and_reaches_a_comparable_bn_loss(teacher):
    finals = {}
    for warm, full in ((0, 40), (20, 20)):
        synth, history = _warm_synth(teacher, warm, full)
        torch.manual_seed(0)
        finals[warm] = (synth.make_batch(16), history[-1][2])
        assert len(history) == 40
    (cold_x, cold), (warm_x, warm) = finals[0], finals[20]
    assert not torch.allclose(cold_x, warm_x)
    # Measured on this teacher: about 45 cold and 27 warm; at equal iterations warm is no worse.
    assert warm["bn"] <= cold["bn"] and warm["acc"] >= 0.9


def test_warm_start_stops_early_when_asked_and_rejects_bad_settings(teacher):
    synth, _ = _warm_synth(teacher, 10, 10)
    calls = []
    with synth.hooks.stopping_when(lambda it, total, parts: calls.append(it) or it >= 2):
        x = synth.make_batch(4)
    assert calls == [1, 2] and x.shape == (4, 1, 16, 16) and _is_bilinear_upsampling(x, 8)
    with pytest.raises(DfkdError, match="warm_start_scale"):
        load_recipe("deepinversion", ["synth.warm_start_scale=1.5"])
    with pytest.raises(DfkdError, match="warm_start_iterations"):
        load_recipe("deepinversion", ["synth.warm_start_iterations=-1"])
