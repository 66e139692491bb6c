"""Hugging Face image classifiers (``...ForImageClassification`` folders) as teachers, and models
built from their configs (the students of :mod:`dfkd_cli.hf_student`).

Loading is local and runs no shipped code, with the checks the text teachers use
(:mod:`dfkd_cli.text.folders`): a config with ``auto_map`` is refused, and pickled weights
(``pytorch_model.bin``) need ``--trust-pickle``. What the model needs is read from the folder:

- classes and their names from ``config.json``'s ``id2label`` (``--labels`` overrides);
- the input size from ``preprocessor_config.json`` (``crop_size`` when it centre-crops, else
  ``size``) and channels from ``num_channels``; ``--input-shape`` overrides;
- the normalisation from its ``image_mean``/``image_std`` (with its ``rescale_factor`` folded in,
  as dfkd feeds pixels in [0, 1]); ``--normalize``/``--mean``/``--std`` override.

A folder without ``preprocessor_config.json`` gets stated defaults (the config's ``image_size``,
else 224, and ImageNet statistics) and the plan says so.

Example:
    >>> teacher = load_hf_image_teacher(Path("vit-folder"), None, None, None, None, None, False)
    >>> teacher.arch, teacher.input_shape, teacher.class_names[:2]
    ('hf:vit', (3, 224, 224), ['tench', 'goldfish'])
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd_cli import validate
from dfkd_cli.archs import format_shape
from dfkd_cli.errors import DfkdError
from dfkd_cli.teacher import Teacher, probe_outputs, read_labels, resolve_normalization
from dfkd_cli.text.folders import check_folder, load_pretrained, read_json, refuse_remote_code

PROCESSOR_CONFIG = "preprocessor_config.json"
DEFAULT_SIZE = 224  # the side of a folder without a processor config or an image_size in its config
SMALL_STUDENT = "hf:small"  # the default student: the teacher's config, shallower and narrower (hf_student)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_FOLDER_HINT = "pass a Hugging Face image classifier folder (config.json and model.safetensors)"


class HFImageClassifier(nn.Module):
    """A transformers image classifier as dfkd calls every model: ``model(x)`` -> logits."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def image_classifier_names() -> dict[str, tuple[str, ...]]:
    """``model_type`` -> the transformers classes that classify images for it (built-in only)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    return {key: value if isinstance(value, tuple) else (value,) for key, value in names.items()}


def model_class(config: dict[str, Any], where: str) -> type[nn.Module]:
    """The transformers class ``config`` names in ``architectures`` (else its type's first image
    classifier); only classes transformers itself registers for image classification."""
    import transformers

    refuse_remote_code(config, where)
    model_type = config.get("model_type")
    known = image_classifier_names()
    if model_type not in known:
        raise DfkdError(f"{where} has model_type {model_type!r}, which transformers {transformers.__version__} has no "
                        "image classifier for; use a built-in image classification model (or upgrade transformers)")
    named = [name for name in config.get("architectures") or [] if name in known[model_type]]
    return getattr(transformers, named[0] if named else known[model_type][0])


def config_object(config: dict[str, Any], where: str) -> Any:
    """A transformers config built from the ``config.json`` dict, no shipped code run."""
    from transformers import AutoConfig

    refuse_remote_code(config, where)
    values = {key: value for key, value in config.items() if key != "model_type"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.for_model(config["model_type"], **values)
    except (KeyError, ValueError, TypeError) as error:
        raise DfkdError(f"{where} is not a usable transformers config ({type(error).__name__}: {error}); "
                        "re-save the model with save_pretrained()") from error


def config_has_bn(config: dict[str, Any]) -> bool:
    """Whether the model ``config`` describes has BatchNorm layers (built on the meta device:
    no memory, no weights), e.g. True for ResNet, False for ViT and ConvNeXt (LayerNorm)."""
    return any(isinstance(module, _BN_TYPES) for module in meta_model(config, "teacher config.json").modules())


def meta_model(config: dict[str, Any], where: str) -> nn.Module:
    """The model ``config`` describes, on the meta device (shapes only), to count or inspect."""
    with torch.device("meta"):
        return _construct(config, where)


def _construct(config: dict[str, Any], where: str) -> nn.Module:
    """A randomly initialised float32 transformers model of ``config``; a one-line error when
    transformers cannot build it (sizes that do not fit together)."""
    from dfkd_cli.text.export import quiet_transformers

    cls, built = model_class(config, where), config_object(config, where)
    quiet_transformers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(built).float()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, ZeroDivisionError) as error:
        raise DfkdError(f"{where}: transformers cannot build a {config.get('model_type')!r} model from it "
                        f"({type(error).__name__}: {error}); check its sizes (layers, widths, heads, image size)") from error


def model_from_config(config: dict[str, Any], num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    """A randomly initialised :class:`HFImageClassifier` of ``config``'s architecture with
    ``num_classes`` outputs taking ``input_shape`` inputs (``num_channels``/``image_size`` set to it)."""
    return HFImageClassifier(_construct(sized_config(config, num_classes, input_shape), "student config"))


def sized_config(config: dict[str, Any], num_classes: int, input_shape: tuple[int, int, int],
                 class_names: list[str] | None = None) -> dict[str, Any]:
    """A copy of ``config`` with ``num_classes`` labels (named ``class_names`` when given) and the
    channels and image size of ``input_shape`` where the config records them."""
    sized = dict(config)
    names = class_names or [str(label) for label in _labels(config)]
    if len(names) != num_classes:
        names = [f"LABEL_{index}" for index in range(num_classes)]
    sized["id2label"] = {str(index): name for index, name in enumerate(names)}
    sized["label2id"] = {name: index for index, name in enumerate(names)}
    sized["num_labels"] = num_classes
    sized["num_channels"] = input_shape[0]
    if "image_size" in sized:
        height, width = input_shape[1:]
        sized["image_size"] = height if height == width else [height, width]
    return sized


def _labels(config: dict[str, Any]) -> list[Any]:
    """``id2label``'s names ordered by id (keys are strings in config.json)."""
    id2label = config.get("id2label") or {}
    try:
        return [id2label[key] for key in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return []


def load_hf_image_teacher(path: Path, input_shape: tuple[int, int, int] | None, normalize: str | None,
                          mean: list[float] | None, std: list[float] | None, labels: Path | None,
                          trust_pickle: bool) -> Teacher:
    """The image classifier in the folder ``path``, frozen, in eval mode, as a :class:`Teacher`."""
    from dfkd_cli.text.export import quiet_transformers
    from dfkd_cli.text.models import weights_sha256

    path = Path(path)
    config = check_folder(path, "teacher", _FOLDER_HINT, trust_pickle)
    where = f"teacher '{path}'"
    cls = model_class(config, where)
    quiet_transformers()
    hf, info = load_pretrained(cls, path, "teacher", "image classifier", output_loading_info=True,
                               use_safetensors=None if trust_pickle else True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them at random: a teacher that knows nothing there
        raise DfkdError(f"{where} lacks weights for {len(missing)} parameter(s) (e.g. '{missing[0]}'); the folder is "
                        "incomplete or holds another model, re-save it with save_pretrained()")
    for name, tensor in hf.state_dict().items():
        if tensor.is_floating_point():
            validate.weight(name, tensor, where)
    model = HFImageClassifier(hf.float()).eval().requires_grad_(False)
    num_classes = validate.num_classes(int(hf.config.num_labels), f"{where} config.json num_labels")
    processor = _read_processor(path)
    shape, shape_note = _input_shape(config, processor, input_shape, where)
    mean_t, std_t, stats_note = _normalisation(processor, normalize, mean, std, shape[0], path)
    names = read_labels(labels, num_classes) if labels is not None else validate.class_names(
        [str(hf.config.id2label[i]) for i in range(num_classes)], num_classes, f"{where} config.json id2label",
        "pass --labels FILE with one class name per line")
    _probe(model, shape, mean_t, std_t, where)
    return Teacher(
        model=model, arch=f"hf:{config['model_type']}", num_classes=num_classes, input_shape=shape, mean=mean_t,
        std=std_t, class_names=names, sha256=weights_sha256(path), path=str(path),
        source={"kind": "hf-image", "config": hf.config.to_dict()}, default_student=SMALL_STUDENT,
        shape_note=shape_note, stats_note=stats_note, classifier=classifier_module(model, num_classes),
    )


def classifier_module(model: nn.Module, num_classes: int) -> str | None:
    """The one ``nn.Linear`` with ``num_classes`` outputs (its input is the penultimate feature);
    None when there is not exactly one (e.g. DeiT's two heads)."""
    heads = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module.out_features == num_classes]
    return heads[0] if len(heads) == 1 else None


def _read_processor(folder: Path) -> dict[str, Any] | None:
    """``preprocessor_config.json`` as a dict (only read as JSON: no processor code runs); None without one."""
    path = folder / PROCESSOR_CONFIG
    if not path.is_file():
        return None
    processor = read_json(path, "teacher image processor config")
    if not isinstance(processor, dict):
        raise DfkdError(f"teacher image processor config '{path}' is not a JSON object; re-save it with save_pretrained()")
    return processor


def _side_pair(value: Any) -> tuple[int, int] | None:
    """(height, width) of a processor ``size``/``crop_size``: an int, {height, width} or {shortest_edge}."""
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            value = [value["height"], value["width"]]
        elif "shortest_edge" in value:
            value = value["shortest_edge"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return value[0], value[1]
    return None


def _input_shape(config: dict[str, Any], processor: dict[str, Any] | None, explicit: tuple[int, int, int] | None,
                 where: str) -> tuple[tuple[int, int, int], str]:
    """The input shape and where it came from (``--input-shape``, the processor config, or defaults)."""
    channels = config.get("num_channels", 3)
    if explicit is not None:
        if explicit[0] != channels:
            raise DfkdError(f"--input-shape {format_shape(explicit)} has {explicit[0]} channels but {where} takes "
                            f"{channels} (num_channels in config.json); pass --input-shape "
                            f"{format_shape((channels, *explicit[1:]))}")
        return explicit, "given"
    if processor is None:
        side = _side_pair(config.get("image_size", DEFAULT_SIZE)) or (DEFAULT_SIZE, DEFAULT_SIZE)
        origin = "config.json image_size" if "image_size" in config else "dfkd's default size"
        return (channels, *side), (f"no {PROCESSOR_CONFIG}: {side[0]}x{side[1]} pixels from {origin}, channels from "
                                   "config.json; set --input-shape CxHxW if the teacher was trained on another size")
    key = "crop_size" if "crop_size" in processor and processor.get("do_center_crop", True) else "size"
    side = _side_pair(processor.get(key))
    if side is None:
        raise DfkdError(f"{where} {PROCESSOR_CONFIG} {key} {processor.get(key)!r} gives no input size; "
                        "pass --input-shape CxHxW")
    return (channels, *side), f"from {PROCESSOR_CONFIG} ({key} {side[0]}x{side[1]}), channels from config.json"


def _normalisation(processor: dict[str, Any] | None, normalize: str | None, mean: list[float] | None,
                   std: list[float] | None, channels: int, folder: Path
                   ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std) for pixels in [0, 1] and where they came from."""
    if processor is None:
        mean_t, std_t = resolve_normalization(normalize, mean, std, channels, "imagenet")
        return mean_t, std_t, (f"no {PROCESSOR_CONFIG}: ImageNet statistics (dfkd's default); set --normalize or "
                               "--mean/--std to the teacher's training normalisation")
    label = f"teacher '{folder}' {PROCESSOR_CONFIG} image"
    if not processor.get("do_normalize", True):
        stats: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), (1.0,))
    else:
        stats = (validate.finite_floats(_listed(processor.get("image_mean")), f"{label}_mean"),
                 validate.finite_floats(_listed(processor.get("image_std")), f"{label}_std"))
    # The model sees pixels scaled by `scale` (1 for the usual rescale_factor 1/255): fold it into mean and std.
    scale = 255.0 * float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 255.0
    scaled = (tuple(v / scale for v in stats[0]), tuple(v / scale for v in stats[1]))
    mean_t, std_t = resolve_normalization(normalize, mean, std, channels, label, scaled)
    rescaled = "" if abs(scale - 1.0) < 1e-6 else f", rescaled for pixels in [0, 1] (x{scale:g})"
    note = f"from {PROCESSOR_CONFIG} (image_mean/image_std{rescaled})" if processor.get("do_normalize", True) \
        else f"from {PROCESSOR_CONFIG}: do_normalize is false (mean 0, std 1{rescaled})"
    return mean_t, std_t, note


def _listed(value: Any) -> Any:
    """A processor's per-channel value as a list (some configs store one number for all channels)."""
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _probe(model: nn.Module, shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
           where: str) -> None:
    """:func:`~dfkd_cli.teacher.probe_outputs`, with a model that cannot take ``shape`` refused in one line."""
    try:
        probe_outputs(model, shape, mean, std, where)
    except (RuntimeError, ValueError) as error:  # e.g. ViT: "Input image size (64*64) doesn't match model (32*32)"
        first = (str(error).strip().splitlines() or [""])[0]
        raise DfkdError(f"{where} cannot run on {format_shape(shape)} inputs ({first}); pass --input-shape with the "
                        "size it was trained on") from error
