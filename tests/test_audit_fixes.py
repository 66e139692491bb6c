"""Fixes from a method audit (issue #16, item 6): the TV-l2 prior is DeepInversion's batch-sum
definition, FastDFKD's warm-up counts only the batches the student trains on, DAFL's class-balance
entropy is in base 10 as in the authors' code, and every adversarial term's gradient really flows
through the student's branch (it fails when that branch is detached)."""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from dfkd_cli.archs import create_model
from dfkd_cli.config import load_recipe
from dfkd_cli.prior import PriorData
from dfkd_cli.synth import synthesizer_class
from dfkd_cli.synth.losses import LOSS_TERMS, LossInputs, total_variation, weighted_loss
from dfkd_cli.teacher import Teacher, load_teacher

from conftest import quadrant_task
from kit import make_synth

CPU = torch.device("cpu")
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Teacher:
    return load_teacher(tiny_teacher["path"], "resnet8", SHAPE, mean=[0.5], std=[0.5])


def make(name: str, teacher: Teacher, *overrides: str, student: nn.Module | None = None, **context):
    cfg = load_recipe(name, list(overrides))
    return make_synth(cfg.recipe.synthesizer, teacher, cfg.synth, cfg.loss, student=student, **context)


def near_student(teacher: Teacher, seed: int = 1) -> nn.Module:
    """A copy of the teacher with perturbed weights: it agrees on most inputs (the masked
    adversarial term keeps those) but not exactly, so there is something to disagree on."""
    student = copy.deepcopy(teacher.model).requires_grad_(True).train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.numel() > 1:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
    return student


# ---- 1. TV-l2 is DeepInversion's: the four difference norms over the whole batch -----------------

def test_tv_l2_is_the_sum_of_the_four_difference_norms_over_the_whole_batch():
    image = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # horizontal diffs 1, 1; vertical 0; diagonals 1 and -1
    assert float(total_variation(image, 2)) == pytest.approx(math.sqrt(2) + 2, rel=1e-6)
    # Four copies: every difference tensor has 4x the squared sum, so each norm doubles (not / 4).
    assert float(total_variation(image.repeat(4, 1, 1, 1), 2)) == pytest.approx(2 * (math.sqrt(2) + 2), rel=1e-6)


def test_tv_l2_at_the_recipe_weight_is_the_reference_term():
    torch.manual_seed(0)
    x = torch.randn(256, 3, 32, 32)  # where DeepInversion's pixels start, at the recipe's batch size
    norms = [torch.linalg.vector_norm(d) for d in (x[..., 1:] - x[..., :-1], x[:, :, 1:] - x[:, :, :-1],
                                                   x[:, :, 1:, 1:] - x[:, :, :-1, :-1],
                                                   x[:, :, 1:, :-1] - x[:, :, :-1, 1:])]
    for recipe in ("deepinversion", "adi"):
        weight = load_recipe(recipe).loss["tv_l2"]
        total, parts = weighted_loss({"tv_l2": weight}, LossInputs(x=x, logits=torch.zeros(256, 10)))
        assert parts["tv_l2"] == pytest.approx(float(sum(norms)), rel=1e-5)
        assert float(total) == pytest.approx(weight * float(sum(norms)), rel=1e-5)


def test_tv_l1_and_l2_prior_are_per_sample_and_do_not_grow_with_the_batch():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    many = x.repeat(8, 1, 1, 1)
    for term in ("tv_l1", "l2"):
        one, batch = (float(LOSS_TERMS[term](LossInputs(x=v, logits=torch.zeros(len(v), 2)))) for v in (x, many))
        assert batch == pytest.approx(one, rel=1e-5), term


# ---- 2. FastDFKD's warm-up counts the batches that train the student ----------------------------

def logged_batches(synth) -> list[bool]:
    """Whether the adversarial term was on, for each batch the synthesizer makes from now on."""
    calls: list[bool] = []
    make_batch = synth.make_batch

    def logged(n: int) -> torch.Tensor:
        calls.append(synth._adv_on())
        return make_batch(n)

    synth.make_batch = logged
    return calls


def test_fast_held_out_batches_do_not_use_up_the_warm_up(teacher, tiny_teacher):
    from dfkd_cli.distill import Run, start
    from dfkd_cli.runtime import Budget, Display
    from dfkd_cli.trainer import StudentTrainer

    torch.manual_seed(0)
    recipe = load_recipe("fast", ["synth.iterations=1", "synth.batch_size=8", "synth.ngf=8", "synth.latent_dim=16",
                                  "synth.warmup=2", "train.holdout=32"])
    student = create_model("resnet8", 4, SHAPE)
    synth = make_synth("fast", teacher, recipe.synth, recipe.loss, student=student)  # the pipeline's order
    trainer = StudentTrainer(student, teacher.model, recipe.train, CPU, input_shape=SHAPE)
    calls = logged_batches(synth)
    start(Run("fast", recipe, synth, trainer), Budget(None), Display())  # makes the 32 held-out samples
    assert calls == [False] * 4, "held-out batches were made against the untrained student"
    calls.clear()
    synth.synthesize()
    assert calls == [False, False, True], "the first synthesize() makes both warm-up batches, then one adversarial"
    assert len(synth.pool) == 24 and synth.pool_batches == 3 and synth.batches_made == 7


def test_fast_warm_up_progress_survives_a_state_round_trip(teacher):
    torch.manual_seed(0)
    overrides = ["synth.iterations=1", "synth.batch_size=8", "synth.ngf=8", "synth.latent_dim=16", "synth.warmup=1"]
    student = near_student(teacher)
    synth = make("fast", teacher, *overrides, student=student)
    synth.holdout(16)
    synth.synthesize()
    again = make("fast", teacher, *overrides, student=student)
    again.load_state_dict(copy.deepcopy(synth.state_dict()))
    assert again.pool_batches == 2 and again._adv_on()
    fresh = make("fast", teacher, *overrides, student=student)
    fresh.holdout(16)
    assert fresh.pool_batches == 0 and not fresh._adv_on()


# ---- 3. DAFL's information entropy in base 10, as the authors' code; DFQ's in nats --------------

def uniform_teacher() -> Teacher:
    """A LeNet-5 whose last layer is zero: the same uniform prediction over 10 classes for any input."""
    torch.manual_seed(0)
    model = create_model("lenet5", 10, (1, 32, 32)).eval().requires_grad_(False)
    model.fc2.weight.zero_(), model.fc2.bias.zero_()
    return Teacher(model, "lenet5", 10, (1, 32, 32), (0.1307,), (0.3081,), [str(i) for i in range(10)], "-", "-")


@pytest.mark.parametrize(("name", "expected"), [("dafl", -1.0), ("dfq", -math.log(10))])
def test_information_entropy_units(name, expected):
    teacher = uniform_teacher()
    terms = synthesizer_class(name).loss_terms
    synth = make(name, teacher, "synth.batch_size=8", "synth.ngf=8",
                 *[f"synth.loss.{t}={1.0 if t == 'ie' else 0.0}" for t in terms])
    loss, parts = synth.generator_loss(synth.generator(synth.latent(8)))
    # Uniform over 10 classes: minus the entropy is -log10(10) = -1 for DAFL, -ln(10) for DFQ.
    assert parts["ie"] == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


# ---- 4. the adversarial gradient flows through the student's branch ----------------------------

def student_branch_share(synth, gradient: Callable[[], torch.Tensor], monkeypatch) -> float:
    """Relative change of ``gradient()`` when the student's logits are detached: how much of the
    adversarial gradient flows through the student rather than through the teacher alone."""
    full = gradient()
    live = synth.student_logits
    with monkeypatch.context() as patch:
        patch.setattr(synth, "student_logits", lambda x: live(x).detach())
        teacher_only = gradient()
    return float((full - teacher_only).norm() / full.norm())


def pixel_gradient(synth) -> torch.Tensor:
    """The pixels' gradient in DeepInversion's first Adam step (the same seed every call)."""
    captured = {}
    step = torch.optim.Adam.step

    def capture(self, *args, **kwargs):
        captured["grad"] = self.param_groups[0]["params"][0].grad.clone()
        return step(self, *args, **kwargs)

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", capture)
        synth.make_batch(8)
    return captured["grad"]


def test_adi_competition_gradient_flows_through_the_student(teacher, monkeypatch):
    synth = make("adi", teacher, "synth.iterations=1", "synth.batch_size=8", "synth.jitter=0", "synth.flip=false",
                 *[f"synth.loss.{t}=0" for t in ("ce", "bn", "tv_l2", "l2")], student=near_student(teacher))
    assert student_branch_share(synth, lambda: pixel_gradient(synth), monkeypatch) > 0.1


def inversion_gradient(synth) -> torch.Tensor:
    """The generator's gradient in the first iteration of a CMI/Fast batch (the same seed every call)."""
    captured = {}
    synth._after_backward = lambda g: captured.setdefault("grad", torch.cat([p.grad.flatten() for p in g.parameters()]))
    initial = copy.deepcopy(synth.generator.state_dict())  # Fast's meta update moves the generator
    torch.manual_seed(0)
    synth.make_batch(16)
    synth.generator.load_state_dict(initial)
    return captured["grad"]


@pytest.mark.parametrize(("name", "specific"), [("cmi", "synth.loss.cr=0"), ("fast", "synth.warmup=0")])
def test_masked_adversarial_gradient_flows_through_the_student(teacher, monkeypatch, name, specific):
    torch.manual_seed(0)
    synth = make(name, teacher, "synth.iterations=1", "synth.batch_size=16", "synth.ngf=8", "synth.latent_dim=16",
                 "synth.crop_pad=0", "synth.flip=false", specific,
                 "synth.loss.bn=0", "synth.loss.oh=0", "synth.loss.adv=1", student=near_student(teacher))
    assert student_branch_share(synth, lambda: inversion_gradient(synth), monkeypatch) > 0.1


def avkd_gradient(synth) -> torch.Tensor:
    """The generator's gradient of AVKD's generator loss on one labelled batch (the same seed every call)."""
    torch.manual_seed(0)
    y = synth.labels(32)
    loss, _ = synth.generator_loss(synth.generator(synth.code(y)), y)
    synth.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in synth.generator.parameters() if p.grad is not None])


def test_avkd_adversarial_gradient_flows_through_the_student(teacher, monkeypatch, tmp_path):
    x, _ = quadrant_task(64, seed=7)
    np.savez(tmp_path / "prior.npz", x=(x[:, 0].numpy() * 255).astype(np.uint8))
    torch.manual_seed(0)
    synth = make("avkd", teacher, "synth.batch_size=32", "synth.ngf=8", "synth.d_width=8",
                 "synth.loss.prior=0", "synth.loss.ce=0", "synth.loss.adv=1", student=near_student(teacher),
                 prior=PriorData(str(tmp_path / "prior.npz"), SHAPE, [0.5], [0.5], batch_size=32, workers=0))
    assert student_branch_share(synth, lambda: avkd_gradient(synth), monkeypatch) > 0.1
