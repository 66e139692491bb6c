"""DAFL, ZSKT, DFAD and DFQ: every generator loss term moves what its paper says, the adversarial
gradient really depends on the student, the teacher is never changed, attention transfer works
where blocks match and says so where they do not, and each recipe compresses end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dfkd_cli.archs import create_model
from dfkd_cli.cli import app
from dfkd_cli.config import TrainConfig, load_recipe
from dfkd_cli.errors import DfkdError
from dfkd_cli.synth import synthesizer_class
from dfkd_cli.synth.adversarial import PenultimateFeatures, entropy
from dfkd_cli.teacher import Teacher, load_teacher
from dfkd_cli.trainer import StudentTrainer, attention_map, block_stages
from kit import make_synth

CPU = torch.device("cpu")
RECIPES = ("dafl", "zskt", "dfad", "dfq")
SMALL = ["synth.batch_size=32", "synth.ngf=8"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Teacher:
    return load_teacher(tiny_teacher["path"], "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])


def lenet_teacher(arch: str = "lenet5") -> Teacher:
    torch.manual_seed(0)
    model = create_model(arch, 10, (1, 32, 32)).eval().requires_grad_(False)
    return Teacher(model, arch, 10, (1, 32, 32), (0.1307,), (0.3081,), [str(i) for i in range(10)], "-", "-")


def make(name: str, teacher: Teacher, *overrides: str, student: nn.Module | None = None):
    cfg = load_recipe(name, [*SMALL, *overrides])
    student = student if student is not None else create_model(teacher.arch, teacher.num_classes, teacher.input_shape)
    return make_synth(name, teacher, cfg.synth, cfg.loss, student=student)


def only(term: str, terms: tuple[str, ...]) -> list[str]:
    return [f"synth.loss.{t}={1.0 if t == term else 0.0}" for t in terms]


def run_steps(synth, steps: int) -> list[dict[str, float]]:
    history: list[dict[str, float]] = []
    with synth.hooks.stopping_when(lambda it, total, parts: history.append(parts) or False):
        for _ in range(steps):
            synth.synthesize()
    return history


@torch.no_grad()
def batch_mean_entropy(synth, z: torch.Tensor) -> float:
    return float(entropy(torch.softmax(synth.teacher.model(synth.generator(z)), 1).mean(0)))


@pytest.mark.parametrize("term", ["oh", "act", "ie"])
def test_dafl_terms_move_what_they_should(teacher, term):
    torch.manual_seed(1)
    # The trained tiny teacher is confident on almost anything, so the one-hot term is shown on an
    # untrained LeNet-5 (its last layer scaled up so that inputs can move its predictions).
    model = teacher
    if term == "oh":
        model = lenet_teacher()
        model.model.fc2.weight.mul_(20)
    synth = make("dafl", model, *only(term, ("oh", "act", "ie")), "synth.lr=0.02")
    z = torch.randn(64, synth.config.latent_dim)
    before = batch_mean_entropy(synth, z)
    history = run_steps(synth, 20)
    assert set(history[0]) >= {term} and not set(history[0]) & ({"oh", "act", "ie"} - {term})
    first, last = history[0][term], sum(h[term] for h in history[-3:]) / 3
    assert last < first - 0.05 * abs(first), f"{term} did not fall: {first:.4f} -> {last:.4f}"
    if term == "ie":  # classes balance: the entropy of the batch-mean prediction rises
        assert batch_mean_entropy(synth, z) > before + 0.05
    if term == "act":  # the penultimate features grow
        assert -last > 1.1 * -first


def test_dafl_works_for_lenet5_without_batchnorm():
    teacher = lenet_teacher()
    assert not teacher.has_bn and not synthesizer_class("dafl").capabilities.requires_bn
    synth = make("dafl", teacher)
    with PenultimateFeatures(teacher.model, teacher.classifier_name) as features:
        teacher.model(torch.zeros(2, 1, 32, 32))
    assert features.features.shape == (2, 84)  # the input of fc2
    synth.synthesize()
    assert set(synth.status()) >= {"oh", "act", "ie", "g_loss", "lr_g"}
    assert synth.sample(16).shape == (16, 1, 32, 32)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in teacher.model.modules())


def test_dafl_trains_the_student_on_the_generator_batch_then_fresh_samples(teacher):
    synth = make("dafl", teacher)
    synth.synthesize()
    first, second = synth.sample(32), synth.sample(32)
    assert not torch.equal(first, second)
    assert synth._generator_batch is None


@pytest.mark.parametrize("term", ["bn", "ent", "ie"])
def test_dfq_terms_move_what_they_should(teacher, term):
    torch.manual_seed(2)
    synth = make("dfq", teacher, *only(term, ("bn", "ent", "ie", "adv")), "synth.lr=0.01")
    history = run_steps(synth, 12)
    assert set(history[0]) & {"bn", "ent", "ie", "adv"} == {term}
    first, last = history[0][term], sum(h[term] for h in history[-3:]) / 3
    assert last < first - 0.05 * abs(first), f"{term} did not fall: {first:.4f} -> {last:.4f}"


def generator_gradient(synth, seed: int = 3) -> torch.Tensor:
    """The generator's gradient of its loss, by a real ``backward()`` (so that any student weight
    gradients the generator step computed would show in the student's ``.grad``)."""
    torch.manual_seed(seed)
    x = synth.generator(synth.latent(synth.config.batch_size))
    loss, _ = synth.generator_loss(x)
    synth.generator.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in synth.generator.parameters()])


def teacher_branch_gradient(synth) -> torch.Tensor:
    """``generator_gradient`` with the student's logits detached: the gradient through the teacher alone."""
    live = synth.student_logits
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synth, "student_logits", lambda x: live(x).detach())
        return generator_gradient(synth)


@pytest.mark.parametrize("name", ["zskt", "dfad", "dfq"])
def test_adversarial_gradient_depends_on_the_student(teacher, name):
    terms = synthesizer_class(name).loss_terms
    student = copy.deepcopy(teacher.model).train().requires_grad_(True)
    synth = make(name, teacher, *only("adv", terms), student=student)
    same = generator_gradient(synth)
    assert float(same.abs().max()) < 1e-6, "student == teacher must give no adversarial gradient"
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed = generator_gradient(synth)
    assert float(changed.abs().max()) > 1e-4
    # The student's logits must carry gradient: detaching them changes the generator's gradient.
    through_student = float((changed - teacher_branch_gradient(synth)).norm() / changed.norm())
    assert through_student > 0.1, "no gradient flowed through the student's branch"
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(generator_gradient(synth), changed, rtol=1e-3, atol=1e-6)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert all(p.grad is None for p in student.parameters()), "the generator step computed student weight gradients"


@pytest.mark.parametrize("name", ["zskt", "dfad"])
def test_adversarial_term_raises_disagreement(teacher, name):
    torch.manual_seed(4)
    synth = make(name, teacher, "synth.lr=0.01")
    history = run_steps(synth, 10)
    assert history[-1]["adv"] < history[0]["adv"], "the generator did not find more disagreement"


@pytest.mark.parametrize("name", RECIPES)
def test_teacher_stays_frozen_in_eval_mode(teacher, name):
    params = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    synth = make(name, teacher)
    synth.synthesize()
    synth.sample(16)
    synth.holdout(8)
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    assert all(torch.equal(params[k], v) for k, v in teacher.model.state_dict().items()), "teacher weights or BN statistics moved"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in teacher.model.modules())


def test_state_dict_round_trip_repeats_the_generator(teacher):
    synth = make("zskt", teacher)
    synth.synthesize()
    other = make("zskt", teacher)
    other.load_state_dict(synth.state_dict())
    z = torch.randn(32, synth.config.latent_dim)
    with torch.no_grad():
        assert torch.allclose(synth.generator(z), other.generator(z))
    assert other.updates == 1 and other.status()["lr_g"] == pytest.approx(synth.status()["lr_g"])


def test_bad_generator_schedule_is_refused_at_recipe_load():
    with pytest.raises(DfkdError, match="synth.schedule"):
        load_recipe("zskt", ["synth.schedule=linear"])
    with pytest.raises(DfkdError, match="schedule_steps"):
        load_recipe("zskt", ["synth.schedule_steps=-1"])


def test_generator_schedule_follows_the_run_unless_given_a_length(tiny_teacher):
    teacher = load_teacher(tiny_teacher["path"], "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])
    cfg = load_recipe("zskt", ["synth.schedule=\"cosine\"", "synth.schedule_steps=0", "synth.batch_size=4"])
    synth = make_synth("zskt", teacher, cfg.synth, cfg.loss, progress=lambda: 1.0)  # the run is over: cosine at zero
    assert synth._schedule_progress(3) == 1.0
    cfg = load_recipe("zskt", ["synth.schedule_steps=10"])
    fixed = make_synth("zskt", teacher, cfg.synth, cfg.loss, progress=lambda: 1.0)
    assert fixed._schedule_progress(5) == 0.5


def test_224_inputs_with_a_torchvision_model():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, (3, 224, 224)).eval().requires_grad_(False)
    teacher = Teacher(model, "resnet18", 10, (3, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                      [str(i) for i in range(10)], "-", "-")
    synth = make("dfq", teacher, "synth.batch_size=2", student=create_model("resnet18", 10, (3, 224, 224)))
    synth.synthesize()
    assert synth.sample(2).shape == (2, 3, 224, 224) and synth.status()["bn"] > 0


# --- attention transfer ---------------------------------------------------------------------


class TwoStages(nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.layer1 = nn.Conv2d(1, 4, 3, padding=1)
        self.layer2 = nn.Conv2d(4, 4, 3, stride=stride, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def attention_distance(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    from dfkd_cli.trainer import BlockOutputs

    with torch.no_grad(), BlockOutputs([m for _, m in block_stages(teacher)]) as t, \
            BlockOutputs([m for _, m in block_stages(student)]) as s:
        teacher(x), student.eval()(x)
    student.train()
    return sum(float((attention_map(a) - attention_map(b)).pow(2).sum(1).mean()) for a, b in zip(s.outputs, t.outputs))


def train_student(teacher: nn.Module, attention: float, x: torch.Tensor, steps: int) -> nn.Module:
    torch.manual_seed(5)
    student = create_model("resnet8", 4, (1, 16, 16))
    trainer = StudentTrainer(student, teacher, TrainConfig(steps=steps, lr=0.05, attention=attention,
                                                           schedule="constant"), CPU, input_shape=(1, 16, 16))
    for _ in range(steps):
        trainer.step(x)
    return trainer.student


def test_attention_transfer_moves_student_maps_toward_the_teachers(teacher):
    torch.manual_seed(6)
    x = torch.randn(32, 1, 16, 16)
    trainer = StudentTrainer(create_model("resnet8", 4, (1, 16, 16)), teacher.model,
                             TrainConfig(attention=250.0), CPU, input_shape=(1, 16, 16))
    assert trainer.attention.active and trainer.attention_note.startswith("attention transfer on")
    assert "layer1, layer2, layer3" in trainer.attention_note
    with trainer.attention.teacher_outputs() as t, trainer.attention.student_outputs() as s:
        teacher.model(x), trainer.student(x)
    assert float(trainer.attention.loss(s, t).detach()) > 0
    without = attention_distance(train_student(teacher.model, 0.0, x, 15), teacher.model, x)
    with_at = attention_distance(train_student(teacher.model, 1000.0, x, 15), teacher.model, x)
    assert with_at < 0.7 * without, (with_at, without)
    assert not any(m._forward_hooks for m in teacher.model.modules())


def test_attention_transfer_says_when_blocks_do_not_match():
    lenet, half = lenet_teacher("lenet5").model, lenet_teacher("lenet5_half").model
    trainer = StudentTrainer(copy.deepcopy(half).requires_grad_(True), lenet, TrainConfig(attention=250.0), CPU, input_shape=(1, 32, 32))
    assert not trainer.attention.active
    assert trainer.attention_note.startswith("attention transfer off") and "no matching blocks" in trainer.attention_note
    trainer.step(torch.randn(8, 1, 32, 32))  # trains without the term
    sizes = StudentTrainer(TwoStages(stride=1), TwoStages(stride=2).eval(), TrainConfig(attention=250.0), CPU)
    assert sizes.attention.active  # same number of blocks; sizes are known after the first step
    sizes.step(torch.randn(4, 1, 8, 8))
    assert not sizes.attention.active and "sizes differ" in sizes.attention_note
    assert StudentTrainer(TwoStages(1), TwoStages(1).eval(), TrainConfig(), CPU).attention_note == ""


def test_torchvision_resnets_have_matching_blocks():
    teacher = create_model("resnet34", 10, (3, 64, 64)).eval()
    trainer = StudentTrainer(create_model("resnet18", 10, (3, 64, 64)), teacher, TrainConfig(attention=250.0), CPU,
                             input_shape=(3, 64, 64))
    assert trainer.attention.active and "layer1, layer2, layer3, layer4" in trainer.attention_note


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_distills_a_student_through_the_pipeline_loop(teacher, tiny_teacher, name):
    """The pipeline's own distillation loop (synthesize, student steps, trajectory selection)."""
    from dfkd_cli.eval_data import load_eval_data
    from dfkd_cli.distill import Run, distill
    from dfkd_cli.runtime import Budget, Display

    torch.manual_seed(0)
    recipe = load_recipe(name, [*SMALL, "train.steps=40", "train.batch_size=32", "train.holdout=32",
                                "train.eval_every=10", "synth.schedule_steps=10", "train.temperature=4.0"])
    student = create_model("resnet8", 4, (1, 16, 16))
    synth = make_synth(name, teacher, recipe.synth, recipe.loss, student=student)  # the pipeline's order
    trainer = StudentTrainer(student, teacher.model, recipe.train, CPU, input_shape=(1, 16, 16))
    run = Run(name, recipe, synth, trainer)
    holdout, curve = distill(run, Budget(None), Display()), run.curve
    assert trainer.steps_done == 40 and holdout.shape[1:] == (1, 16, 16) and len(holdout) >= 16
    assert len(curve) == 4 and all(0 <= a <= 1 for a in curve)  # an agreement per evaluation
    assert len(trainer._snapshots) >= 4 and 0 < trainer.kept.step <= 40
    assert synth.preview(64).shape == (64, 1, 16, 16)
    real = load_eval_data(tiny_teacher["eval"], (1, 16, 16), [0.5], [0.5])
    student = trainer.restore_best()
    with torch.no_grad():
        accuracy = float((student(real.x).argmax(1) == real.y).float().mean())
    assert trainer.kept.agreement >= 0.5, f"{name}: the selected student disagrees with the teacher on held-out samples"
    if name == "dafl":  # the adversarial games need far more than 40 steps before real accuracy moves
        assert accuracy > 0.4, f"the student learned nothing about the real task ({accuracy:.2f}, chance 0.25)"


def test_compress_end_to_end_with_a_generator_recipe(tiny_teacher, tmp_path):
    out = tmp_path / "dafl"
    args = ["compress", tiny_teacher["path"], *tiny_teacher["args"], "--student", "resnet8", "--recipe", "dafl",
            "--steps", "20", "--out", out, "--device", "cpu", "--format", "json",
            "-s", "synth.batch_size=32", "-s", "synth.ngf=8", "-s", "train.batch_size=32",
            "-s", "train.holdout=32", "-s", "train.eval_every=10"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert report["run"]["recipe"] == "dafl" and report["run"]["steps"] == 20
    assert (out / "student.safetensors").is_file() and (out / "samples.png").is_file()


def test_dfq_refuses_a_teacher_without_batchnorm(tmp_path):
    path = tmp_path / "lenet.pt"
    torch.save(lenet_teacher().model.state_dict(), path)
    result = CliRunner().invoke(app, ["compress", str(path), "--arch", "lenet5", "--recipe", "dfq",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "needs a teacher with BatchNorm" in result.stderr and "dafl" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_clip_bounds_the_generator_gradient_norm(clip, teacher):
    synth = make("zskt", teacher, f"synth.grad_clip={clip}")
    norms = []
    original_step = synth.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for p in synth.generator.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original_step(*args, **kwargs)

    synth.optimizer.step = step
    run_steps(synth, 3)
    if clip:
        assert max(norms) <= clip * 1.0001
    else:
        assert min(norms) > 1e-2  # unclipped gradients are far larger than the clip tested above
