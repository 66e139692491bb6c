"""Text synthesizers: each makes texts for the student from the teacher (and a language model).

Like the image synthesizers, every one exposes ``synthesize()`` (make more texts) and
``sample(n)`` (a training batch), plus ``holdout(n)`` (fresh texts kept out of training). Texts
enter a :class:`TextPool` together with the teacher's logits for them, so a student step runs
the student alone. The four rows of PromptDFD's Table 3 (Ma et al., IJCAI 2022):

- ``random-text``: random token sequences from the teacher's vocabulary;
- ``unlabeled-text``: sentences of an unlabelled corpus (``--prior corpus.txt``);
- ``promptdfd-manual``: hand-written topic prompts with the class name filled in, completed by
  a frozen causal language model (``--generator``);
- ``promptdfd-rl``: prompts written by a prompter trained with REINFORCE (see ``prompter.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dfkd_cli.batches import TextBatch
from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.base import Synthesizer
from dfkd_cli.synth.context import Capabilities, SynthContext
from dfkd_cli.synth.registry import register_synthesizer
from dfkd_cli.text.models import TextTeacher
from dfkd_cli.text.trainer import text_logits

CATEGORY = "[Category]"
PAPER_TEMPLATES = ["A latest [Category] news", "A document about [Category]", "A [Category] movie review",
                   "[Category] sentence:"]


class TextPool:
    """A ring buffer of texts with the teacher's logits for them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.texts: list[str] = []
        self.logits: torch.Tensor | None = None
        self._next = 0

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, batch: TextBatch) -> None:
        logits = batch.logits.detach().float().cpu()
        if self.logits is None:
            self.logits = torch.zeros(self.capacity, logits.shape[1])
        for text, row in zip(batch.texts, logits):
            if len(self.texts) < self.capacity:
                self.texts.append(text)
            else:
                self.texts[self._next] = text
            self.logits[self._next] = row
            self._next = (self._next + 1) % self.capacity

    def rows(self, index: torch.Tensor) -> TextBatch:
        """The texts at ``index`` (slot numbers) with their logits."""
        assert self.logits is not None, "rows() before any synthesize()"
        return TextBatch([self.texts[i] for i in index.tolist()], self.logits[index])

    def sample(self, n: int) -> TextBatch:
        """``n`` texts drawn uniformly with replacement."""
        return self.rows(torch.randint(len(self.texts), (n,)))

    def batch(self) -> TextBatch:
        """Every text in the pool (what ``--save-synthetic`` saves)."""
        return self.rows(torch.arange(len(self.texts)))

    def by_class(self, class_names: list[str], per_class: int) -> dict[str, list[str]]:
        """Up to ``per_class`` distinct texts the teacher assigns to each class (the newest first)."""
        shown: dict[str, list[str]] = {name: [] for name in class_names}
        if self.logits is None:
            return shown
        predicted = self.logits[: len(self.texts)].argmax(1).tolist()
        order = [(self._next - 1 - k) % len(self.texts) for k in range(len(self.texts))]
        for i in order:
            bucket = shown[class_names[predicted[i]]]
            if len(bucket) < per_class and self.texts[i] not in bucket:
                bucket.append(self.texts[i])
        return shown

    def state_dict(self) -> dict[str, Any]:
        return {"texts": list(self.texts), "logits": self.logits, "next": self._next}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.texts, self._next = list(state["texts"]), int(state["next"])
        self.logits = state["logits"].cpu() if state["logits"] is not None else None


class TextCorpus:
    """The sentences of ``--prior``, shuffled once: the first ``holdout`` are never trained on."""

    def __init__(self, sentences: list[str], holdout: int) -> None:
        if len(sentences) < holdout + 1:
            raise DfkdError(f"--prior has {len(sentences)} usable sentences, fewer than the {holdout} held out "
                            "(train.holdout) plus one; give a larger corpus or lower train.holdout")
        order = torch.randperm(len(sentences)).tolist()
        self.held_out = [sentences[i] for i in order[:holdout]]
        self.training = [sentences[i] for i in order[holdout:]]


@dataclass
class TextConfig:
    """Settings every text synthesizer has."""

    batch_size: int = 64  # texts made per synthesize() call
    pool_size: int = 8192  # texts kept for student batches (oldest replaced first)
    max_length: int = 128  # tokens the teacher and student read (longer texts are truncated)


class TextSynthesizer(Synthesizer):
    """Base class of the text synthesizers: ``make(n)`` writes texts, which the teacher labels
    (:meth:`make_batch`) and the pool keeps. Language models (``--generator``, ``--prompter``) come
    in ``context.language_models``; the corpus of ``--prior`` is ``context.prior`` (a :class:`TextCorpus`)."""

    Config: ClassVar[type] = TextConfig
    capabilities: ClassVar[Capabilities] = Capabilities()
    needs: ClassVar[tuple[str, ...]] = ()  # "generator", "prompter": the language models the recipe needs

    def __init__(self, context: SynthContext, config: Any, loss: dict[str, float]) -> None:
        super().__init__(context, config, loss)
        self.pool = TextPool(config.pool_size)  # type: ignore[assignment]
        self.max_length = min(config.max_length, context.teacher.max_positions)
        self.metrics: dict[str, float] = {}  # the last round's numbers for the display

    @property
    def teacher(self) -> TextTeacher:
        return self.context.teacher

    def language_model(self, name: str) -> tuple[Any, Any]:
        """The ``(model, tokenizer)`` given as ``--{name}``."""
        lm = self.context.language_models.get(name)
        if lm is None:
            raise RuntimeError(f"this recipe needs --{name}: build the synthesizer with SynthContext(language_models=...)")
        return lm

    def label(self, texts: list[str]) -> torch.Tensor:
        """The teacher's float32 logits on ``texts`` (CPU)."""
        return text_logits(self.teacher.model, self.teacher.tokenizer, texts, self.max_length, self.device)

    def make(self, n: int) -> list[str]:
        """``n`` new texts."""
        raise NotImplementedError

    def make_batch(self, n: int) -> TextBatch:
        texts = self.make(n)
        return TextBatch(texts, self.label(texts))

    def holdout(self, n: int) -> TextBatch:  # type: ignore[override]
        """Fresh texts kept out of training, for selecting and reporting the student."""
        return self.make_batch(n)

    def status(self) -> dict[str, float]:
        return {"pool": len(self.pool), **self.metrics}


@dataclass
class RandomTextConfig(TextConfig):
    min_tokens: int = 8
    max_tokens: int = 64


@register_synthesizer("random-text")
class RandomTextSynthesizer(TextSynthesizer):
    """Random token sequences from the teacher's vocabulary (PromptDFD's "Random Text" row)."""

    Config = RandomTextConfig

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if not 1 <= self.config.min_tokens <= self.config.max_tokens:
            raise DfkdError(f"synth.min_tokens ({self.config.min_tokens}) must be at least 1 and at most synth.max_tokens ({self.config.max_tokens})")
        tokenizer = self.teacher.tokenizer
        special = set(tokenizer.all_special_ids)
        self.token_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def make(self, n: int) -> list[str]:
        lengths = torch.randint(self.config.min_tokens, self.config.max_tokens + 1, (n,)).tolist()
        ids = [self.token_ids[torch.randint(len(self.token_ids), (k,))].tolist() for k in lengths]
        return self.teacher.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


@register_synthesizer("unlabeled-text")
class UnlabeledTextSynthesizer(TextSynthesizer):
    """Sentences of an unlabelled corpus (``--prior``; PromptDFD's "Unlabel-KD" on WikiText)."""

    capabilities = Capabilities(uses_prior=True)

    @property
    def corpus(self) -> TextCorpus:
        if not isinstance(self.context.prior, TextCorpus):
            raise RuntimeError("unlabeled-text reads --prior: build the synthesizer with SynthContext(prior=TextCorpus(...))")
        return self.context.prior

    def make(self, n: int) -> list[str]:
        training = self.corpus.training
        return [training[i] for i in torch.randint(len(training), (n,)).tolist()]

    def holdout(self, n: int) -> TextBatch:
        texts = self.corpus.held_out[:n]
        return TextBatch(texts, self.label(texts))


@dataclass
class GenerationConfig(TextConfig):
    max_new_tokens: int = 40  # tokens the generator adds to each prompt
    top_k: int = 50  # the paper's sampling: top-k 50 ...
    top_p: float = 0.95  # ... and nucleus 0.95
    keep_prompt: bool = True  # the text is prompt + completion (False: the completion alone)
    generate_batch: int = 64  # prompts per generate() call (memory)


def complete(lm: tuple[Any, Any], prompts: list[str], cfg: GenerationConfig, device: torch.device) -> list[str]:
    """Complete every prompt with the frozen causal LM by top-k/top-p sampling."""
    model, tokenizer = lm
    texts: list[str] = []
    for start in range(0, len(prompts), cfg.generate_batch):
        chunk = prompts[start : start + cfg.generate_batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        if cfg.max_new_tokens == 0:
            out = enc["input_ids"]
        else:
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, top_k=cfg.top_k, top_p=cfg.top_p,
                                     max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1] :]
        completions = tokenizer.batch_decode(new, skip_special_tokens=True)
        for prompt, completion in zip(chunk, completions):
            text = f"{prompt}{completion}" if cfg.keep_prompt else completion
            texts.append(" ".join(text.split()) or prompt)
    return texts


@dataclass
class ManualPromptConfig(GenerationConfig):
    templates: list[str] = field(default_factory=lambda: list(PAPER_TEMPLATES))

    def __post_init__(self) -> None:
        templates = self.templates
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and CATEGORY in t for t in templates):
            raise DfkdError(f"synth.templates must be a non-empty list of strings that contain {CATEGORY}, e.g. "
                            f"[\"A {CATEGORY} movie review\"]")


@register_synthesizer("promptdfd-manual")
class ManualPromptSynthesizer(TextSynthesizer):
    """Hand-written topic prompts with each class name filled in, completed by ``--generator``
    (PromptDFD's "Manual" row, its Table 2 templates by default)."""

    Config = ManualPromptConfig
    needs = ("generator",)

    def prompts(self, n: int) -> list[str]:
        """``n`` prompts, the classes taking turns so every class is asked for equally."""
        names = self.teacher.class_names
        start = random.randrange(len(names))
        return [random.choice(self.config.templates).replace(CATEGORY, names[(start + i) % len(names)]) for i in range(n)]

    def make(self, n: int) -> list[str]:
        return complete(self.language_model("generator"), self.prompts(n), self.config, self.device)



class SavedTextSynthesizer(TextSynthesizer):
    """``--from-synthetic``: the texts of a saved set (see :mod:`dfkd_cli.text.synthetic_set`) form
    the pool and its held-out texts select the student; nothing is made."""

    def load(self, train: TextBatch, holdout: TextBatch) -> None:
        self.pool = TextPool(len(train))  # type: ignore[assignment]
        self.pool.add(train)
        self._holdout = holdout

    def synthesize(self) -> None:
        """Nothing to make: the saved set is the data."""

    def holdout(self, n: int) -> TextBatch:
        return self._holdout[:n]
