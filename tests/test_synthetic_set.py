"""--save-synthetic writes the set the student trained on (pool, or a sample of fresh batches) with
the teacher's soft labels and a manifest; --from-synthetic trains another student on it without
synthesizing, and refuses a set made for another teacher."""

from __future__ import annotations

import json

import numpy as np
import torch

from dfkd_cli.selection import Reservoir

import kit

BATCH = kit.TRAIN["batch_size"]


def compress(teacher_path, args, out, *extra):
    argv = ["compress", teacher_path, *args, "--student", "resnet8", "--out", out, *kit.CPU_JSON, *kit.train(), *extra]
    return kit.cli(*argv)


def test_a_fresh_batch_recipe_saves_a_sample_of_what_the_student_trained_on(tiny_teacher, tmp_path):
    result = compress(tiny_teacher["path"], tiny_teacher["args"], tmp_path / "run", "--recipe", "noise",
                      "--steps", "20", "--save-synthetic")
    assert result.exit_code == 0, (result.stderr, result.exception)
    folder = tmp_path / "run" / "synthetic"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["recipe"] == "noise" and manifest["train_samples"] == 20 * BATCH
    assert manifest["holdout_samples"] == 32 and manifest["input_shape"] == [1, 16, 16]
    assert f"uniform sample of the {20 * BATCH} training inputs" in manifest["sampling"]
    with np.load(folder / manifest["shards"][0]) as shard:
        assert shard["x"].dtype == np.float16 and shard["x"].shape == (20 * BATCH, 1, 16, 16)
        assert np.allclose(shard["probs"].astype(np.float32).sum(1), 1.0, atol=1e-2)


def test_a_pool_recipe_saves_its_pool_and_another_student_trains_from_it(tiny_teacher, tmp_path):
    made = compress(tiny_teacher["path"], tiny_teacher["args"], tmp_path / "di", "--recipe", "deepinversion",
                    "--steps", "10", "--save-synthetic", "-s", "synth.batch_size=16", "-s", "synth.iterations=5",
                    "-s", "train.steps_per_round=5")
    assert made.exit_code == 0, (made.stderr, made.exception)
    folder = tmp_path / "di" / "synthetic"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sampling"] == "the recipe's synthetic pool" and manifest["train_samples"] == 2 * 16

    reused = compress(tiny_teacher["path"], tiny_teacher["args"], tmp_path / "again", "--from-synthetic", folder,
                      "--steps", "15", "--eval-data", tiny_teacher["eval"])
    assert reused.exit_code == 0, (reused.stderr, reused.exception)
    report = json.loads(reused.stdout)
    assert report["run"]["recipe"] == "deepinversion"  # the set's recipe gives the [train] table
    assert report["run"]["from_synthetic"] == str(folder.resolve()) and report["run"]["steps"] == 15
    assert report["synthetic_holdout"]["n"] == 16  # the saved held-out samples, report half


def test_a_set_made_for_another_teacher_is_refused(tiny_teacher, tmp_path):
    made = compress(tiny_teacher["path"], tiny_teacher["args"], tmp_path / "run", "--recipe", "noise",
                    "--steps", "5", "--save-synthetic")
    assert made.exit_code == 0
    other = tmp_path / "other.pt"
    state = {k: v.clone() for k, v in tiny_teacher["model"].state_dict().items()}
    state["fc.bias"] = state["fc.bias"] + 1.0
    torch.save(state, other)
    result = compress(other, tiny_teacher["args"], tmp_path / "bad", "--from-synthetic", tmp_path / "run" / "synthetic",
                      "--steps", "5")
    assert result.exit_code == 2 and "made for another teacher" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_a_folder_that_is_not_a_synthetic_set_is_a_one_line_error(tiny_teacher, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "empty", "has no manifest.json"), (tmp_path / "missing", "not found")):
        result = compress(tiny_teacher["path"], tiny_teacher["args"], tmp_path / "run", "--from-synthetic", folder,
                          "--steps", "5")
        assert result.exit_code == 2 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_the_vectorised_reservoir_samples_uniformly():
    torch.manual_seed(0)
    hits = torch.zeros(200)
    for _ in range(200):
        reservoir = Reservoir(20)
        for start in range(0, 200, 32):  # batches of 32, the last one short
            reservoir.add(torch.arange(start, min(start + 32, 200)).float()[:, None])
        hits[reservoir.tensor()[:, 0].long()] += 1
    assert reservoir.seen == 200 and len(reservoir.tensor()) == 20
    rate = hits / 200  # each item should be kept with probability 20/200
    assert abs(float(rate[:100].mean()) - 0.1) < 0.02 and abs(float(rate[100:].mean()) - 0.1) < 0.02


def test_a_manifest_cannot_point_outside_its_folder(tiny_teacher, tmp_path):
    made = compress(tiny_teacher["path"], tiny_teacher["args"], tmp_path / "run", "--recipe", "noise",
                    "--steps", "5", "--save-synthetic")
    assert made.exit_code == 0
    manifest_path = tmp_path / "run" / "synthetic" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for shard in ("../../outside.npz", "/etc/passwd", "train-00000.npz/../x"):
        manifest_path.write_text(json.dumps({**manifest, "shards": [shard]}))
        result = compress(tiny_teacher["path"], tiny_teacher["args"], tmp_path / "bad", "--from-synthetic",
                          tmp_path / "run" / "synthetic", "--steps", "5")
        assert result.exit_code == 2 and "is not a train-NNNNN.npz file of its folder" in result.stderr
