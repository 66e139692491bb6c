"""ZSKD (Nayak et al., ICML 2019): class similarity, Dirichlet soft targets and data impressions."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kit
from kit import make_synth
from conftest import quadrant_task
from dfkd_cli.archs import create_model
from dfkd_cli.config import load_recipe
from dfkd_cli.errors import DfkdError
from dfkd_cli.synth import zskd
from dfkd_cli.synth.zskd import ZSKDSynthesizer, beta_schedule, class_similarity, dirichlet_targets
from dfkd_cli.teacher import load_teacher


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(1)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(tiny_teacher["path"], "resnet8", (1, 16, 16), mean=[0.5], std=[0.5])


def _synth(teacher, *overrides: str) -> ZSKDSynthesizer:
    cfg = load_recipe("zskd", list(overrides))
    return make_synth("zskd", teacher, cfg.synth, cfg.loss)


def test_class_similarity_is_normalised_and_follows_weight_geometry():
    torch.manual_seed(0)
    weight = torch.randn(5, 32)
    weight[3] = weight[1] + 0.01 * torch.randn(32)  # classes 1 and 3: nearly the same direction
    weight[4] = -weight[1]  # class 4: the opposite one
    sim = class_similarity(weight)
    assert torch.allclose(sim.diagonal(), torch.ones(5))
    assert torch.allclose(sim.min(1).values, torch.zeros(5)) and torch.allclose(sim.max(1).values, torch.ones(5))
    off_diagonal = sim - 2 * torch.eye(5)
    assert int(off_diagonal[1].argmax()) == 3 and int(off_diagonal[3].argmax()) == 1
    assert float(sim[1, 4]) == 0.0 and float(sim[3, 4]) == 0.0  # the least similar class of 1 and 3
    # Min-max per row breaks exact symmetry but keeps the ordering of the symmetric cosine matrix.
    cosine = F.normalize(weight, dim=1) @ F.normalize(weight, dim=1).T
    for row in range(5):
        assert torch.equal(sim[row].argsort(), cosine[row].argsort())
    assert float(torch.corrcoef(torch.stack([sim.flatten(), sim.T.flatten()]))[0, 1]) > 0.7
    # Scaling a class's weight vector changes nothing: only directions count.
    scaled = weight.clone()
    scaled[2] *= 7
    assert torch.allclose(class_similarity(scaled), sim, atol=1e-6)


def test_dirichlet_targets_sum_to_one_centre_on_the_similarity_row_and_beta_sets_sparsity():
    torch.manual_seed(0)
    sim = torch.tensor([[1.0, 0.5, 0.2, 0.0], [0.4, 1.0, 0.0, 0.3], [0.2, 0.0, 1.0, 0.6], [0.0, 0.3, 0.7, 1.0]])
    classes = torch.full((4000,), 2)
    soft, sparse = dirichlet_targets(sim, classes, 1.0), dirichlet_targets(sim, classes, 0.1)
    for y in (soft, sparse):
        assert y.shape == (4000, 4) and float(y.min()) >= 0
        assert torch.allclose(y.sum(1), torch.ones(4000), atol=1e-5)
        # The mean of Dirichlet(beta * C_k) is C_k / sum(C_k) for every beta: class k gets most mass.
        expected = sim[2] / sim[2].sum()
        assert torch.allclose(y.mean(0), expected, atol=0.03)
        assert int(y.mean(0).argmax()) == 2 and int(torch.bincount(y.argmax(1)).argmax()) == 2
    # Concentration at the floor: the least similar class gets next to nothing.
    assert float(soft[:, 1].mean()) < 0.005 and float(soft[:, 1].quantile(0.98)) < 0.01
    assert float(_entropy(sparse).mean()) < float(_entropy(soft).mean()) - 0.3
    assert float((sparse.max(1).values > 0.95).float().mean()) > float((soft.max(1).values > 0.95).float().mean()) + 0.3


def test_beta_schedule_gives_each_scaling_factor_half_of_the_impressions():
    betas = beta_schedule(10, (1.0, 0.1))
    assert sorted(betas.tolist()) == [0.1] * 5 + [1.0] * 5


def test_impressions_lower_the_soft_cross_entropy_and_move_the_teacher_towards_the_targets(teacher, monkeypatch):
    torch.manual_seed(0)
    synth = _synth(teacher, "synth.iterations=40", "synth.batch_size=16")
    captured, history = {}, []
    sample = zskd.dirichlet_targets
    monkeypatch.setattr(zskd, "dirichlet_targets", lambda *a: captured.setdefault("y", sample(*a)))
    state = copy.deepcopy(teacher.model.state_dict())
    with synth.hooks.stopping_when(lambda it, total, parts: history.append(parts) or False):
        synth.synthesize()
    x, y = synth.pool.tensor(), captured["y"]
    assert x.shape == (16, 1, 16, 16) and len(history) == 40
    assert history[-1]["soft_ce"] < history[0]["soft_ce"] - 0.1
    with torch.no_grad():
        log_p = F.log_softmax(teacher.model(x) / 20.0, dim=1)
    kl_after = float((y * (y.clamp_min(1e-12).log() - log_p)).sum(1).mean())
    kl_before = history[0]["soft_ce"] - float(_entropy(y).mean())  # soft CE = H(y) + KL(y || p)
    assert kl_after < 0.7 * kl_before
    assert history[-1]["acc"] > history[0]["acc"]  # the teacher's top class follows the target's
    low, high = (0 - 0.5) / 0.5, (1 - 0.5) / 0.5
    assert float(x.min()) >= low - 1e-6 and float(x.max()) <= high + 1e-6
    assert not teacher.model.training and not any(p.requires_grad or p.grad is not None
                                                  for p in teacher.model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in teacher.model.state_dict().items()), "the teacher changed"


def test_pool_stops_growing_at_the_number_of_impressions_and_on_step_stops_early(teacher):
    synth = _synth(teacher, "synth.iterations=1", "synth.batch_size=8", "synth.impressions=12")
    for _ in range(3):
        synth.synthesize()
    assert len(synth.pool) == 12
    calls = []
    synth = _synth(teacher, "synth.iterations=50", "synth.batch_size=4")
    with synth.hooks.stopping_when(lambda it, total, parts: calls.append((it, total)) or it >= 2):
        held_out = synth.holdout(4)
    assert held_out.shape == (4, 1, 16, 16) and calls == [(1, 50), (2, 50)] and len(synth.pool) == 0


def test_settings_and_teachers_zskd_cannot_use_are_refused(teacher):
    with pytest.raises(DfkdError, match="synth.beta_low must be positive"):
        load_recipe("zskd", ["synth.beta_low=0"])
    with pytest.raises(DfkdError, match="synth.iterations must be at least 1"):
        load_recipe("zskd", ["synth.iterations=0"])
    headless = SimpleNamespace(model=nn.Sequential(nn.Flatten(), nn.Identity()), classifier_name="1",
                               num_classes=4, arch="custom")
    cfg = load_recipe("zskd")
    with pytest.raises(DfkdError, match="final layer '1'"):
        make_synth(ZSKDSynthesizer, headless, cfg.synth, cfg.loss)


def test_imagenet_sized_inputs_work(tmp_path):
    torch.manual_seed(0)
    model = kit.random_teacher("mobilenet_v3_small", 10, (3, 224, 224))
    path = tmp_path / "mobilenet.pt"
    torch.save(model.state_dict(), path)
    teacher = load_teacher(path, "mobilenet_v3_small", (3, 224, 224), normalize="imagenet")
    assert teacher.classifier_name == "classifier.3"  # a nested final layer
    synth = _synth(teacher, "synth.iterations=1", "synth.batch_size=2")
    synth.synthesize()
    assert synth.pool.tensor().shape == (2, 3, 224, 224)
    assert synth.similarity.shape == (10, 10)


@pytest.fixture(scope="module")
def lenet_teacher(tmp_path_factory) -> dict:
    """LeNet-5 (no BatchNorm) trained on the quadrant task at 32x32, with labelled eval digits."""
    torch.manual_seed(0)
    x, y = quadrant_task(1024, seed=1)
    x = F.interpolate(x, size=(32, 32), mode="nearest")
    model = create_model("lenet5", 4, (1, 32, 32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model((x[idx] - 0.5) / 0.5), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("lenet")
    torch.save(model.state_dict(), root / "lenet5.pt")
    x_eval, y_eval = quadrant_task(256, seed=2)
    x_eval = F.interpolate(x_eval, size=(32, 32), mode="nearest")
    np.savez(root / "eval.npz", x=(x_eval[:, 0].numpy() * 255).astype(np.uint8), y=y_eval.numpy())
    return {"path": root / "lenet5.pt", "eval": root / "eval.npz",
            "args": ["--arch", "lenet5", "--input-shape", "1x32x32", "--mean", "0.5", "--std", "0.5"]}


def test_zskd_distils_a_lenet5_teacher_without_batchnorm_end_to_end(lenet_teacher, tmp_path):
    info = kit.report_of(kit.cli("inspect", lenet_teacher["path"], *lenet_teacher["args"][:4], "--format", "json"))
    assert not info["bn_layers"] and "zskd" in info["recipes"] and "deepinversion" not in info["recipes"]
    report = kit.report_of(kit.cli(*kit.compress_args(
        lenet_teacher, tmp_path / "run", "zskd", 80, "--eval-data", lenet_teacher["eval"],
        *kit.synth(iterations=10, batch_size=64, impressions=256),
        *kit.train(batch_size=64, steps_per_round=20, eval_every=20, holdout=64, crop_pad=1), student="lenet5_half")))
    assert report["teacher"]["has_bn"] is False and report["run"]["recipe"] == "zskd"
    assert report["eval_data"]["teacher_accuracy"] > 0.95
    # Chance is 0.25 and the noise recipe reaches 0.23 in the same setting.
    assert report["eval_data"]["top1_agreement"] > 0.8, "the student learned little from the impressions"
