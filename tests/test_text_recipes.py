"""The text synthesizers do what their papers say: PromptDFD's reinforced prompter really learns
from its reward, the adversarial reward follows the student, the repeat penalty lowers repetition."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from dfkd_cli.config import load_recipe
from dfkd_cli.errors import DfkdError
from dfkd_cli.text.models import build_text_student, load_causal_lm, load_text_teacher
from dfkd_cli.text.prompter import RLPromptSynthesizer, repeat_divergence, repetition_rate
from dfkd_cli.batches import TextBatch
from dfkd_cli.synth import StudentView, SynthContext
from dfkd_cli.text.synth import ManualPromptSynthesizer, RandomTextSynthesizer, TextCorpus, UnlabeledTextSynthesizer
from dfkd_cli.text.trainer import TextTrainer
from textkit import toy_corpus

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(bert_teacher_folder: Path, gpt2_folder: Path) -> dict[str, Path]:
    return {"bert": bert_teacher_folder, "gpt2": gpt2_folder}


@pytest.fixture(scope="module")
def teacher(models: dict[str, Path]):
    return load_text_teacher(models["bert"])


class FixedView(StudentView):
    """A student stand-in whose logits are a fixed function of the texts."""

    def __init__(self, logits) -> None:
        super().__init__(torch.nn.Identity())
        self.logits = logits  # type: ignore[method-assign]


def context(teacher, student=None, prior=None, **language_models) -> SynthContext:
    return SynthContext(teacher, CPU, student=student, prior=prior, language_models=language_models)


def rl_synth(teacher, models, student=None, **overrides) -> RLPromptSynthesizer:
    sets = [f"synth.{k}={v}" for k, v in overrides.items()]
    recipe = load_recipe("promptdfd-rl", sets)
    lms = {"generator": load_causal_lm(models["gpt2"], "--generator"),
           "prompter": load_causal_lm(models["gpt2"], "--prompter")}
    return RLPromptSynthesizer(context(teacher, student, **lms), recipe.synth, recipe.loss)


def word_rate(synth: RLPromptSynthesizer, word: str, n: int = 256) -> float:
    prompts = synth.sample_prompts(n).prefixes(synth.prompter[1])
    return sum(word in row[-1].split() for row in prompts) / n


def test_prompter_learns_to_write_the_rewarded_word(teacher, models) -> None:
    # A fixed toy teacher that is sure of class 1 when a text holds "great", unsure otherwise;
    # the student is uniform, so the adversarial reward is high exactly for "great".
    torch.manual_seed(0)
    uniform = FixedView(lambda texts: torch.zeros(len(texts), 2))
    synth = rl_synth(teacher, models, uniform, max_new_tokens=0, lr=3e-3, batch_size=32)
    synth.loss = {"reward": 1.0, "repeat": 0.0}
    synth.label = lambda texts: torch.tensor([[0.0, 6.0] if "great" in t.split() else [0.0, 0.0] for t in texts])
    before = word_rate(synth, "great")
    rewards = []
    for _ in range(40):
        synth.synthesize()
        rewards.append(synth.status()["reward"])
    after = word_rate(synth, "great")
    assert after > max(2 * before, before + 0.15), (before, after)
    assert sum(rewards[-10:]) > sum(rewards[:10])


def test_adversarial_reward_falls_for_texts_the_student_has_learned(teacher, models) -> None:
    torch.manual_seed(0)
    recipe = load_recipe("random-text", ["train.lr=3e-3", "train.alpha=0.5"])
    student = build_text_student("bert-1", teacher)
    for param in student.parameters():  # a student that starts far from the teacher
        param.data.normal_(0, 0.02)
    trainer = TextTrainer(student, teacher, recipe.train, CPU)
    synth = rl_synth(teacher, models, trainer.view())
    texts = [s for s, _ in toy_corpus(64, seed=5)]
    teacher_logits = trainer.teacher_logits(texts)
    before = float(synth.rewards(texts, teacher_logits).mean())
    for step in range(100):
        batch = slice((step * 16) % 64, (step * 16) % 64 + 16)
        trainer.step(TextBatch(texts[batch], teacher_logits[batch]))
    after = float(synth.rewards(texts, teacher_logits).mean())
    assert after < 0.6 * before, (before, after)
    # Eq. 6's confidence reward ignores the student: unchanged by the same training
    synth.config.reward = "confidence"
    confidence = synth.rewards(texts, teacher_logits)
    assert torch.allclose(confidence, torch.softmax(teacher_logits, -1).max(-1).values)


def test_repeat_penalty_lowers_token_repetition(teacher, models) -> None:
    def trained_rate(weight: float) -> float:
        torch.manual_seed(0)
        zeros = FixedView(lambda texts: torch.zeros(len(texts), 2))
        synth = rl_synth(teacher, models, zeros, max_new_tokens=0, lr=3e-3, batch_size=32, prompt_length=8)
        synth.loss = {"reward": 0.0, "repeat": weight}
        synth.label = zeros.logits
        for _ in range(15):
            synth.synthesize()
        torch.manual_seed(1)
        return repetition_rate(synth.sample_prompts(256).ids[:, -8:])

    without, with_penalty = trained_rate(0.0), trained_rate(0.05)
    assert with_penalty < 0.7 * without, (without, with_penalty)


def test_repeat_divergence_is_zero_for_equal_positions_and_positive_otherwise() -> None:
    same = torch.log_softmax(torch.randn(1, 1, 10), -1).expand(3, 4, 10)
    assert float(repeat_divergence(same)) == pytest.approx(0.0, abs=1e-5)
    assert float(repeat_divergence(torch.log_softmax(torch.randn(3, 4, 10), -1))) > 0


def test_rl_round_pools_every_prefix_completion_with_teacher_logits(teacher, models) -> None:
    torch.manual_seed(0)
    trainer = TextTrainer(build_text_student("bert-1", teacher), teacher, load_recipe("promptdfd-rl").train, CPU)
    synth = rl_synth(teacher, models, trainer.view(), batch_size=4, prompt_length=3, max_new_tokens=5)
    before = [p.detach().clone() for p in synth.prompter[0].parameters()]
    synth.synthesize()
    assert len(synth.pool) == 12 and set(synth.status()) == {"pool", "reward", "repeat"}
    batch = synth.sample(5)
    assert torch.allclose(batch.logits, trainer.teacher_logits(batch.texts), atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.prompter[0].parameters()))
    given = synth.language_model("prompter")[0]  # the prompter trains its own copy; the loaded model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, given.parameters()))
    assert all(not p.requires_grad for p in synth.language_model("generator")[0].parameters())  # the generator stays frozen


def test_manual_prompts_name_every_class_equally(teacher, models) -> None:
    random.seed(0)
    recipe = load_recipe("promptdfd-manual", ["synth.max_new_tokens=4"])
    synth = ManualPromptSynthesizer(context(teacher, generator=load_causal_lm(models["gpt2"], "--generator")),
                                    recipe.synth, recipe.loss)
    prompts = synth.prompts(40)
    assert sum("positive" in p for p in prompts) == sum("negative" in p for p in prompts) == 20
    assert all("[Category]" not in p for p in prompts)
    texts = synth.make(6)
    assert len(texts) == 6 and all(any(t.startswith(p.split()[0]) for p in prompts) for t in texts)
    with pytest.raises(DfkdError, match="synth.templates"):
        load_recipe("promptdfd-manual", ['synth.templates=["no slot"]'])


def test_random_text_uses_the_teachers_vocabulary_without_special_tokens(teacher) -> None:
    recipe = load_recipe("random-text", ["synth.min_tokens=4", "synth.max_tokens=6"])
    synth = RandomTextSynthesizer(context(teacher), recipe.synth, recipe.loss)
    texts = synth.make(50)
    ids = teacher.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(3 <= len(row) <= 8 for row in ids)  # WordPiece may re-split a decoded token
    assert not any(t in teacher.tokenizer.all_special_ids for row in ids for t in row)
    assert len(set(texts)) > 45


def test_unlabeled_holdout_never_enters_training(teacher) -> None:
    recipe = load_recipe("unlabeled-text")
    sentences = [f"sentence number {i} of the corpus" for i in range(300)]
    synth = UnlabeledTextSynthesizer(context(teacher, prior=TextCorpus(sentences, holdout=100)), recipe.synth, recipe.loss)
    held = set(synth.holdout(100).texts)
    assert len(held) == 100 and held.isdisjoint(synth.make(1000))
    with pytest.raises(DfkdError, match="fewer than"):
        TextCorpus(sentences[:50], holdout=100)
