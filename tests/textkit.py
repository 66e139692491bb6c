"""Tiny Hugging Face models for the text tests, built offline in a few seconds.

- :func:`make_bert_teacher`: a 2-layer BERT sequence classifier (WordPiece tokenizer) trained on a
  toy sentiment task: sentences with a positive word are class 1, with a negative word class 0.
- :func:`make_gpt2`: a 2-layer GPT-2 causal LM with its own byte-level BPE tokenizer (a different
  tokenizer from the teacher's, as with real GPT-2 and BERT), trained briefly on the toy corpus.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

POSITIVE = ["good", "great", "happy", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "sad", "boring", "terrible"]
FILLER = ["the", "a", "movie", "film", "story", "was", "is", "really", "very", "and", "plot", "acting",
          "it", "this", "news", "about", "sports", "music", "document", "review", "sentence", "latest"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_sentence(rng: random.Random, label: int | None = None) -> tuple[str, int]:
    """A sentence of filler words with one sentiment word; its label is the word's polarity."""
    label = rng.randrange(2) if label is None else label
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words), label


def toy_corpus(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [toy_sentence(rng) for _ in range(n)]


def make_bert_teacher(path: Path, layers: int = 2, steps: int = 150, seed: int = 0) -> Path:
    """Save a trained tiny ``BertForSequenceClassification`` with its tokenizer into ``path``."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    data = toy_corpus(512, seed)

    def batch_loss(step: int) -> torch.Tensor:
        batch = data[(step * 32) % len(data):][:32]
        enc = tokenizer([s for s, _ in batch], padding=True, return_tensors="pt")
        return F.cross_entropy(model(**enc).logits, torch.tensor([y for _, y in batch]))

    return _fit_and_save(model, tokenizer, path, steps, batch_loss)


def _fit_and_save(model: torch.nn.Module, tokenizer, path: Path, steps: int, batch_loss) -> Path:
    """Adam at 3e-3 on ``batch_loss(step)`` for ``steps`` steps, then save model and tokenizer to ``path``."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        loss = batch_loss(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def teacher_accuracy(path: Path, n: int = 200) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = toy_corpus(n, seed=99)
    with torch.no_grad():
        logits = model(**tokenizer([s for s, _ in data], padding=True, return_tensors="pt")).logits
    return float((logits.argmax(-1) == torch.tensor([y for _, y in data])).float().mean())


def make_gpt2(path: Path, layers: int = 2, steps: int = 120, seed: int = 0) -> Path:
    """Save a tiny ``GPT2LMHeadModel`` with a byte-level BPE tokenizer trained on the toy corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    texts = [s for s, _ in toy_corpus(400, seed + 1)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=layers, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)

    def batch_loss(step: int) -> torch.Tensor:
        batch = texts[(step * 16) % len(texts):][:16]
        ids = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in batch]
        width = max(map(len, ids))
        x = torch.tensor([i + [tokenizer.eos_token_id] * (width - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
        return model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss

    return _fit_and_save(model, tokenizer, path, steps, batch_loss)
