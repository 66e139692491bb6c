"""Shared fixtures (a tiny teacher trained on a synthetic task, so agreement means something; tiny
text models) and the test tiers: markers ``slow``, ``subprocess`` and ``export`` (pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfkd_cli import measure
from dfkd_cli.archs import create_model

SHAPE = (1, 16, 16)
NUM_CLASSES = 4

# The test models are tiny: a second OpenMP thread buys little, and on a shared 2-core machine it
# made steps 5-13x slower (threads spin-waiting for a busy core).
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts another interpreter (marker ``subprocess``) pays for importing torch again:
    it belongs to the slow tier, left out by ``-m "not slow"``."""
    for item in items:
        if item.get_closest_marker("subprocess") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """ONNX export and latency loops only for tests marked ``export``: a run in any other test skips
    them (its report says so). Set before the test's fixtures, so a module-scoped run made for it
    follows its marker; see tests/kit.py for runs shared by tests of both kinds."""
    measure.DEPLOYMENT_CHECKS = item.get_closest_marker("export") is not None


def quadrant_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] with a bright 5x5 square in one of four quadrants; the quadrant is the class."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = 0.15 * torch.rand(n, *SHAPE, generator=gen)
    offsets = torch.randint(0, 3, (n, 2), generator=gen)
    for i in range(n):
        top = 1 + 8 * (int(y[i]) // 2) + int(offsets[i, 0])
        left = 1 + 8 * (int(y[i]) % 2) + int(offsets[i, 1])
        x[i, :, top : top + 5, left : left + 5] = 0.9
    return x, y


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A resnet8 teacher trained on the quadrant task, saved as a state dict, plus labelled eval data."""
    torch.manual_seed(0)
    model = create_model("resnet8", NUM_CLASSES, SHAPE)
    x, y = quadrant_task(1024, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(normalise(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_eval, y_eval = quadrant_task(256, seed=2)
    with torch.no_grad():
        accuracy = float((model(normalise(x_eval)).argmax(1) == y_eval).float().mean())
    assert accuracy > 0.95, f"the test teacher did not learn its task ({accuracy:.2f})"
    root = tmp_path_factory.mktemp("teacher")
    path = root / "teacher.pt"
    torch.save(model.state_dict(), path)
    eval_npz = root / "eval.npz"
    np.savez(eval_npz, x=(x_eval[:, 0].numpy() * 255).astype(np.uint8), y=y_eval.numpy())
    return {"path": path, "eval": eval_npz, "model": model, "accuracy": accuracy,
            "args": ["--arch", "resnet8", "--input-shape", "1x16x16", "--mean", "0.5", "--std", "0.5"]}


@pytest.fixture(scope="session")
def bert_teacher_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained BERT teacher of tests/textkit.py, built once per session; copy it before changing it."""
    from textkit import make_bert_teacher

    return make_bert_teacher(tmp_path_factory.mktemp("text-models") / "bert")


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 language model of tests/textkit.py, built once per session; copy it before changing it."""
    from textkit import make_gpt2

    return make_gpt2(tmp_path_factory.mktemp("text-models") / "gpt2")


@pytest.fixture(scope="module")
def text_files(bert_teacher_folder: Path, gpt2_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The text teacher, a GPT-2 for --generator/--prompter, a labelled dev.tsv and an unlabelled corpus."""
    from textkit import toy_corpus

    root = tmp_path_factory.mktemp("text-cli")
    dev = root / "dev.tsv"
    dev.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in toy_corpus(60, seed=7)))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(s for s, _ in toy_corpus(200, seed=8)) + "\n")
    return {"bert": bert_teacher_folder, "gpt2": gpt2_folder, "dev": dev, "corpus": corpus, "root": root}
