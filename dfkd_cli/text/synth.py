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
from typing import Any, Callable, ClassVar

import torch

from dfkd_cli.errors import DfkdError
from dfkd_cli.precision import LossScaler, Precision
from dfkd_cli.synth.context import Capabilities
from dfkd_cli.synth.registry import register_synthesizer
from dfkd_cli.text.models import TextTeacher

Labeler = Callable[[list[str]], torch.Tensor]  # texts -> teacher logits [N, C]
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

    def add(self, texts: list[str], logits: torch.Tensor) -> None:
        logits = logits.detach().float().cpu()
        if self.logits is None:
            self.logits = torch.zeros(self.capacity, logits.shape[1])
        for text, row in zip(texts, logits):
            if len(self.texts) < self.capacity:
                self.texts.append(text)
            else:
                self.texts[self._next] = text
            self.logits[self._next] = row
            self._next = (self._next + 1) % self.capacity

    def sample(self, n: int) -> tuple[list[str], torch.Tensor]:
        assert self.logits is not None, "sample() before any synthesize()"
        index = torch.randint(len(self.texts), (n,))
        return [self.texts[i] for i in index.tolist()], self.logits[index]

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


@dataclass
class TextConfig:
    """Settings every text synthesizer has."""

    batch_size: int = 64  # texts made per synthesize() call
    pool_size: int = 8192  # texts kept for student batches (oldest replaced first)
    max_length: int = 128  # tokens the teacher and student read (longer texts are truncated)


class TextSynthesizer:
    """Base class: a pool of labelled texts filled by ``make(n)``."""

    Config: type = TextConfig
    loss_terms: tuple[str, ...] = ()
    capabilities: ClassVar[Capabilities] = Capabilities()  # uses_prior: reads --prior (a text corpus)
    needs: tuple[str, ...] = ()  # "generator", "prompter": the language models the recipe needs

    def __init__(self, teacher: TextTeacher, cfg: Any, loss: dict[str, float], device: torch.device) -> None:
        self.teacher, self.cfg, self.loss, self.device = teacher, cfg, loss, device
        self.pool = TextPool(cfg.pool_size)
        self.label: Labeler | None = None  # set by the pipeline: the trainer's teacher forward
        self.generator: Any = None  # (model, tokenizer) of --generator
        self.prompter: Any = None  # (model, tokenizer) of --prompter
        self.corpus: list[str] | None = None  # sentences of --prior
        self.student_logits: Labeler | None = None  # the student's forward (the adversarial reward)
        self.scaler = LossScaler()  # loss scaling of a trained prompter (fp16)

    def use_precision(self, precision: Precision) -> None:
        self.scaler = precision.scaler()

    def make(self, n: int) -> list[str]:
        """``n`` new texts."""
        raise NotImplementedError

    def synthesize(self) -> dict[str, float]:
        """Make ``synth.batch_size`` texts, label them with the teacher and add them to the pool."""
        assert self.label is not None
        texts = self.make(self.cfg.batch_size)
        self.pool.add(texts, self.label(texts))
        return {}

    def sample(self, n: int) -> tuple[list[str], torch.Tensor]:
        """A training batch: texts and the teacher's logits for them."""
        return self.pool.sample(n)

    def holdout(self, n: int) -> list[str]:
        """Fresh texts kept out of training, for selecting and reporting the student."""
        return self.make(n)


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
        if not 1 <= self.cfg.min_tokens <= self.cfg.max_tokens:
            raise DfkdError(f"synth.min_tokens ({self.cfg.min_tokens}) must be at least 1 and at most synth.max_tokens ({self.cfg.max_tokens})")
        tokenizer = self.teacher.tokenizer
        special = set(tokenizer.all_special_ids)
        self.token_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    def make(self, n: int) -> list[str]:
        lengths = torch.randint(self.cfg.min_tokens, self.cfg.max_tokens + 1, (n,)).tolist()
        ids = [self.token_ids[torch.randint(len(self.token_ids), (k,))].tolist() for k in lengths]
        return self.teacher.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


@register_synthesizer("unlabeled-text")
class UnlabeledTextSynthesizer(TextSynthesizer):
    """Sentences of an unlabelled corpus (``--prior``; PromptDFD's "Unlabel-KD" on WikiText)."""

    capabilities = Capabilities(uses_prior=True)

    def attach_corpus(self, sentences: list[str], holdout: int) -> None:
        """Shuffle the corpus once; the first ``holdout`` sentences are never trained on."""
        if len(sentences) < holdout + 1:
            raise DfkdError(f"--prior has {len(sentences)} usable sentences, fewer than the {holdout} held out "
                            "(train.holdout) plus one; give a larger corpus or lower train.holdout")
        order = torch.randperm(len(sentences)).tolist()
        self.held_out = [sentences[i] for i in order[:holdout]]
        self.corpus = [sentences[i] for i in order[holdout:]]

    def make(self, n: int) -> list[str]:
        assert self.corpus is not None
        return [self.corpus[i] for i in torch.randint(len(self.corpus), (n,)).tolist()]

    def holdout(self, n: int) -> list[str]:
        return self.held_out[:n]


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
        return [random.choice(self.cfg.templates).replace(CATEGORY, names[(start + i) % len(names)]) for i in range(n)]

    def make(self, n: int) -> list[str]:
        return complete(self.generator, self.prompts(n), self.cfg, self.device)

