"""Hugging Face models from local folders: the text teacher, its student, and the language models.

Everything loads with ``local_files_only=True`` and ``trust_remote_code=False``: nothing is fetched
from a hub and no code shipped with a model runs. Weights must be safetensors unless the user
passes ``--trust-pickle`` (a ``pytorch_model.bin`` is a pickle and can run code when loaded).

Example:
    >>> teacher = load_text_teacher(Path("bert-sst2/"))
    >>> teacher.class_names, teacher.num_layers
    (['negative', 'positive'], 12)
    >>> student = build_text_student("bert-4", teacher)  # the teacher's first 4 layers
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from dfkd_cli.checkpoint import sha256_file
from dfkd_cli.errors import DfkdError
from dfkd_cli.teacher import read_labels
from dfkd_cli.text.folders import (
    check_folder,
    check_weights,
    has_weights,
    load_pretrained,
    load_tokenizer,
    read_model_config,
    refuse_remote_code,
)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
_LAYER_KEY = re.compile(r"\.layers?\.(\d+)\.")  # encoder.layer.3. (BERT) / transformer.layer.3. (DistilBERT)


@dataclass
class TextTeacher:
    """A frozen sequence classifier with its tokenizer and what dfkd knows about it."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    path: Path
    class_names: list[str]
    sha256: str  # of the weights file(s)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 512))

    @property
    def kind(self) -> str:
        return f"{type(self.model).__name__} ({self.model.config.model_type}, {self.num_layers} layers)"


def is_hf_folder(path: Path) -> bool:
    """A folder with a ``config.json``: a Hugging Face model, i.e. a text teacher."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def check_model_folder(path: Path, flag: str, trust_pickle: bool = False) -> dict[str, Any]:
    """The folder's config.json, after checking the folder has what loading needs, locally."""
    path = Path(path)
    if not path.exists():
        raise DfkdError(f"{flag} '{path}' not found; pass a local Hugging Face model folder (config.json, weights, tokenizer)")
    if not path.is_dir():
        raise DfkdError(f"{flag} '{path}' is a file; pass the Hugging Face model folder that holds config.json")
    config = check_folder(path, flag, "pass a Hugging Face model folder", trust_pickle)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DfkdError(f"{flag} '{path}' has no tokenizer files (tokenizer.json or vocab.txt); save the tokenizer "
                        "into the same folder with tokenizer.save_pretrained()")
    return config


def weights_sha256(path: Path) -> str:
    """SHA-256 over the weight files of a model folder (in name order)."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def load_text_teacher(path: Path, labels: Path | None = None, trust_pickle: bool = False) -> TextTeacher:
    """A sequence classifier and its tokenizer from a local folder, frozen and in eval mode."""
    from transformers import AutoModelForSequenceClassification

    config = check_model_folder(path, "teacher", trust_pickle)
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        arch = ", ".join(config.get("architectures") or ["none recorded"])
        raise DfkdError(f"teacher '{path}' is a {arch}, not a sequence classifier; pass a *ForSequenceClassification model folder")
    model = load_pretrained(AutoModelForSequenceClassification, path, "teacher", "classifier").eval()
    tokenizer = load_tokenizer(path, "teacher")
    model.requires_grad_(False)
    names = _class_names(model.config, labels)
    return TextTeacher(model, tokenizer, Path(path), names, weights_sha256(path))


def _class_names(config: Any, labels: Path | None) -> list[str]:
    count = int(config.num_labels)
    if labels is not None:
        return read_labels(labels, count)
    names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(count)]
    return names if len(set(names)) == count else [f"class_{i}" for i in range(count)]


def default_text_student(teacher: TextTeacher) -> str:
    """``bert-N`` with half the teacher's layers (PromptDFD's BERT-base -> BERT_6)."""
    return f"bert-{max(1, teacher.num_layers // 2)}"


def build_text_student(spec: str, teacher: TextTeacher, trust_pickle: bool = False) -> Any:
    """``bert-N``: the teacher's embeddings, first N layers, pooler and head (PromptDFD's BERT_N
    initialisation); or a folder with a config.json (random init) or a whole model (its weights)."""
    match = re.fullmatch(r"bert-(\d+)", spec)
    if match:
        return _first_layers(teacher, int(match.group(1)))
    path = Path(spec)
    if not path.exists():
        raise DfkdError(f"--student {spec!r} is neither bert-N (the teacher's first N layers) nor an existing folder; "
                        f"e.g. --student {default_text_student(teacher)}")
    return _student_from_folder(path, teacher, trust_pickle)


def _first_layers(teacher: TextTeacher, layers: int) -> Any:
    from transformers import AutoModelForSequenceClassification

    if not 1 <= layers <= teacher.num_layers:
        raise DfkdError(f"--student bert-{layers}: the teacher has {teacher.num_layers} layers; pick N from 1 to {teacher.num_layers}")
    config = copy.deepcopy(teacher.model.config)
    config.num_hidden_layers = layers
    student = AutoModelForSequenceClassification.from_config(config)
    state = {k: v for k, v in teacher.model.state_dict().items() if _keeps(k, layers)}
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:  # a layout the layer pattern does not know: a bug to report, not a silent random init
        raise DfkdError(f"cannot take the first {layers} layers of a {teacher.kind}: {len(missing)} weights missing "
                        f"(e.g. {missing[:1]}); pass a student folder instead")
    return student.train()


def _keeps(key: str, layers: int) -> bool:
    match = _LAYER_KEY.search(key)
    return match is None or int(match.group(1)) < layers


def _student_from_folder(path: Path, teacher: TextTeacher, trust_pickle: bool) -> Any:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not path.is_dir():
        raise DfkdError(f"--student '{path}' is a file; pass a folder with a config.json (and optionally weights)")
    refuse_remote_code(read_model_config(path, "--student", "pass a folder with a config.json"), f"--student '{path}'")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    vocab = len(teacher.tokenizer)
    if int(getattr(config, "vocab_size", vocab)) < vocab:
        raise DfkdError(f"--student '{path}' has a vocabulary of {config.vocab_size} but the teacher's tokenizer has "
                        f"{vocab} tokens; the student reads the teacher's tokens, so give it vocab_size {vocab}")
    config.num_labels, config.id2label = teacher.num_classes, dict(enumerate(teacher.class_names))
    config.label2id = {n: i for i, n in enumerate(teacher.class_names)}
    if not has_weights(path):
        return AutoModelForSequenceClassification.from_config(config).train()
    check_weights(path, "--student", trust_pickle)
    model = load_pretrained(AutoModelForSequenceClassification, path, "--student", "student",
                            config=config, ignore_mismatched_sizes=True)  # the head resized to the teacher's classes
    return model.train()


def load_causal_lm(path: Path, flag: str, trust_pickle: bool = False) -> tuple[Any, Any]:
    """A frozen-by-default causal language model (GPT-2 family) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM

    check_model_folder(path, flag, trust_pickle)
    model = load_pretrained(AutoModelForCausalLM, path, flag, "causal language model").eval()
    tokenizer = load_tokenizer(path, flag)
    if tokenizer.eos_token_id is None:
        raise DfkdError(f"{flag} '{path}': its tokenizer has no end-of-text token; set eos_token in tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    model.requires_grad_(False)
    return model, tokenizer
