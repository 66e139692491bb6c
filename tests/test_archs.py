"""Architecture registry and model zoo: names, parameter layouts, sizes and input-shape checks."""

from __future__ import annotations

import pytest
import torch

from dfkd_cli.archs import (
    NORMALIZE_PRESETS,
    classifier_keys,
    classifier_module_name,
    create_model,
    default_student,
    get_arch,
    list_archs,
    param_shapes,
    stem_keys,
)
from dfkd_cli.errors import DfkdError


# A fixed subset of each model's state-dict keys, as published checkpoints name them.
EXPECTED_KEYS = {
    "cifar_resnet18": ["conv1.weight", "bn1.running_var", "layer1.1.conv2.weight", "layer2.0.shortcut.0.weight",
                       "layer2.0.shortcut.1.running_mean", "layer4.1.bn2.weight", "linear.weight", "linear.bias"],
    "cifar_resnet34": ["linear.weight", "layer4.2.conv2.weight", "layer2.0.shortcut.0.weight",
                       "layer3.5.bn1.bias", "layer2.3.conv1.weight"],
    "resnet8": ["conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.weight"],
    "resnet20": ["layer3.2.conv2.weight", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight",
                 "bn1.weight", "fc.weight"],
    "resnet32": ["layer1.4.bn2.weight", "layer3.4.conv2.weight", "fc.bias"],
    "resnet56": ["layer1.8.conv1.weight", "layer3.0.downsample.1.running_var", "fc.weight"],
    "resnet110": ["layer3.17.conv2.weight", "fc.weight"],
    "wrn16_1": ["conv1.weight", "block1.layer.1.conv2.weight", "block2.layer.0.convShortcut.weight",
                "block3.layer.1.bn2.running_mean", "bn1.weight", "fc.weight"],
    "wrn16_2": ["block1.layer.0.convShortcut.weight", "block3.layer.1.conv2.weight", "fc.weight"],
    "wrn40_1": ["block1.layer.5.conv1.weight", "block3.layer.0.convShortcut.weight", "fc.bias"],
    "wrn40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.weight", "fc.weight"],
    "cifar_vgg8_bn": ["block0.0.weight", "block0.0.bias", "block0.1.running_mean", "block4.1.weight",
                      "classifier.weight"],
    "cifar_vgg11_bn": ["block0.0.weight", "block2.3.weight", "block2.4.running_var", "block4.1.weight",
                       "block4.3.weight", "block4.4.weight", "classifier.weight"],
    "lenet5": ["conv1.weight", "conv2.bias", "conv3.weight", "fc1.weight", "fc2.weight", "fc2.bias"],
    "lenet5_half": ["conv1.weight", "conv3.weight", "fc1.weight", "fc2.weight"],
}
# Keys that must NOT exist (layouts differ from look-alike published models).
ABSENT_KEYS = {
    "cifar_resnet18": ["fc.weight", "layer1.0.shortcut.0.weight", "layer1.0.downsample.0.weight"],
    "resnet20": ["linear.weight", "layer1.0.downsample.0.weight", "layer4.0.conv1.weight"],
    "wrn16_1": ["block1.layer.0.convShortcut.weight", "block1.layer.1.convShortcut.weight"],
    "wrn40_2": ["block1.layer.1.convShortcut.weight"],
    "cifar_vgg8_bn": ["block2.3.weight", "block0.2.weight"],
    "lenet5": ["bn1.weight", "features.0.weight"],
}
PARAM_COUNTS = {"resnet20": 0.27e6, "wrn40_2": 2.2e6, "cifar_resnet18": 11.17e6, "wrn16_1": 0.175e6}
ZOO = sorted(EXPECTED_KEYS)


def test_list_archs_globs_and_sorts() -> None:
    assert list_archs("wrn*") == ["wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2"]
    assert list_archs("lenet*") == ["lenet5", "lenet5_half"]
    everything = list_archs()
    assert everything == sorted(everything)
    for name in ["resnet18", "mobilenet_v3_small", "vit_b_16", "inception_v3", "regnet_y_400mf", "swin_t"]:
        assert name in everything
    assert set(ZOO) <= set(everything)
    assert not any(n.startswith(("fasterrcnn", "fcn_", "deeplab", "r3d", "raft", "quantized")) for n in everything)


def test_get_arch_normalises_names() -> None:
    assert get_arch("WRN-16-1").name == "wrn16_1"
    assert get_arch("lenet5-half").name == "lenet5_half"
    assert get_arch("Vit-B-16").name == "vit_b_16"
    assert get_arch("ResNet-18").name == "resnet18"


def test_unknown_arch_lists_close_matches() -> None:
    with pytest.raises(DfkdError) as info:
        get_arch("resnt18")
    message = info.value.message
    assert "unknown architecture 'resnt18'" in message and "resnet18" in message and "dfkd archs" in message
    assert info.value.exit_code == 2


def test_specs_have_family_defaults() -> None:
    tv, cifar, lenet = get_arch("resnet18"), get_arch("wrn40_2"), get_arch("lenet5")
    assert (tv.family, tv.default_input, tv.default_normalize) == ("torchvision", (3, 224, 224), "imagenet")
    assert (cifar.family, cifar.default_input, cifar.default_normalize) == ("cifar", (3, 32, 32), "cifar10")
    assert (lenet.family, lenet.default_input, lenet.default_normalize) == ("lenet", (1, 32, 32), "mnist")
    assert get_arch("inception_v3").default_input == (3, 299, 299)
    assert NORMALIZE_PRESETS["mnist"] == ((0.1307,), (0.3081,))


def test_default_students() -> None:
    pairs = {"resnet34": "resnet18", "cifar_resnet34": "cifar_resnet18", "wrn40_2": "wrn16_1",
             "resnet20": "resnet8", "resnet56": "resnet20", "lenet5": "lenet5_half",
             "cifar_vgg11_bn": "cifar_vgg8_bn"}
    for teacher, student in pairs.items():
        assert default_student(teacher) == student
    for name in list_archs():  # every default student is itself registered
        student = get_arch(name).default_student
        assert student is None or get_arch(student).name == student
    with pytest.raises(DfkdError, match="no default student for lenet5_half; pass --student"):
        default_student("lenet5_half")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_layout_and_output(name: str) -> None:
    spec = get_arch(name)
    keys = set(param_shapes(name))
    assert set(EXPECTED_KEYS[name]) <= keys, set(EXPECTED_KEYS[name]) - keys
    assert not set(ABSENT_KEYS.get(name, [])) & keys
    # CIFAR models pool adaptively: 16x16 inputs keep this test fast. LeNet needs its 32x32.
    shape = spec.default_input if spec.family == "lenet" else (3, 16, 16)
    model = create_model(name, num_classes=7, input_shape=shape)  # checks forward -> [1, 7]
    model.eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, *shape))
        assert features.shape == (2, model.num_features)
        assert model.forward_head(features).shape == (2, 7)
    if spec.family == "lenet":
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name, expected", sorted(PARAM_COUNTS.items()))
def test_param_counts_match_literature(name: str, expected: float) -> None:
    with torch.device("meta"):  # shapes only: no allocation, no initialisation
        model = get_arch(name).factory(10, 3)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.02, count


def test_cifar_zoo_takes_other_sizes_and_channels() -> None:
    for name in ["resnet8", "wrn16_1", "cifar_vgg8_bn"]:
        model = create_model(name, num_classes=10, input_shape=(1, 28, 28)).eval()
        with torch.no_grad():
            assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_torchvision_factory_replaces_first_conv_keeping_names() -> None:
    rgb = param_shapes("resnet18", 10, 3)
    gray = create_model("resnet18", num_classes=10, input_shape=(1, 32, 32))
    assert gray.conv1.weight.shape == (64, 1, 7, 7)
    assert {k: tuple(v.shape) for k, v in gray.state_dict().items() if k != "conv1.weight"} == {
        k: v for k, v in rgb.items() if k != "conv1.weight"}
    mobile = create_model("mobilenet_v3_small", num_classes=5, input_shape=(4, 64, 64))
    assert mobile.features[0][0].in_channels == 4 and mobile.classifier[3].out_features == 5


def test_probed_classifier_and_stem_keys() -> None:
    assert classifier_keys("resnet20") == {"fc.weight": 0, "fc.bias": 0}
    assert classifier_keys("squeezenet1_1") == {"classifier.1.weight": 0, "classifier.1.bias": 0}
    assert stem_keys("wrn40_2") == {"conv1.weight": 1}
    assert stem_keys("vit_b_16") == {"conv_proj.weight": 1}
    assert classifier_module_name("cifar_vgg11_bn") == "classifier"
    assert classifier_module_name("mobilenet_v3_small") == "classifier.3"


@pytest.mark.parametrize("name, shape, reason", [
    ("vit_b_16", (3, 32, 32), "Wrong image height"),
    ("lenet5", (1, 16, 16), "Kernel size"),
    ("lenet5", (1, 28, 28), "Kernel size"),
    ("lenet5", (1, 36, 36), "cannot be multiplied"),
])
def test_input_shape_the_arch_cannot_take(name: str, shape: tuple[int, int, int], reason: str) -> None:
    with pytest.raises(DfkdError) as info:
        create_model(name, num_classes=10, input_shape=shape)
    message = info.value.message
    size = "x".join(map(str, shape))
    assert message.startswith(f"architecture {name} cannot take input shape {size}: ")
    assert reason in message and "pass --input-shape CxHxW (default for" in message
    assert "\n" not in message


def test_create_model_keeps_train_mode_and_rejects_zero_classes() -> None:
    assert create_model("resnet8", 10, (3, 32, 32)).training
    with pytest.raises(DfkdError, match="at least 1"):
        create_model("resnet8", 0, (3, 32, 32))
