"""The synthesizer contract, for every registered synthesizer (image and text): built from a
context alone, its capabilities declared, the operations' shapes, a state round trip, the run's
hooks honoured, read-only views of the context, and no code outside a synthesizer that sets
attributes on one."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import quadrant_task
from dfkd_cli.archs import create_model
from dfkd_cli.config import list_recipes, load_recipe, recipe_info
from dfkd_cli.prior import PriorData
from dfkd_cli.selection import FixedHoldout
from dfkd_cli.synth import (SYNTHESIZERS, Capabilities, RunHooks, StudentView, SynthContext, Synthesizer,
                            register_synthesizer)
from dfkd_cli.synth.from_synthetic import FromSyntheticSynthesizer
from dfkd_cli.runtime import Budget
from dfkd_cli.teacher import Teacher, load_teacher
from dfkd_cli.text.synth import TextSynthesizer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 16, 16)
IMAGE = sorted(name for name, cls in SYNTHESIZERS.items() if not issubclass(cls, TextSynthesizer))
TEXT = sorted(name for name, cls in SYNTHESIZERS.items() if issubclass(cls, TextSynthesizer))
# Tiny settings for whichever of them a synthesizer has: three iterations or generator steps each.
TINY = {"batch_size": 4, "iterations": 3, "g_steps": 3, "ngf": 8, "latent_dim": 8, "head_dim": 8, "bank_size": 16,
        "impressions": 8, "d_width": 8, "warmup": 0, "warm_start_iterations": 0}


@pytest.fixture(scope="module")
def teacher(tiny_teacher) -> Teacher:
    return load_teacher(tiny_teacher["path"], "resnet8", SHAPE, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> PriorData:
    x, _ = quadrant_task(64, seed=3)
    path = tmp_path_factory.mktemp("prior") / "prior.npz"
    np.savez(path, x=(x[:, 0].numpy() * 255).astype(np.uint8))
    return PriorData(path, SHAPE, [0.5], [0.5], batch_size=8, reserve=16, workers=0)


def _settings(name: str) -> tuple[object, dict[str, float]]:
    """``(config, loss)`` of a shipped recipe of synthesizer ``name`` (else its defaults with every
    term weighted 1), shrunk to :data:`TINY`."""
    cls = SYNTHESIZERS[name]
    tiny = {k: v for k, v in TINY.items() if k in {f.name for f in dataclasses.fields(cls.Config)}}
    shipped = [r for r in list_recipes() if recipe_info(r).synthesizer == name]
    if not shipped:
        return cls.Config(**tiny), {term: 1.0 for term in cls.loss_terms}
    recipe = load_recipe(shipped[0], [f"synth.{k}={v}" for k, v in tiny.items()])
    return recipe.synth, recipe.loss


def _context(teacher: Teacher, prior: PriorData, hooks: RunHooks | None = None) -> SynthContext:
    torch.manual_seed(0)
    student = create_model("resnet8", teacher.num_classes, SHAPE)
    return SynthContext(teacher, torch.device("cpu"), prior=prior, student=StudentView(student),
                        hooks=hooks or RunHooks())


def test_every_registered_class_is_an_image_or_a_text_synthesizer():
    assert {"noise", "deepinversion", "cmi", "fast", "dafl", "zskt", "dfad", "dfq", "zskd", "avkd",
            "prior-kd"} == set(IMAGE)
    assert {"random-text", "unlabeled-text", "promptdfd-manual", "promptdfd-rl"} == set(TEXT)
    assert all(issubclass(cls, Synthesizer) for cls in SYNTHESIZERS.values())  # text ones too: one contract
    assert all(isinstance(cls.capabilities, Capabilities) for cls in SYNTHESIZERS.values())


@pytest.mark.parametrize("name", IMAGE)
def test_built_from_a_context_alone_with_the_operations_shapes(teacher, prior, name):
    cls, (config, loss) = SYNTHESIZERS[name], _settings(name)
    caps = cls.capabilities
    context = _context(teacher, prior)
    synth = cls(context, config, loss)
    assert synth.teacher is teacher and synth.prior is prior and synth.hooks is context.hooks
    synth.synthesize()
    pooled = len(synth.pool)
    assert synth.sample(6).shape == (6, *SHAPE)
    assert synth.holdout(5).shape == (5, *SHAPE)
    assert len(synth.pool) == pooled, "held-out samples must not join the pool"
    assert caps.keeps_pool == (pooled > 0), "keeps_pool says whether the training data is the pool"
    assert 0 < len(synth.preview(3)) <= 3 and synth.preview(3).shape[1:] == SHAPE
    generator = synth.generator_module()
    assert generator is None or isinstance(generator, nn.Module)
    assert (generator is not None) or not caps.online, "an online synthesizer trains a generator"
    assert not (caps.online and caps.keeps_pool) and (caps.uses_prior or not caps.prior_holdout)
    restored = cls(_context(teacher, prior), config, loss)
    restored.load_state_dict(synth.state_dict())
    assert len(restored.pool) == pooled


@pytest.fixture(scope="module")
def text_context(bert_teacher_folder, gpt2_folder):
    """A text teacher, its bert-1 student, both language models and a corpus: what every text recipe reads."""
    from dfkd_cli.text.models import build_text_student, load_causal_lm, load_text_teacher
    from dfkd_cli.text.synth import TextCorpus
    from dfkd_cli.text.trainer import TextTrainer

    teacher = load_text_teacher(bert_teacher_folder)
    trainer = TextTrainer(build_text_student("bert-1", teacher), teacher, load_recipe("random-text").train, torch.device("cpu"))
    lms = {flag: load_causal_lm(gpt2_folder, f"--{flag}") for flag in ("generator", "prompter")}
    corpus = TextCorpus([f"sentence {i} of the corpus" for i in range(40)], holdout=8)
    return SynthContext(teacher, torch.device("cpu"), student=trainer.view(), prior=corpus, language_models=lms)


@pytest.mark.parametrize("name", TEXT)
def test_every_text_synthesizer_makes_labelled_batches_and_round_trips_its_state(text_context, name):
    from dfkd_cli.batches import TextBatch

    shipped = [r for r in list_recipes() if recipe_info(r).synthesizer == name][0]
    tiny = [f"synth.{k}={v}" for k, v in {"batch_size": 4, "max_new_tokens": 3, "prompt_length": 2}.items()
            if k in {f.name for f in dataclasses.fields(SYNTHESIZERS[name].Config)}]
    recipe = load_recipe(shipped, tiny)
    torch.manual_seed(0)
    synth = SYNTHESIZERS[name](text_context, recipe.synth, recipe.loss)
    synth.synthesize()
    pooled = len(synth.pool)
    batch, held = synth.sample(6), synth.holdout(5)
    assert isinstance(batch, TextBatch) and len(batch) == 6 and batch.logits.shape == (6, 2)
    assert isinstance(held, TextBatch) and len(held) == 5 and len(synth.pool) == pooled
    texts = batch.texts[:2]
    assert torch.allclose(batch.logits[:2], synth.label(texts), atol=1e-5), "the logits are the teacher's"
    restored = SYNTHESIZERS[name](text_context, recipe.synth, recipe.loss)
    restored.load_state_dict(synth.state_dict())
    assert restored.pool.texts == synth.pool.texts and torch.equal(restored.pool.logits, synth.pool.logits)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict()["scaler"].values(), synth.state_dict()["scaler"].values())) \
        if synth.state_dict()["scaler"] else True
    for key in ("prompter", "optimizer"):
        assert (key in synth.state_dict()) == (name == "promptdfd-rl"), "the prompter's training is state"


@pytest.mark.parametrize("name", IMAGE)
def test_the_run_s_stop_rule_ends_each_batch_after_the_iteration_it_says(teacher, prior, name):
    cls, (config, loss) = SYNTHESIZERS[name], _settings(name)
    calls: list[tuple[int, int]] = []
    hooks = RunHooks(stop=lambda it, total, parts: calls.append((it, total)) or True)
    synth = cls(_context(teacher, prior, hooks), config, loss)
    synth.synthesize()
    iterates = {"iterations", "g_steps"} & {f.name for f in dataclasses.fields(cls.Config)}
    assert calls == ([(1, 3)] if iterates else []), "asked once per iteration; stopped when told"


@pytest.mark.parametrize("name", IMAGE)
def test_the_context_is_read_only_from_the_synthesizer(teacher, prior, name):
    context = _context(teacher, prior)
    synth = SYNTHESIZERS[name](context, *_settings(name))
    for attribute in ("teacher", "device", "world", "prior", "hooks"):
        with pytest.raises(AttributeError):
            setattr(synth, attribute, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.student = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SYNTHESIZERS[name].capabilities.online = True  # type: ignore[misc]


def test_the_pool_follows_the_context_s_memory_limit_and_tells_its_spill_callback(teacher):
    notes: list[str] = []
    row_bytes = 4 * 16 * 16
    context = SynthContext(teacher, torch.device("cpu"), pool_memory_limit=6 * row_bytes, on_spill=notes.append)
    synth = SYNTHESIZERS["zskd"](context, *_settings("zskd"))
    synth.synthesize()
    assert notes == [] and len(synth.pool) == 4
    synth.synthesize()
    assert len(notes) == 1 and "spill" in notes[0] and len(synth.pool) == 8 and synth.sample(3).shape == (3, *SHAPE)
    synth.pool.clear()
    assert len(synth.pool) == 0


def test_learning_rates_follow_the_divergence_guard_s_scale_after_a_state_is_loaded(teacher, prior):
    pixels = SYNTHESIZERS["zskd"](_context(teacher, prior), *_settings("zskd"))  # Adam made per batch from config.lr
    configured = pixels.config.lr
    pixels.set_lr_scale(0.5, 1.0)
    pixels.set_lr_scale(0.25, 1.0)  # a second rollback, to a state saved before the first one
    assert pixels.config.lr == pytest.approx(0.25 * configured)
    online = SYNTHESIZERS["dfad"](_context(teacher, prior), *_settings("dfad"))
    rate, base = online.optimizer.param_groups[0]["lr"], online.scheduler.base_lrs[0]
    online.set_lr_scale(0.5, 1.0)
    assert online.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * rate)
    assert online.scheduler.base_lrs[0] == pytest.approx(0.5 * base)


def test_without_a_student_or_prior_in_the_context_the_terms_that_need_them_say_so(teacher):
    synth = FromSyntheticSynthesizer(SynthContext(teacher, torch.device("cpu")), FromSyntheticSynthesizer.Config(), {})
    with pytest.raises(RuntimeError, match="needs the student"):
        synth.student_logits(torch.zeros(2, *SHAPE))
    with pytest.raises(RuntimeError, match="needs prior images"):
        synth.prior_batch(2)


def test_hooks_switch_stop_rules_for_a_block_and_restore_the_run_s_after_it():
    hooks = RunHooks()
    assert hooks.progress() == 0.0 and not hooks.should_stop(1, 1, {})
    hooks.follow(progress=lambda: 0.25, stop=lambda it, total, parts: it >= 2)
    with pytest.raises(KeyError):
        with hooks.stopping_when(lambda it, total, parts: True):
            assert hooks.should_stop(1, 5, {})
            raise KeyError("an error inside the block")
    assert hooks.progress() == 0.25 and not hooks.should_stop(1, 5, {}) and hooks.should_stop(2, 5, {})


def test_held_out_samples_are_made_under_their_own_stop_rule_then_the_run_s_returns(teacher, prior):
    hooks = RunHooks(stop=lambda it, total, parts: True)  # the run's rule: stop at once
    synth = SYNTHESIZERS["deepinversion"](_context(teacher, prior, hooks), *_settings("deepinversion"))
    seen: list[int] = []
    trainer = SimpleNamespace(teacher_classes=lambda x: torch.zeros(len(x), dtype=torch.long))
    selector = FixedHoldout.make(synth, trainer, 8, Budget(None), lambda it, total, parts: seen.append(it))
    assert seen == [1, 2, 3] * 2 and selector.holdout.shape == (8, *SHAPE)  # two batches of 4, every iteration
    assert hooks.should_stop(1, 3, {}), "the run's stop rule is back after the held-out samples"


def test_registration_needs_declared_capabilities_and_a_free_name():
    class Undeclared(Synthesizer):
        pass

    with pytest.raises(TypeError, match="must declare capabilities"):
        register_synthesizer("contract-undeclared")(Undeclared)

    class Declared(Synthesizer):
        capabilities = Capabilities(keeps_pool=False)

    with pytest.raises(ValueError, match="'noise' is taken"):
        register_synthesizer("noise")(Declared)
    try:
        assert register_synthesizer("contract-declared")(Declared) is Declared
        assert SYNTHESIZERS["contract-declared"] is Declared
    finally:
        SYNTHESIZERS.pop("contract-declared", None)
    assert "contract-undeclared" not in SYNTHESIZERS


def test_importing_the_text_synthesizers_first_registers_the_same_names_in_the_same_order():
    code = "import dfkd_cli.text.prompter; from dfkd_cli.synth import SYNTHESIZERS; print(','.join(SYNTHESIZERS))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip().split(",") == list(SYNTHESIZERS)


# ---- nothing outside a synthesizer sets attributes on one ----------------------------------------

def outside_assignments(source: str) -> list[str]:
    """Assignments whose target is reached through something named ``synth`` (``synth.x = ...``,
    ``run.synth.pool.on_spill = ...``, ``setattr(synth, ...)``), as ``line: target``; a recipe's
    ``recipe.synth`` is its settings, not a synthesizer."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            targets = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        for target in targets:
            if isinstance(target, ast.Attribute) and _through_synth(target.value):
                found.append(f"{node.lineno}: {ast.unparse(target)}")
    return found


def _through_synth(node: ast.expr) -> bool:
    while isinstance(node, ast.Attribute):
        if node.attr == "synth":
            owner = node.value
            return (owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)) != "recipe"
        node = node.value
    return isinstance(node, ast.Name) and node.id == "synth"


def test_the_scan_finds_outside_assignments():
    assert outside_assignments("run.synth.on_step = f\nsynth.pool.memory_limit = 1\nsynth.student, x = s, 1\n"
                               "setattr(self.synth, 'prior', p)\n") == [
        "1: run.synth.on_step", "2: synth.pool.memory_limit", "3: synth.student", "4: self.synth.?"]
    assert outside_assignments("self.synth = synth\nsynth = make()\nx = synth.sample(4)\n"
                               "run.recipe.synth.lr = 0.1\n") == []


def test_no_code_outside_a_synthesizer_sets_attributes_on_one():
    # dfkd_cli/synth/ sets only its own (self.*); dfkd_cli/text/ has its own pipeline, out of this contract.
    files = [path for path in sorted((ROOT / "dfkd_cli").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
             if not path.is_relative_to(ROOT / "dfkd_cli" / "synth") and not path.is_relative_to(ROOT / "dfkd_cli" / "text")]
    assert len(files) > 20
    found = {str(path.relative_to(ROOT)): hits for path in files
             if (hits := outside_assignments(path.read_text(encoding="utf-8")))}
    assert found == {}
