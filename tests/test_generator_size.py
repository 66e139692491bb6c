"""Generator width and batch: "auto" sizes them by the teacher's input and the device."""

from __future__ import annotations

import pytest
import torch

from dfkd_cli.config import load_recipe
from dfkd_cli.errors import DfkdError
from dfkd_cli.synth.generator import resolve_generator_size

CPU, GPU = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize(("shape", "device", "ngf", "batch"), [
    ((1, 32, 32), CPU, 16, 128),  # MNIST/CIFAR on a CPU: what the recipes were measured with
    ((3, 64, 64), CPU, 32, 64),
    ((3, 224, 224), CPU, 64, 32),  # an ImageNet teacher gets a wider generator, a smaller batch
    ((1, 32, 32), GPU, 64, 512),  # on a GPU: the paper's (DAFL: ngf 64, batch 512)
])
def test_auto_generator_size_follows_input_and_device(shape, device, ngf, batch) -> None:
    config = load_recipe("dafl").synth
    assert config.ngf == config.batch_size == "auto"
    note = resolve_generator_size(config, shape, device)
    assert (config.ngf, config.batch_size) == (ngf, batch)
    assert note is not None and f"synth.ngf {ngf}" in note


def test_explicit_sizes_are_kept_and_never_exceed_the_paper_when_auto() -> None:
    config = load_recipe("dafl", ["synth.ngf=8", "synth.batch_size=4"]).synth
    assert resolve_generator_size(config, (1, 32, 32), CPU) is None and (config.ngf, config.batch_size) == (8, 4)
    zskt = load_recipe("zskt").synth  # ZSKT's paper batch is 128: a CPU never gets more
    resolve_generator_size(zskt, (3, 32, 32), CPU)
    assert zskt.batch_size == 128


def test_cmi_keeps_its_cpu_batch_and_sizes_its_generator() -> None:
    config = load_recipe("cmi").synth
    assert config.batch_size == 64 and config.ngf == "auto"
    resolve_generator_size(config, (3, 32, 32), CPU)
    assert config.ngf == 16


@pytest.mark.parametrize("value", ["big", 0, -3, 2.5, True])
def test_bad_sizes_are_refused(value) -> None:
    with pytest.raises(DfkdError, match="synth.ngf"):
        load_recipe("dfad", [f"synth.ngf={value if not isinstance(value, str) else repr(value)}".replace("True", "true")])
