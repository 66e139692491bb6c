"""--prior: image folders (flat or nested, any size, unreadable files counted) and .npz files are
streamed as normalised teacher inputs; bad priors and misuse of --prior are one-line errors; the
prior-kd baseline distils on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd_cli.errors import DfkdError
from dfkd_cli.prior import PriorData

import kit
from conftest import quadrant_task

SHAPE = (1, 16, 16)


def write_images(folder, n: int, size=(20, 24), mode="RGB", suffix=".png", start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        value = (start + i) * 10 % 256
        Image.new(mode, size, color=value if mode == "L" else (value, value, value)).save(folder / f"img{start + i}{suffix}")


def prior(path, **kwargs) -> PriorData:
    return PriorData(path, SHAPE, [0.5], [0.5], **{"batch_size": 4, "workers": 0, **kwargs})


def test_a_nested_folder_of_mixed_images_streams_normalised_teacher_inputs(tmp_path):
    write_images(tmp_path / "a", 3, size=(20, 24))
    write_images(tmp_path / "b" / "deeper", 2, size=(8, 8), mode="L", suffix=".jpg", start=3)
    write_images(tmp_path, 2, size=(40, 16), suffix=".bmp", start=5)
    write_images(tmp_path, 1, size=(16, 16), suffix=".webp", start=7)
    (tmp_path / "notes.txt").write_text("not an image")
    data = prior(tmp_path)
    assert data.files == 8 and data.source == "image_folder"
    x = data.sample(10)  # more than one epoch's worth of batches
    assert x.shape == (10, *SHAPE) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # [0, 1] pixels normalised with 0.5/0.5
    assert data.skipped == 0


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    write_images(tmp_path, 5)
    for i in range(3):
        (tmp_path / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    data = prior(tmp_path)
    x = data.sample(12)  # several epochs: every file has been tried
    assert x.shape == (12, *SHAPE)
    assert data.skipped == 3  # each broken file once, however many epochs
    assert data.describe()["skipped_unreadable"] == data.skipped


def test_a_folder_streams_through_worker_processes(tmp_path):
    write_images(tmp_path, 6)
    data = prior(tmp_path, workers=1)
    assert data.sample(9).shape == (9, *SHAPE)


def test_the_same_seed_gives_the_same_stream(tmp_path):
    write_images(tmp_path, 12)
    assert torch.equal(prior(tmp_path, seed=3).sample(8), prior(tmp_path, seed=3).sample(8))
    assert not torch.equal(prior(tmp_path, seed=3).sample(8), prior(tmp_path, seed=4).sample(8))


def test_held_out_images_never_reach_the_stream(tmp_path):
    x = np.repeat(np.arange(20, dtype=np.uint8)[:, None, None] * 10, 16 * 16, axis=1).reshape(20, 16, 16)
    np.savez(tmp_path / "p.npz", x=x)
    data = prior(tmp_path / "p.npz", reserve=5)
    held = {round(float(v), 4) for v in data.holdout(5)[:, 0, 0, 0]}
    streamed = {round(float(v), 4) for v in data.sample(60)[:, 0, 0, 0]}  # four epochs of the other 15
    assert len(held) == 5 and len(streamed) == 15 and not held & streamed


def test_an_npz_in_any_layout_is_fitted_to_the_teacher(tmp_path):
    np.savez(tmp_path / "hwc.npz", x=np.random.default_rng(0).integers(0, 256, (7, 28, 28, 3), dtype=np.uint8))
    data = prior(tmp_path / "hwc.npz")
    assert data.source == "npz" and data.files == 7
    assert data.sample(5).shape == (5, *SHAPE)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "has no images"),
    (lambda p: (p.mkdir(), (p / "a.png").write_bytes(b"junk")), "has no readable image"),
    (lambda p: np.savez(p.with_suffix(".npz"), y=np.zeros(3)), "has no array 'x'"),
    (lambda p: np.savez(p.with_suffix(".npz"), x=np.full((2, 8, 8), -1.5, dtype=np.float32)), "pixel values span"),
    (lambda p: p.with_suffix(".txt").write_text("x"), "neither an image folder nor an .npz"),
    (lambda p: None, "not found"),
])
def test_bad_priors_are_one_line_errors(tmp_path, make, message):
    base = tmp_path / "prior"
    make(base)
    path = next((p for p in (base, base.with_suffix(".npz"), base.with_suffix(".txt")) if p.exists()), base)
    with pytest.raises(DfkdError, match=message):
        prior(path)


def compress(tiny_teacher, tmp_path, recipe: str, *extra: str, steps: int = 2):
    return kit.cli(*kit.compress_args(tiny_teacher, tmp_path / "run", recipe, steps, "--eval-data", tiny_teacher["eval"],
                                      *extra))


def quadrant_folder(folder, n: int) -> None:
    folder.mkdir()
    x, _ = quadrant_task(n, seed=5)
    for i, image in enumerate(x):
        Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")


def test_prior_with_a_recipe_that_does_not_use_it_is_refused(tiny_teacher, tmp_path):
    quadrant_folder(tmp_path / "prior", 4)
    result = compress(tiny_teacher, tmp_path, "noise", "--prior", tmp_path / "prior")
    assert result.exit_code == 2
    assert "does not use --prior" in result.stderr and "avkd" in result.stderr and "prior-kd" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_prior_recipe_without_prior_is_refused(tiny_teacher, tmp_path):
    result = compress(tiny_teacher, tmp_path, "avkd")
    assert result.exit_code == 2 and "needs --prior" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_an_empty_prior_folder_is_a_one_line_error(tiny_teacher, tmp_path):
    (tmp_path / "empty").mkdir()
    result = compress(tiny_teacher, tmp_path, "prior-kd", "--prior", tmp_path / "empty")
    assert result.exit_code == 2 and "has no images" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_prior_kd_distils_on_prior_images_and_reports_skipped_files(tiny_teacher, tmp_path):
    quadrant_folder(tmp_path / "prior", 160)
    (tmp_path / "prior" / "broken.png").write_bytes(b"not a png")
    result = compress(tiny_teacher, tmp_path, "prior-kd", "--prior", tmp_path / "prior", *kit.train(batch_size=32, eval_every=20, lr=0.05),
                      steps=60)
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    prior_info = report["run"]["prior"]
    assert prior_info["images"] == 161 and prior_info["held_out"] == 32 and prior_info["skipped_unreadable"] == 1
    assert any("could not be decoded" in w for w in report["warnings"])
    # The prior is the teacher's own domain here, so KD on it transfers the task.
    assert report["eval_data"]["top1_agreement"] > 0.8
    assert report["run"]["stability"]["evaluations"] == 3
