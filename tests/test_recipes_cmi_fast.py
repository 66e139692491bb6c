"""CMI (Fang et al., IJCAI 2021) and FastDFKD (Fang et al., AAAI 2022) do what their papers say,
shown on the tiny trained teacher with small settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dfkd_cli.archs import create_model
from dfkd_cli.cli import app
from dfkd_cli.config import load_recipe
from dfkd_cli.synth.context import no_progress
from dfkd_cli.synth.cmi import FeatureBank, instance_contrast, random_resized_crop
from dfkd_cli.synth.inversion import InversionInputs, masked_adversarial
from dfkd_cli.synth.losses import BatchNormStatistics
from dfkd_cli.teacher import load_teacher

import kit
from kit import make_synth

# The quadrant task's class is where the square is: no crops or flips for the teacher's view.
SMALL = ["synth.latent_dim=16", "synth.ngf=8", "synth.head_dim=32", "synth.crop_pad=0", "synth.flip=false"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(tiny_teacher["path"], "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])


def _synth(teacher, recipe: str, *overrides: str, student: nn.Module | None = None):
    small = [o for o in SMALL if recipe == "cmi" or "head_dim" not in o]
    cfg = load_recipe(recipe, [*small, *overrides])
    return make_synth(recipe, teacher, cfg.synth, cfg.loss, student=student)


def _record(synth) -> list[dict[str, float]]:
    """Every synthesis iteration's loss parts from now on (the run's stop rule, never stopping)."""
    history: list[dict[str, float]] = []
    synth.hooks.follow(progress=no_progress, stop=lambda it, total, parts: history.append(parts) or False)
    return history


# ---- loss terms on their own ---------------------------------------------------------------------

def test_bn_momentum_compares_an_ema_of_batch_statistics_with_the_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)).eval()
    a, b = torch.randn(8, 1, 6, 6), 2 * torch.randn(8, 1, 6, 6) + 1
    stats = lambda x: (model[0](x).mean((0, 2, 3)), model[0](x).var((0, 2, 3), unbiased=False))  # noqa: E731
    (mean_a, var_a), (mean_b, var_b) = stats(a), stats(b)
    running_mean, running_var = model[1].running_mean, model[1].running_var
    with torch.no_grad(), BatchNormStatistics(model, momentum=0.9) as bn, BatchNormStatistics(model) as plain:
        model(a)  # first batch: no average yet, the same as the plain loss
        assert float(bn.loss()) == pytest.approx(float(plain.loss()), rel=1e-6)
        bn.update_momentum()
        assert torch.allclose(bn.average[0][0], mean_a, atol=1e-6)
        assert torch.allclose(bn.average[0][1], var_a, atol=1e-6)
        bn.reset(), plain.reset()
        model(b)
        ema_mean, ema_var = 0.9 * mean_a + 0.1 * mean_b, 0.9 * var_a + 0.1 * var_b
        expected = torch.norm(ema_mean - running_mean) + torch.norm(ema_var - running_var)
        assert float(bn.loss()) == pytest.approx(float(expected), rel=1e-5)
        own = torch.norm(mean_b - running_mean) + torch.norm(var_b - running_var)  # default: this batch alone
        assert float(plain.loss()) == pytest.approx(float(own), rel=1e-5) and abs(float(own) - float(expected)) > 0.1
        bn.update_momentum()
        assert torch.allclose(bn.average[0][0], ema_mean, atol=1e-6)
        assert torch.allclose(bn.average[0][1], ema_var, atol=1e-6)


def test_adversarial_term_is_zero_for_a_twin_student_and_masked_where_they_disagree():
    torch.manual_seed(0)
    teacher_logits = torch.randn(6, 4, requires_grad=True)
    twin = teacher_logits.detach().clone().requires_grad_(True)
    value = masked_adversarial(InversionInputs(x=torch.zeros(1), logits=teacher_logits, student_logits=twin))
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-7)
    assert float(twin.grad.abs().max()) < 1e-7 and float(teacher_logits.grad.abs().max()) < 1e-7

    student = (teacher_logits.detach() + torch.randn(6, 4)).requires_grad_(True)
    student.data[:3] = teacher_logits.detach()[:3].roll(1, dims=1) * 3  # rows 0-2: a different argmax
    agree = teacher_logits.argmax(1) == student.argmax(1)
    assert agree[3:].any() and not agree[:3].any()
    value = masked_adversarial(InversionInputs(x=torch.zeros(1), logits=teacher_logits, student_logits=student))
    value.backward()
    assert float(value.detach()) < 0
    assert float(student.grad[~agree].abs().max()) == 0.0, "disagreeing samples must not contribute"
    assert float(student.grad[agree].abs().max()) > 0


def test_contrastive_loss_is_lower_for_distinct_samples_than_for_near_duplicates():
    torch.manual_seed(0)
    distinct = torch.randn(16, 32)
    duplicates = torch.randn(1, 32) + 0.01 * torch.randn(16, 32)
    views = lambda f: f + 0.05 * torch.randn_like(f)  # noqa: E731
    low = instance_contrast(distinct, views(distinct), None, 0.1)
    high = instance_contrast(duplicates, views(duplicates), None, 0.1)
    assert float(low) < 0.1 < float(torch.log(torch.tensor(16.0))) - 1 < float(high)
    # A memory bank holding the same sample's features makes it harder to discriminate.
    assert float(instance_contrast(distinct, views(distinct), distinct, 0.1)) > float(low) + 0.5


def test_feature_bank_fills_first_in_first_out_and_stays_bounded():
    bank = FeatureBank(capacity=5)
    assert bank.tensor() is None and len(bank) == 0
    bank.add(torch.arange(3.0)[:, None])
    assert bank.tensor().flatten().tolist() == [0, 1, 2]
    bank.add(torch.arange(3.0, 7.0)[:, None])
    assert len(bank) == 5 and sorted(bank.tensor().flatten().tolist()) == [2, 3, 4, 5, 6]
    bank.add(torch.arange(10.0, 22.0)[:, None])  # more than the capacity at once: the newest five
    assert sorted(bank.tensor().flatten().tolist()) == [17, 18, 19, 20, 21]


def test_random_resized_crop_keeps_the_shape_and_changes_the_view():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12, requires_grad=True)
    view = random_resized_crop(x, 0.25, True)
    assert view.shape == x.shape and not torch.allclose(view, x)
    view.sum().backward()
    assert x.grad is not None  # differentiable: the contrastive gradient reaches the generator


# ---- CMI ----------------------------------------------------------------------------------------

def test_cmi_bn_and_ce_terms_work_and_the_memory_bank_fills_and_stays_bounded(teacher):
    torch.manual_seed(0)
    # This teacher's BN loss is large (about 200 at the start), so it gets a light weight next to CE.
    synth = _synth(teacher, "cmi", "synth.iterations=30", "synth.batch_size=24", "synth.lr=0.01", "synth.bank_size=40",
                   "synth.loss.bn=0.05", "synth.loss.adv=0", student=None)
    history = _record(synth)
    synth.synthesize()
    assert len(history) == 30 and {"bn", "oh", "cr"} <= set(history[0])
    assert history[-1]["bn"] < 0.7 * history[0]["bn"], "BatchNorm statistics did not move towards the teacher's"
    assert history[-1]["acc"] >= 0.85 and history[-1]["oh"] < 0.2 * history[0]["oh"], "targets not reached"
    assert len(synth.pool) == 24 and len(synth.bank) == 24
    synth.config.iterations = 2
    synth.synthesize()
    assert len(synth.pool) == 48 and len(synth.bank) == 40 and synth.bank.count == 48
    synth.holdout(8)
    assert len(synth.pool) == 48 and synth.bank.count == 48, "held-out batches must not enter pool or bank"


def _mean_cosine(synth, x: torch.Tensor) -> float:
    f = torch.nn.functional.normalize(synth._embed(x), dim=1)
    similarity = f @ f.t()
    return float((similarity.sum() - similarity.diagonal().sum()) / (len(f) * (len(f) - 1)))


def test_cmi_contrastive_term_pushes_samples_apart(teacher):
    def batch(iterations: int):
        torch.manual_seed(3)
        synth = _synth(teacher, "cmi", f"synth.iterations={iterations}", "synth.batch_size=16", "synth.lr=0.01",
                       "synth.keep=last", "synth.loss.bn=0", "synth.loss.oh=0", "synth.loss.adv=0", "synth.loss.cr=1")
        history = _record(synth)
        return synth, synth.make_batch(16), history

    synth, start, _ = batch(1)
    _, end, history = batch(25)
    assert history[-1]["cr"] < history[0]["cr"] - 0.3, "instance discrimination did not improve"
    assert _mean_cosine(synth, end) < _mean_cosine(synth, start) - 0.05, "samples did not move apart"


def _generator_gradient(teacher, recipe: str, student: nn.Module | None, adv: float) -> torch.Tensor:
    torch.manual_seed(0)  # the same generator initialisation and latent code every call
    specific = "synth.warmup=0" if recipe == "fast" else "synth.loss.cr=0"
    synth = _synth(teacher, recipe, "synth.iterations=1", "synth.batch_size=16", specific, "synth.loss.bn=0.05",
                   f"synth.loss.adv={adv}", student=student)
    captured = {}
    synth._after_backward = lambda g: captured.setdefault("grad", torch.cat([p.grad.flatten() for p in g.parameters()]))
    torch.manual_seed(0)
    synth.make_batch(16)
    return captured["grad"]


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen) if p.numel() > 1 else 0)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", ["cmi", "fast"])
def test_adversarial_gradient_depends_on_the_student(teacher, recipe):
    twin = copy.deepcopy(teacher.model)  # the paper's failure mode: the teacher passed as the student
    without, with_adv = _generator_gradient(teacher, recipe, twin, 0.0), _generator_gradient(teacher, recipe, twin, 5.0)
    assert _relative(with_adv, without) < 1e-5, "a student equal to the teacher must give no adversarial gradient"
    # A student close to the teacher (it agrees on most samples, so the mask keeps them) but not equal.
    student = copy.deepcopy(teacher.model).requires_grad_(True).train()
    _perturb(student, seed=1)
    base = _generator_gradient(teacher, recipe, student, 0.0)
    first = _generator_gradient(teacher, recipe, student, 5.0)
    assert _relative(first, base) > 1e-2, "the adversarial term did not reach the generator"
    assert student.training and all(p.requires_grad for p in student.parameters())  # left as it was found
    _perturb(student, seed=2)
    second = _generator_gradient(teacher, recipe, student, 5.0)
    assert _relative(second, first) > 1e-2, "changing the student's weights did not change the gradient"


@pytest.mark.parametrize("recipe", ["cmi", "fast"])
def test_teacher_stays_frozen_in_eval_mode_with_unchanged_statistics(teacher, recipe):
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student = create_model("resnet8", 4, (1, 16, 16))
    synth = _synth(teacher, recipe, "synth.iterations=2", "synth.batch_size=8", student=student)
    synth.synthesize()
    assert not teacher.model.training and not any(m.training for m in teacher.model.modules())
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    assert not any(m._forward_hooks for m in teacher.model.modules())


# ---- Fast ---------------------------------------------------------------------------------------

def _capture_adapted(synth) -> dict:
    captured = {}
    end_batch = synth._end_batch

    def spy(generator):
        captured["meta_before"] = [p.detach().clone() for p in synth.generator.parameters()]
        captured["adapted"] = [p.detach().clone() for p in generator.parameters()]
        end_batch(generator)

    synth._end_batch = spy
    return captured


def test_fast_reptile_moves_the_meta_generator_toward_the_adapted_one(teacher):
    torch.manual_seed(0)
    synth = _synth(teacher, "fast", "synth.iterations=3", "synth.batch_size=16", "synth.meta_lr=0.25", "synth.warmup=0",
                   "synth.loss.adv=0")
    captured = _capture_adapted(synth)
    synth.make_batch(16)
    for before, adapted, after in zip(captured["meta_before"], captured["adapted"], synth.generator.parameters()):
        assert torch.allclose(after, before + 0.25 * (adapted - before), atol=1e-6)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(captured["adapted"], captured["meta_before"]))
    assert moved > 0, "the inner loop did not adapt the copy"


def test_fast_fomaml_applies_the_adapted_gradients_to_the_meta_generator(teacher):
    torch.manual_seed(0)
    synth = _synth(teacher, "fast", "synth.iterations=3", "synth.batch_size=16", "synth.meta=\"fomaml\"",
                   "synth.warmup=0", "synth.loss.adv=0")
    sums: list[torch.Tensor] = []
    after_backward = synth._after_backward

    def spy(generator):
        grads = [p.grad.clone() for p in generator.parameters()]
        sums[:] = grads if not sums else [s + g for s, g in zip(sums, grads)]
        after_backward(generator)

    synth._after_backward = spy
    before = [p.detach().clone() for p in synth.generator.parameters()]
    synth.make_batch(16)
    # Before its step, the meta optimizer held the sum of the inner gradients (Adam's first step
    # then moves every parameter with a non-zero gradient by about lr in the direction -sign(grad)).
    for p, s, b in zip(synth.generator.parameters(), sums, before):
        assert torch.allclose(p.grad, s, atol=1e-6)
        step = (p.detach() - b)[s.abs() > 1e-8]
        assert torch.all(step * s[s.abs() > 1e-8] <= 0)
    assert any(not torch.equal(p, b) for p, b in zip(synth.generator.parameters(), before))


@pytest.mark.parametrize("meta", ["reptile", "fomaml"])
def test_fast_meta_learned_initialisation_beats_a_fresh_one_after_a_few_steps(teacher, meta):
    overrides = ["synth.iterations=3", "synth.batch_size=16", "synth.warmup=0", "synth.loss.adv=0",
                 "synth.meta_lr=0.5", "synth.lr=0.01", "synth.bn_momentum=0", f"synth.meta=\"{meta}\""]
    torch.manual_seed(0)
    learned = _synth(teacher, "fast", *overrides)
    for _ in range(12):
        learned.make_batch(16)
    fresh = _synth(teacher, "fast", *overrides)
    losses = {}
    for name, synth in (("learned", learned), ("fresh", fresh)):
        history = _record(synth)
        torch.manual_seed(5)
        synth.make_batch(16)
        losses[name] = 10 * history[-1]["bn"] + 0.5 * history[-1]["oh"]
    assert losses["learned"] < 0.8 * losses["fresh"], losses


def test_fast_updates_bn_momentum_and_skips_adv_during_warmup(teacher):
    torch.manual_seed(0)
    student = create_model("resnet8", 4, (1, 16, 16))
    synth = _synth(teacher, "fast", "synth.iterations=2", "synth.batch_size=8", "synth.warmup=2", student=student)
    history = _record(synth)
    assert all(a is None for a in synth.bn.average)
    synth.synthesize()  # two warm-up batches and one regular batch
    assert synth.batches_made == 3 and len(synth.pool) == 24
    assert ["adv" in parts for parts in history] == [False] * 4 + [True] * 2
    assert all(a is not None for a in synth.bn.average)
    state = synth.state_dict()
    assert {"generator", "meta_optimizer", "bn", "pool"} <= set(state)


@pytest.mark.parametrize("recipe", ["cmi", "fast"])
def test_state_dict_restores_generator_memory_and_pool(teacher, recipe):
    torch.manual_seed(0)
    student = create_model("resnet8", 4, (1, 16, 16))
    synth = _synth(teacher, recipe, "synth.iterations=2", "synth.batch_size=8", "synth.warmup=0" if recipe == "fast"
                   else "synth.bank_size=64", student=student)
    synth.synthesize(), synth.synthesize()
    state = copy.deepcopy(synth.state_dict())
    again = _synth(teacher, recipe, "synth.iterations=2", "synth.batch_size=8", student=student)
    again.load_state_dict(state)
    assert torch.equal(again.pool.tensor(), synth.pool.tensor()) and again.batches_made == 2
    generators = zip(again.generator.state_dict().values(), synth.generator.state_dict().values())
    assert all(torch.equal(a, b) for a, b in generators)
    assert all(a is None and b is None or torch.equal(a[0], b[0]) for a, b in zip(again.bn.average, synth.bn.average))
    if recipe == "cmi":
        assert torch.equal(again.bank.tensor(), synth.bank.tensor()) and again.bank.next == synth.bank.next
        assert all(torch.equal(a, b) for a, b in zip(again.head.parameters(), synth.head.parameters()))
    else:
        assert all(a is not None for a in again.bn.average)  # BN momentum state carried over


def test_224_inputs_work_with_a_torchvision_teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mobilenet.pt"
    torch.save(kit.random_teacher("mobilenet_v3_small", 5, (3, 224, 224)).state_dict(), path)
    big = load_teacher(path, "mobilenet_v3_small", (3, 224, 224), normalize="imagenet")
    student = create_model("mobilenet_v3_small", 5, (3, 224, 224))
    for recipe in ("cmi", "fast"):
        synth = _synth(big, recipe, "synth.iterations=1", "synth.batch_size=2", student=student)
        synth.synthesize()
        assert synth.sample(2).shape == (2, 3, 224, 224)


# ---- command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["cmi", "fast"])
def test_recipe_refuses_a_teacher_without_batchnorm(recipe, tmp_path):
    path = tmp_path / "lenet.pt"
    torch.save(create_model("lenet5", 10, (1, 32, 32)).state_dict(), path)
    result = CliRunner().invoke(app, ["compress", str(path), "--arch", "lenet5", "--recipe", recipe,
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "BatchNorm" in lines[0] and "recipes that apply:" in lines[0]
    assert "noise" in lines[0] and recipe not in lines[0].split("recipes that apply:")[1]


@pytest.mark.parametrize("recipe", ["cmi", "fast"])
def test_compress_end_to_end(recipe, tiny_teacher, tmp_path):
    out = tmp_path / recipe
    specific = {"head_dim": 32} if recipe == "cmi" else {"warmup": 1}
    report = kit.report_of(kit.cli(*kit.compress_args(
        tiny_teacher, out, recipe, 20, "--eval-data", tiny_teacher["eval"], *kit.generator(iterations=4, **specific),
        *kit.train(steps_per_round=10, crop_pad=1))))
    assert report["run"]["recipe"] == recipe and report["run"]["steps"] == 20
    assert (out / "student.safetensors").is_file() and (out / "samples.png").is_file()
